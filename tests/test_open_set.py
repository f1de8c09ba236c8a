"""Unknown-animal detection and enrolment: the scores on data with a known outcome, testing.py's
output and gallery, and real dogs that the model never saw."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, shared_path
from test_training import CLASSES, make_granja, train_args

import testing
import training
from utils.open_set import (ClassModel, Decision, auroc, calibrate, decide, enrolment_threshold,
                            fit_identity_projections, held_out_scores, known_scores, open_set_metrics)


def blobs(rng, centres, per_centre, spread=0.05):
    """Points scattered around each centre; returns the points and the index of their centre."""
    points = np.concatenate([centre + spread * rng.standard_normal((per_centre, len(centre))) for centre in centres])
    return points, np.repeat(np.arange(len(centres)), per_centre)


def test_scores_separate_known_from_unknown_blobs():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:4] * 3 + 1  # four known animals in 8 dimensions
    train_x, train_y = blobs(rng, centres, 30)
    val_x, val_y = blobs(rng, centres, 10)
    unknown_x, _ = blobs(rng, np.eye(8)[4:6] * 3 + 1, 20)  # two animals the model never saw
    model = ClassModel.fit(train_x, train_x, train_y, 4)

    def per_class(points):
        similarity = model.cosine(points)
        probabilities = np.exp(10 * similarity) / np.exp(10 * similarity).sum(axis=1, keepdims=True)
        return model.per_class(probabilities, points, points)

    calibration = calibrate(per_class(val_x), val_y, accept_rate=0.9)
    assert set(calibration.validation_auroc) == {"max_probability", "cosine", "mahalanobis"}
    assert calibration.validation_auroc[calibration.score] == max(calibration.validation_auroc.values())
    known = known_scores(per_class(val_x))
    for name, threshold in calibration.thresholds.items():
        assert np.mean(known[name] >= threshold) >= 0.9
    unknown = known_scores(per_class(unknown_x))
    for name in ("cosine", "mahalanobis"):
        metrics = open_set_metrics(known[name], unknown[name], calibration.thresholds[name])
        assert metrics["auroc"] > 0.99
        assert metrics["unknown_flagged"] > 0.9


def test_held_out_scores_drop_own_class():
    per_class = {"max_probability": np.array([[0.7, 0.2, 0.1]]), "cosine": np.array([[0.9, 0.5, 0.1]]),
                 "mahalanobis": np.array([[-1.0, -4.0, -9.0]])}
    held_out = held_out_scores(per_class, np.array([0]))
    assert held_out["max_probability"][0] == pytest.approx(0.2 / 0.3)
    assert held_out["cosine"][0] == 0.5
    assert held_out["mahalanobis"][0] == -4.0
    assert auroc(np.array([0.9, 0.8]), np.array([0.1, 0.85])) == 0.75


def test_decide_names_enrolled_trained_and_unknown():
    rng = np.random.default_rng(1)
    centres = np.eye(6)[:2] * 3 + 1
    train_x, train_y = blobs(rng, centres, 30)
    model = ClassModel.fit(train_x, train_x, train_y, 2)
    val_x, val_y = blobs(rng, centres, 10)
    similarity = model.cosine(val_x)
    calibration = calibrate(model.per_class(similarity / similarity.sum(axis=1, keepdims=True), val_x, val_x), val_y)
    newcomer = np.eye(6)[2] * 3 + 1
    stranger = np.eye(6)[3] * 3 + 1
    photos = np.stack([centres[0], centres[1], newcomer, stranger])
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.5, 0.5]])
    decisions = decide(probabilities, photos, photos, ["rex", "luna"], model, calibration, {"Nieve": newcomer})
    assert [decision.prediction for decision in decisions] == ["rex", "luna", "Nieve", "unknown"]
    assert decisions[2].enrolled
    assert decisions[2].score_name == "cosine"
    # A threshold given by hand overrides the calibrated one.
    strict = decide(probabilities, photos, photos, ["rex", "luna"], model, calibration, {}, threshold=1e9)
    assert all(decision.prediction == "unknown" for decision in strict)
    assert isinstance(strict[0], Decision)


def nuisance_photos(rng, identities, per_identity, nuisance=8):
    """Embeddings whose first dimensions tell the animal and whose last ``nuisance`` ones are large noise.

    Raw cosine similarity is swamped by the noise; a projection that learns to drop it is not.
    """
    points, labels = blobs(rng, identities, per_identity, spread=0.1)
    return np.concatenate([points, 3 * rng.standard_normal((len(points), nuisance))], axis=1), labels


def test_identity_projection_learns_what_tells_animals_apart():
    rng = np.random.default_rng(2)
    identities = rng.standard_normal((40, 16)) + 0.5  # 4 granja animals, 28 background, 8 never seen
    train_x, train_y = nuisance_photos(rng, identities[:32], 16)
    val_x, val_y = nuisance_photos(rng, identities[:4], 6)
    background_x, _ = nuisance_photos(rng, identities[32:36], 6)  # held out of the projection's training
    unknown_x, _ = nuisance_photos(rng, identities[36:], 6)
    projection = fit_identity_projections(train_x, train_y, seed=0)
    assert projection[0].shape == (24, 3 * 256)
    assert projection[1].shape == (3 * 256,)
    granja = train_y < 4
    model = ClassModel.fit(train_x[granja], train_x[granja], train_y[granja], 4, projection)
    assert np.allclose(np.linalg.norm(model.identity(val_x), axis=1), 1.0)

    def per_class(points):
        return model.per_class(np.full((len(points), 4), 0.25), points, points)

    calibration = calibrate(per_class(val_x), val_y, 0.9, unknown_per_class=per_class(background_x))
    assert calibration.validation_unknowns == "background"
    assert calibration.validation_auroc[calibration.score] == max(calibration.validation_auroc.values())
    known, unknown = known_scores(per_class(val_x)), known_scores(per_class(unknown_x))
    assert auroc(known["identity_cosine"], unknown["identity_cosine"]) > 0.95
    assert auroc(known["identity_cosine"], unknown["identity_cosine"]) > auroc(known["cosine"], unknown["cosine"]) + 0.1

    calibration.enrolment_threshold = enrolment_threshold(model, background_x, np.repeat(np.arange(4), 6), 0.9)
    assert -1.0 < calibration.enrolment_threshold < 1.0

    # The arrays saved in open_set.npz rebuild the same model.
    copy = ClassModel.from_arrays(model.arrays())
    assert np.allclose(copy.identity(unknown_x), model.identity(unknown_x))

    # Enrolled animals are compared in the identity space.
    newcomer = nuisance_photos(rng, identities[36:37], 5)[0]
    decisions = decide(np.full((len(unknown_x), 4), 0.25), unknown_x, unknown_x, ["a", "b", "c", "d"], model,
                       calibration, {"Nieve": newcomer.mean(axis=0)})
    named = [decision.prediction for decision in decisions[:6]]
    assert named.count("Nieve") >= 4, named
    assert all(decision.score_name == "identity_cosine" for decision in decisions if decision.enrolled)
    others = [decision.prediction for decision in decisions[6:]]
    assert others.count("Nieve") <= 1, others


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """A granja of three colour classes, trained with the default freeze (only the head trains)."""
    tmp_path = tmp_path_factory.mktemp("open_set")
    make_granja(tmp_path / "dataset" / "farm")
    code = training.main(train_args(tmp_path, "-m", "mobilenetv2", "--weights", "none", "--input-size", "32",
                                    "-e", "3", "-bs", "4", "--hidden", "16,8"))
    assert code == 0
    return tmp_path


def run_testing(root, *args):
    return subprocess.run([sys.executable, "testing.py", "-ng", "farm", "--models-dir", str(root / "models"), *args],
                          cwd=REPO, capture_output=True, text=True, check=False)


def test_training_records_calibration(farm):
    record = json.loads((farm / "models" / "farm" / "training.json").read_text(encoding="utf-8"))["open_set"]
    assert record["score"] in record["thresholds"]
    assert record["threshold"] == record["thresholds"][record["score"]]
    assert record["accept_rate"] == 0.95
    assert (farm / "models" / "farm" / "open_set.npz").is_file()
    run = next((farm / "logs" / "farm").iterdir())
    assert json.loads((run / "open_set.json").read_text(encoding="utf-8"))["score"] == record["score"]


def test_default_output_stays_flat(farm):
    photo = farm / "dataset" / "farm" / "rex" / "ñandú 0.jpg"
    result = run_testing(farm, "--img", str(photo))
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert set(scores) == set(CLASSES)
    assert all(isinstance(value, float) for value in scores.values())
    lines = [line for line in result.stderr.splitlines() if line.startswith("prediction: ")]
    assert len(lines) == 1
    assert "threshold" in lines[0]


def test_full_format_and_threshold_override(farm):
    photo = farm / "dataset" / "farm" / "rex" / "ñandú 0.jpg"
    result = run_testing(farm, "--img", str(photo), "--format", "full", "--unknown-threshold", "1000000")
    assert result.returncode == 0, result.stderr
    full = json.loads(result.stdout)
    assert set(full) == {"prediction", "score", "threshold", "scores"}
    assert full["prediction"] == "unknown"
    assert full["threshold"] == 1000000
    assert set(full["scores"]) == set(CLASSES)
    assert "prediction: unknown (score" in result.stderr
    assert "under threshold 1000000.00" in result.stderr


def test_enroll_and_forget(farm, tmp_path):
    shutil.copytree(farm / "models", tmp_path / "models")
    photos = sorted((farm / "dataset" / "farm" / "rex").iterdir())
    result = run_testing(tmp_path, "--enroll", "Nieve blanca", "--img", *map(str, photos[:3]))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"enrolled": "Nieve blanca", "photos": 3, "gallery": ["Nieve blanca"]}
    gallery = json.loads((tmp_path / "models" / "farm" / "gallery.json").read_text(encoding="utf-8"))
    assert len(gallery["animals"]["Nieve blanca"]["mean"]) == 1280

    # More photos of the same animal update its mean; a photo already in it counts once.
    result = run_testing(tmp_path, "--enroll", "Nieve blanca", "--img", str(photos[3]), str(photos[0]))
    assert json.loads(result.stdout)["photos"] == 4
    assert "skipping 1 --img photo already enrolled as 'Nieve blanca'" in result.stderr
    copy = shutil.copy(photos[3], tmp_path / "renamed.jpg")
    result = run_testing(tmp_path, "--enroll", "Nieve blanca", "--img", str(copy))
    assert result.returncode == 2
    assert "every --img photo is already enrolled as 'Nieve blanca'" in result.stderr
    assert "WARNING" not in result.stderr

    for args, fragment in [(("--enroll", "rex", "--img", str(photos[0])), "is a trained class"),
                           (("--enroll", "unknown", "--img", str(photos[0])), "not a usable name"),
                           (("--forget", "Luna"), "is not enrolled"),
                           (("--forget", "rex"), "it is a trained class"),
                           (("--forget", "Nieve blanca", "--img", str(photos[0])), "--forget takes no --img")]:
        result = run_testing(tmp_path, *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error:")
        assert fragment in result.stderr

    result = run_testing(tmp_path, "--forget", "Nieve blanca")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"forgotten": "Nieve blanca", "gallery": []}


def test_gallery_survives_retraining_the_head(farm, tmp_path):
    shutil.copytree(farm / "dataset", tmp_path / "dataset")
    shutil.copytree(farm / "models", tmp_path / "models")
    photo = farm / "dataset" / "farm" / "rex" / "ñandú 0.jpg"
    assert run_testing(tmp_path, "--enroll", "Nieve", "--img", str(photo)).returncode == 0
    # Another head on the same frozen backbone: the enrolled embedding is still comparable.
    assert training.main(train_args(tmp_path, "-m", "mobilenetv2", "--weights", "none", "--input-size", "32",
                                    "-e", "1", "-bs", "4", "--hidden", "8")) == 0
    result = run_testing(tmp_path, "--img", str(photo))
    assert result.returncode == 0, result.stderr
    assert "ignoring enrolled animals" not in result.stderr
    assert "Nieve" in (tmp_path / "models" / "farm" / "gallery.json").read_text(encoding="utf-8")

    # Fine-tuning changes the embedding: the enrolled animal is kept on file but ignored, with a warning.
    assert training.main(train_args(tmp_path, "-m", "mobilenetv2", "--weights", "none", "--input-size", "32",
                                    "-e", "1", "-bs", "4", "--hidden", "8", "--freeze", "none")) == 0
    result = run_testing(tmp_path, "--img", str(photo))
    assert result.returncode == 0, result.stderr
    assert "ignoring enrolled animals Nieve" in result.stderr


def test_training_with_a_background_set(tmp_path):
    from conftest import write_photo

    make_granja(tmp_path / "dataset" / "farm")
    for animal in range(5):
        for photo in range(3):
            write_photo(tmp_path / "strays" / f"stray {animal}" / f"{photo}.jpg", seed=10 * animal + photo)
    assert training.main(train_args(tmp_path, "-m", "mobilenetv2", "--weights", "none", "--input-size", "32",
                                    "-e", "1", "-bs", "4", "--hidden", "8",
                                    "--background-dir", str(tmp_path / "strays"))) == 0
    folder = tmp_path / "models" / "farm"
    record = json.loads((folder / "training.json").read_text(encoding="utf-8"))["open_set"]
    assert record["validation_unknowns"] == "background"
    assert -1.0 <= record["enrolment_threshold"] <= 1.0
    assert record["background"]["animals"] == 5
    assert record["background"]["photos"] == 15
    assert record["background"]["held_out_animals"] == 1
    assert record["background"]["skipped_photos"] == 0
    assert {"identity_cosine", "identity_mahalanobis"} <= set(record["validation_auroc"])
    with np.load(folder / "open_set.npz") as arrays:
        assert arrays["projection_kernel"].shape == (1280, 3 * 256)
        assert arrays["identity_means"].shape == (3, 3 * 256)
    # The background photos' features join the granja's cache for the next run.
    assert sum(1 for _ in (folder / "cache").rglob("*.clean.npy")) == 18 + 15

    photo = tmp_path / "dataset" / "farm" / "rex" / "ñandú 0.jpg"
    result = subprocess.run([sys.executable, "testing.py", "-ng", "farm", "--models-dir", str(tmp_path / "models"),
                             "--format", "full", "--img", str(photo)], cwd=REPO, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    full = json.loads(result.stdout)
    assert full["threshold"] == pytest.approx(record["threshold"])
    assert "prediction: " in result.stderr


def link_dogs(dogs, target):
    for dog in dogs:
        (target / dog.name).mkdir(parents=True)
        for photo in sorted(dog.iterdir()):
            os.symlink(photo.resolve(), target / dog.name / photo.name)


@pytest.mark.slow
def test_real_dogs_unknown_and_enrolled(tmp_path):
    """Ten dogs of dogs42 as the granja; other DogFaceNet dogs as unknown, background and enrolled animals."""
    granja = shared_path("data", "granjas", "dogs42")
    weights = shared_path("weights", "mobilenet_v2_dogbreeds_notop.weights.h5")
    dogfacenet = shared_path("data", "dogfacenet")
    known = sorted(granja.iterdir())[:10]
    link_dogs(known, tmp_path / "dataset" / "dogs")
    in_granja = {int(folder.name.split("_")[1]) for folder in granja.iterdir()}
    others = sorted((folder for folder in dogfacenet.iterdir() if int(folder.name) not in in_granja),
                    key=lambda folder: int(folder.name))
    link_dogs(others[:15], tmp_path / "unknown")
    newcomer = next(folder for folder in others[15:] if len(list(folder.iterdir())) >= 10)
    link_dogs([folder for folder in others[15:115] if folder != newcomer], tmp_path / "background")

    code = training.main(["-ng", "dogs", "--dataset-dir", str(tmp_path / "dataset"), "--models-dir",
                          str(tmp_path / "models"), "--logs-dir", str(tmp_path / "logs"), "-m", "mobilenetv2",
                          "--weights", str(weights), "--input-size", "128", "-e", "10", "--views", "1",
                          "--unknown-dir", str(tmp_path / "unknown"), "--background-dir", str(tmp_path / "background"),
                          "--quiet"])
    assert code == 0
    record = json.loads((tmp_path / "models" / "dogs" / "training.json").read_text(encoding="utf-8"))
    unknown = record["open_set"]["unknown_test"]
    assert unknown["unknown_photos"] > 50
    assert unknown["auroc"] > 0.8
    assert unknown["unknown_flagged"] > 0.5
    assert record["metrics"]["open_set"]["auroc"] == unknown["auroc"]
    assert record["open_set"]["validation_unknowns"] == "background"
    assert unknown["by_score"]["identity_cosine"]["auroc"] > 0.8

    photos = sorted(newcomer.iterdir())
    args = ["-ng", "dogs", "--models-dir", str(tmp_path / "models")]
    assert testing.main([*args, "--enroll", "newcomer", "--img", *map(str, photos[:5])]) == 0
    result = subprocess.run([sys.executable, "testing.py", *args, "--format", "full", "--img",
                             *map(str, photos[5:])], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    predictions = [entry["prediction"] for entry in json.loads(result.stdout).values()]
    assert predictions.count("newcomer") >= len(predictions) / 2, predictions
    assert Path(tmp_path / "models" / "dogs" / "gallery.json").is_file()
