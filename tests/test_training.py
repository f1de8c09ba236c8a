"""training.py and testing.py end to end: tiny synthetic granjas, then real dog faces."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, shared_path, write_photo

import testing
import training

CLASSES = ("Peluchín", "Perrete 2", "rex")


def make_granja(root, photos_per_class=6, size=40):
    """Three classes whose photos differ in mean colour, so even a tiny model can tell them apart."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for index, name in enumerate(CLASSES):
        for photo in range(photos_per_class):
            pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            pixels[..., index] += 180
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"ñandú {photo}.jpg")
    return root


def train_args(tmp_path, *extra):
    return ["-ng", "farm", "--dataset-dir", str(tmp_path / "dataset"), "--models-dir", str(tmp_path / "models"),
            "--logs-dir", str(tmp_path / "logs"), "--quiet", *extra]


def score(tmp_path, capsys, *images, extra=()):
    capsys.readouterr()
    code = testing.main(["-ng", "farm", "--models-dir", str(tmp_path / "models"),
                         "--img", *map(str, images), *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def trained_farm(tmp_path_factory):
    """A granja trained once with a random-weight MobileNetV2 at 32 pixels."""
    tmp_path = tmp_path_factory.mktemp("farm")
    make_granja(tmp_path / "dataset" / "farm")
    code = training.main(train_args(tmp_path, "-m", "mobilenetv2", "--weights", "none", "--input-size", "32",
                                    "-e", "2", "-bs", "4", "--hidden", "16,8", "--freeze", "none"))
    assert code == 0
    return tmp_path


def test_training_writes_model_files(trained_farm):
    folder = trained_farm / "models" / "farm"
    assert sorted(path.name for path in folder.iterdir()) == ["inference.pb", "labels.json", "model.keras",
                                                               "open_set.npz", "split.json", "training.json"]
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    assert labels == {name: index for index, name in enumerate(sorted(CLASSES))}
    record = json.loads((folder / "training.json").read_text(encoding="utf-8"))
    assert record["backbone"] == "mobilenetv2"
    assert record["class_names"] == sorted(CLASSES)
    assert record["input_size"] == 32
    assert record["preprocessing"] == "mobilenet_v2"
    assert record["pooling"] == "avg"
    assert record["weights"] == "none"
    assert record["split_sizes"] == {"train": 12, "val": 3, "test": 3}
    assert record["hyperparameters"]["hidden"] == [16, 8]
    assert "test_accuracy" in record["metrics"]
    assert "tensorflow" in record["versions"]
    split = json.loads((folder / "split.json").read_text(encoding="utf-8"))
    assert len(split["train"]) + len(split["val"]) + len(split["test"]) == 18
    assert not set(split["train"]) & set(split["test"])


def test_training_writes_run_reports(trained_farm):
    runs = list((trained_farm / "logs" / "farm").iterdir())
    assert len(runs) == 1
    names = {path.name for path in runs[0].iterdir()}
    expected = {"classification_report.csv", "classification_report.json", "confusion_matrix.csv",
                "confusion_matrix.png", "learning_curves.png", "epochs.csv", "args.json", "training.json"}
    assert expected <= names
    assert "train" in names  # TensorBoard event folder
    report = json.loads((runs[0] / "classification_report.json").read_text(encoding="utf-8"))
    assert {"accuracy", "macro avg", "weighted avg", *CLASSES} <= set(report)
    assert set(report["rex"]) == {"precision", "recall", "f1-score", "support"}
    csv_rows = (runs[0] / "classification_report.csv").read_text(encoding="utf-8").splitlines()
    assert csv_rows[0] == ",precision,recall,f1-score,support"
    assert len(csv_rows) == 1 + len(CLASSES) + 3


def test_testing_prints_sorted_scores(trained_farm, capsys):
    photo = trained_farm / "dataset" / "farm" / "rex" / "ñandú 0.jpg"
    scores = score(trained_farm, capsys, photo)
    assert set(scores) == set(CLASSES)
    values = list(scores.values())
    assert values == sorted(values, reverse=True)
    assert abs(sum(values) - 1.0) < 1e-3


def test_testing_scores_folder_with_top_k(trained_farm, capsys):
    folder = trained_farm / "dataset" / "farm" / "rex"
    results = score(trained_farm, capsys, folder, extra=("--top-k", "2"))
    assert len(results) == 6
    assert all(len(scores) == 2 for scores in results.values())


def test_testing_rejects_broken_photo(trained_farm, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    result = subprocess.run([sys.executable, "testing.py", "-ng", "farm", "--models-dir",
                             str(trained_farm / "models"), "--img", str(broken)],
                            cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().count("\n") == 0
    assert "broken.jpg" in result.stderr
    assert "Traceback" not in result.stderr


def test_testing_skips_broken_photo_in_folder(trained_farm, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(trained_farm / "dataset" / "farm" / "rex", folder)
    (folder / "cut.jpg").write_bytes((folder / "ñandú 0.jpg").read_bytes()[:200])
    result = subprocess.run([sys.executable, "testing.py", "-ng", "farm", "--models-dir",
                             str(trained_farm / "models"), "--img", str(folder)],
                            cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 6
    warnings = [line for line in result.stderr.splitlines() if "cut.jpg" in line]
    assert len(warnings) == 1
    assert "WARNING" in warnings[0]


def test_frozen_graph_matches_keras(trained_farm):
    from utils.artifacts import load_scorer, load_trained
    from utils.features import split_at_head
    from utils.inference import GraphScorer

    trained = load_trained(trained_farm / "models", "farm")
    scorer = load_scorer(trained, batch_size=4)
    assert isinstance(scorer, GraphScorer)
    images = np.random.default_rng(1).integers(0, 256, size=(9, 32, 32, 3)).astype(np.float32)
    scores = scorer(images)
    extractor, _ = split_at_head(trained.model)
    np.testing.assert_allclose(scores.probabilities, trained.model(images, training=False), atol=1e-5)
    np.testing.assert_allclose(scores.embeddings, extractor(images, training=False), atol=1e-4)


def test_changed_model_skips_graph(trained_farm, tmp_path, capsys):
    from utils.errors import UserError
    from utils.artifacts import load_keras_model, save_model_atomic

    shutil.copytree(trained_farm / "models", tmp_path / "models")
    model_path = tmp_path / "models" / "farm" / "model.keras"
    model = load_keras_model(model_path)
    out = model.get_layer("out")
    kernel, bias = out.get_weights()
    out.set_weights([kernel, bias + np.array([0.0, 0.0, 50.0], dtype=np.float32)])
    save_model_atomic(model, model_path)

    photo = trained_farm / "dataset" / "farm" / "rex" / "ñandú 0.jpg"
    capsys.readouterr()
    assert testing.main(["-ng", "farm", "--models-dir", str(tmp_path / "models"), "--img", str(photo)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[sorted(CLASSES)[2]] > 0.99
    assert "inference.pb does not match" in captured.err
    assert "open_set.npz was calibrated for another model.keras" in captured.err
    assert "prediction:" not in captured.err

    # A model file cut short is named as such.
    model_path.write_bytes(model_path.read_bytes()[:5000])
    with pytest.raises(UserError, match="is not a .keras model file"):
        load_keras_model(model_path)


def test_model_without_graph_still_scores(trained_farm, tmp_path, capsys):
    shutil.copytree(trained_farm / "models", tmp_path / "models")
    (tmp_path / "models" / "farm" / "inference.pb").unlink()
    photo = trained_farm / "dataset" / "farm" / "rex" / "ñandú 0.jpg"
    capsys.readouterr()
    assert testing.main(["-ng", "farm", "--models-dir", str(tmp_path / "models"), "--img", str(photo)]) == 0
    captured = capsys.readouterr()
    assert "WARNING" not in captured.err
    assert json.loads(captured.out) == score(trained_farm, capsys, photo)


def test_testing_missing_model(tmp_path):
    photo = write_photo(tmp_path / "photo.jpg", seed=3)
    result = subprocess.run([sys.executable, "testing.py", "-ng", "nothing", "--models-dir", str(tmp_path),
                             "--img", str(photo)],
                            cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "no trained model for granja 'nothing'" in result.stderr


def test_training_too_small_class(tmp_path):
    make_granja(tmp_path / "dataset" / "farm", photos_per_class=2)
    result = subprocess.run([sys.executable, "training.py", *train_args(tmp_path, "-m", "mobilenetv2",
                             "--weights", "none", "--input-size", "32")],
                            cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "--min-images" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models" / "farm").exists()


@pytest.mark.parametrize("flags, message", [
    (["-e", "0"], "-e/--epochs"),
    (["-bs", "-3"], "--batch_size"),
    (["--lr", "0"], "--lr"),
    (["--dropout", "1.5"], "--dropout"),
    (["--val-fraction", "0.6", "--test-fraction", "0.5"], "--val-fraction"),
    (["-m", "resnet"], "--model"),
    (["--weights", "/no/such/file.h5", "-m", "mobilenetv2"], "--weights file not found"),
])
def test_training_rejects_bad_flags(tmp_path, flags, message):
    make_granja(tmp_path / "dataset" / "farm")
    result = subprocess.run([sys.executable, "training.py", *train_args(tmp_path, *flags)],
                            cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_freeze_policy_default_trains_head_only(tmp_path):
    from utils.backbones import KERAS_SPECS, build_backbone
    from utils.head import apply_freeze, build_classifier, weighted_layers

    spec = KERAS_SPECS["mobilenetv2"]
    model = build_classifier(build_backbone(spec, 32, "none"), input_size=32, preprocessing=spec.preprocessing,
                             pooling="avg", hidden=(8, 8, 8), dropout=0.2, num_classes=3)
    summary = apply_freeze(model, -4)
    trainable = [layer.name for layer in weighted_layers(model) if layer.trainable]
    assert trainable == ["fc1", "fc2", "fc3", "out"]
    assert summary.first_trainable == "fc1"
    assert summary.frozen == len(weighted_layers(model)) - 4

    summary = apply_freeze(model, 3)
    assert [layer.trainable for layer in weighted_layers(model)][:4] == [False, False, False, True]
    summary = apply_freeze(model, None)
    assert summary.frozen == 0


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50", "senet50"])
def test_vggface_backbones_train_and_score(tmp_path, capsys, backbone):
    from utils.backbones import BACKBONES

    make_granja(tmp_path / "dataset" / "farm", photos_per_class=4)
    size = str(BACKBONES[backbone].min_input_size)
    code = training.main(train_args(tmp_path, "-m", backbone, "--weights", "none", "--input-size", size,
                                    "-e", "1", "-bs", "8", "--hidden", "8"))
    assert code == 0
    record = json.loads((tmp_path / "models" / "farm" / "training.json").read_text(encoding="utf-8"))
    assert record["preprocessing"] == ("vggface1" if backbone == "vgg16" else "vggface2")
    assert record["pooling"] == ("flatten" if backbone == "vgg16" else "avg")
    scores = score(tmp_path, capsys, tmp_path / "dataset" / "farm" / "rex" / "ñandú 0.jpg")
    assert abs(sum(scores.values()) - 1.0) < 1e-3


def test_real_dogs_far_above_chance(tmp_path, capsys):
    """A few real dogs with the dog-breed MobileNetV2 weights: accuracy must be far above chance."""
    source = shared_path("data", "granjas", "dogs42")
    weights = shared_path("weights", "mobilenet_v2_dogbreeds_notop.weights.h5")
    dogs = sorted(os.listdir(source))[:8]
    for dog in dogs:
        shutil.copytree(source / dog, tmp_path / "dataset" / "farm" / dog)

    code = training.main(train_args(tmp_path, "-m", "mobilenetv2", "--weights", str(weights),
                                    "--input-size", "128", "-e", "8", "-bs", "16", "--val-fraction", "0.2",
                                    "--test-fraction", "0.25"))
    assert code == 0
    record = json.loads((tmp_path / "models" / "farm" / "training.json").read_text(encoding="utf-8"))
    chance = 1 / len(dogs)
    assert record["metrics"]["test_accuracy"] >= 0.6, f"chance is {chance:.2f}"

    photo = sorted((tmp_path / "dataset" / "farm" / dogs[0]).iterdir())[0]
    scores = score(tmp_path, capsys, photo)
    assert len(scores) == len(dogs)


def test_dedup_threshold_keeps_copies_on_one_side(tmp_path):
    root = tmp_path / "dataset" / "farm"
    make_granja(root, photos_per_class=6)
    copies = {}
    for name in CLASSES:
        for index in (0, 1):
            original = root / name / f"ñandú {index}.jpg"
            copy = root / name / f"ñandú {index} copy.jpg"
            shutil.copy(original, copy)
            copies[f"{name}/{copy.name}"] = f"{name}/{original.name}"

    code = training.main(train_args(tmp_path, "-m", "mobilenetv2", "--weights", "none", "--input-size", "32",
                                    "-e", "1", "--hidden", "8", "--dedup-threshold", "0.95"))

    assert code == 0
    record = json.loads((tmp_path / "models" / "farm" / "training.json").read_text(encoding="utf-8"))
    assert record["dedup_threshold"] == 0.95
    assert record["dedup_groups"] == 3 * 6
    split = json.loads((tmp_path / "models" / "farm" / "split.json").read_text(encoding="utf-8"))
    side = {path: name for name in ("train", "val", "test") for path in split[name]}
    for copy, original in copies.items():
        assert side[copy] == side[original], copy
