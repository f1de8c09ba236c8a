"""Bad folders, broken model files, interruptions, concurrent runs and reproducibility of training."""

import csv
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, write_photo
from test_training import make_granja, train_args

import training

SMALL = ("-m", "mobilenetv2", "--weights", "none", "--input-size", "32", "--hidden", "8")


def run_training(tmp_path, *flags):
    return subprocess.run([sys.executable, "training.py", *train_args(tmp_path, *SMALL, *flags)],
                          cwd=REPO, capture_output=True, text=True, check=False)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    # Progress lines are held back and dropped; only warnings may come before the error.
    others = [line for line in result.stderr.splitlines() if not line.startswith(("error:", "WARNING:"))]
    assert not others, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def build_empty_class(root):
    make_granja(root)
    (root / "vacío").mkdir()


def build_one_photo_class(root):
    make_granja(root)
    write_photo(root / "solo" / "one.jpg", seed=9)


def build_one_class(root):
    for index in range(5):
        write_photo(root / "only" / f"{index}.jpg", seed=index)


def build_loose_photos(root):
    for index in range(5):
        write_photo(root / f"{index}.jpg", seed=index)


def build_only_junk(root):
    (root / "__MACOSX").mkdir(parents=True)
    (root / ".DS_Store").write_bytes(b"junk")


@pytest.mark.parametrize("build, fragments", [
    (build_empty_class, ["'vacío' (0)", "--min-images"]),
    (build_one_photo_class, ["'solo' (1)", "--min-images"]),
    (build_one_class, ["at least 2 classes", "'only'"]),
    (build_loose_photos, ["lie directly in", "class folder"]),
    (build_only_junk, ["no class folders"]),
    (None, ["granja folder not found"]),
])
def test_bad_folder_shapes(tmp_path, build, fragments):
    if build is not None:
        build(tmp_path / "dataset" / "farm")
    assert_one_line_error(run_training(tmp_path), *fragments)
    assert not (tmp_path / "models" / "farm").exists()


def test_min_images_drops_small_classes(tmp_path):
    build_one_photo_class(tmp_path / "dataset" / "farm")
    assert training.main(train_args(tmp_path, *SMALL, "-e", "1", "--min-images", "3")) == 0
    record = json.loads((tmp_path / "models" / "farm" / "training.json").read_text(encoding="utf-8"))
    assert "solo" not in record["class_names"]


def test_broken_photos_skipped_and_counted(tmp_path):
    root = tmp_path / "dataset" / "farm"
    make_granja(root)
    good = root / "rex" / "ñandú 0.jpg"
    (root / "rex" / "cut.jpg").write_bytes(good.read_bytes()[:300])
    (root / "rex" / "empty.jpg").write_bytes(b"")
    (root / "rex" / "text.png").write_text("not a png")
    (root / "__MACOSX").mkdir()
    (root / "rex" / "._ñandú 0.jpg").write_bytes(b"\x00\x05\x16\x07")
    (root / "rex" / "Thumbs.db").write_bytes(b"junk")
    (root / ".ipynb_checkpoints").mkdir()

    result = run_training(tmp_path, "-e", "1")

    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("cut.jpg", "empty.jpg", "text.png"):
        assert sum(name in line for line in result.stderr.splitlines() if "WARNING" in line) == 1
    assert "skipped 3 photos" in result.stderr
    record = json.loads((tmp_path / "models" / "farm" / "training.json").read_text(encoding="utf-8"))
    assert len(record["skipped_photos"]) == 3
    assert sum(record["split_sizes"].values()) == 18
    assert record["ignored_files"] == 4


def test_model_files_disagree(tmp_path):
    make_granja(tmp_path / "dataset" / "farm")
    assert training.main(train_args(tmp_path, *SMALL, "-e", "1")) == 0
    folder = tmp_path / "models" / "farm"
    photo = tmp_path / "dataset" / "farm" / "rex" / "ñandú 1.jpg"

    def run_testing():
        return subprocess.run([sys.executable, "testing.py", "-ng", "farm", "--models-dir", str(tmp_path / "models"),
                               "--img", str(photo)], cwd=REPO, capture_output=True, text=True, check=False)

    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))
    (folder / "labels.json").write_text(json.dumps({**labels, "extra": 3}), encoding="utf-8")
    assert_one_line_error(run_testing(), "labels.json", "training.json")
    (folder / "labels.json").write_text(json.dumps(labels), encoding="utf-8")

    record = json.loads((folder / "training.json").read_text(encoding="utf-8"))
    (folder / "training.json").write_text(json.dumps({**record, "backbone_layer": "vggface_resnet50",
                                                      "backbone": "resnet50"}), encoding="utf-8")
    assert_one_line_error(run_testing(), "resnet50", "model.keras")


def test_second_training_stops_on_lock(tmp_path):
    from utils.artifacts import granja_lock

    make_granja(tmp_path / "dataset" / "farm")
    with granja_lock(tmp_path / "models", "farm"):
        result = run_training(tmp_path, "-e", "1")
    assert_one_line_error(result, "another training of granja 'farm' is running", ".farm.lock")


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def epochs_logged(tmp_path):
    logs = list((tmp_path / "logs" / "farm").glob("*/epochs.csv"))
    return len(logs[0].read_text().splitlines()) - 1 if logs else 0


def test_ctrl_c_then_resume(tmp_path):
    make_granja(tmp_path / "dataset" / "farm", photos_per_class=8)
    process = subprocess.Popen([sys.executable, "training.py",
                                *train_args(tmp_path, *SMALL, "-e", "6", "--patience", "6", "--no-cache")],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: epochs_logged(tmp_path) >= 2, timeout=300)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "no model was saved" in stderr
    assert "--resume" in stderr
    assert not (tmp_path / "models" / "farm").exists()
    split_before = json.loads((tmp_path / "models" / ".farm.resume" / "split.json").read_text(encoding="utf-8"))
    done = epochs_logged(tmp_path)

    # A backup cut short (as by a crash during its write) gives a one-line error, not a traceback.
    shutil.copytree(tmp_path / "models", tmp_path / "damaged")
    weights = next((tmp_path / "damaged" / ".farm.resume" / "backup").glob("*.weights.h5"))
    weights.write_bytes(weights.read_bytes()[:20000])
    damaged = subprocess.run([sys.executable, "training.py", "-ng", "farm", "--dataset-dir", str(tmp_path / "dataset"),
                              "--models-dir", str(tmp_path / "damaged"), "--resume", "--quiet"],
                             cwd=REPO, capture_output=True, text=True, check=False)
    assert damaged.returncode == 2, damaged.stderr[-2000:]
    assert "cannot be loaded" in damaged.stderr.strip().splitlines()[-1]
    assert "Traceback" not in damaged.stderr

    result = subprocess.run([sys.executable, "training.py", "-ng", "farm", "--dataset-dir",
                             str(tmp_path / "dataset"), "--models-dir", str(tmp_path / "models"), "--resume",
                             "--quiet"], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert epochs_logged(tmp_path) == 6
    assert f"Epoch {done + 1}/6" in result.stdout or f"Epoch {done + 1}/6" in result.stderr
    split_after = json.loads((tmp_path / "models" / "farm" / "split.json").read_text(encoding="utf-8"))
    assert split_after == split_before
    assert not (tmp_path / "models" / ".farm.resume").exists()

    # Early stopping carries its best val_loss over the interruption, and the record covers the
    # epochs before it too.
    assert "early stopping resumes at best val_loss" in result.stderr
    run = next((tmp_path / "logs" / "farm").iterdir())
    with open(run / "epochs.csv", newline="", encoding="utf-8") as stream:
        val_losses = [float(row["val_loss"]) for row in csv.DictReader(stream)]
    metrics = json.loads((tmp_path / "models" / "farm" / "training.json").read_text(encoding="utf-8"))["metrics"]
    assert metrics["epochs_run"] == 6
    assert metrics["best_epoch"] == val_losses.index(min(val_losses)) + 1


def test_resume_without_backup(tmp_path):
    make_granja(tmp_path / "dataset" / "farm")
    assert_one_line_error(run_training(tmp_path, "--resume"), "nothing to resume")


def test_kill_leaves_a_loadable_model(tmp_path):
    """SIGKILL at several moments of a second run: the folder holds the first model or the second."""
    from utils.artifacts import load_trained

    make_granja(tmp_path / "dataset" / "farm")
    assert training.main(train_args(tmp_path, *SMALL, "-e", "1")) == 0
    first = json.loads((tmp_path / "models" / "farm" / "training.json").read_text(encoding="utf-8"))["trained_at"]
    stamps = {first}
    for delay in (3.0, 6.0, 9.0, 12.0, 16.0):
        process = subprocess.Popen([sys.executable, "training.py", *train_args(tmp_path, *SMALL, "-e", "2")],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.kill()
        process.wait()
        (tmp_path / "models" / ".farm.lock").unlink(missing_ok=True)
        trained = load_trained(tmp_path / "models", "farm")
        assert trained.model.output_shape[-1] == 3
        stamps.add(trained.metadata["trained_at"])
    assert first in stamps


def test_same_seed_same_split_and_metrics(tmp_path):
    make_granja(tmp_path / "dataset" / "farm")
    results = []
    for run in range(2):
        models = tmp_path / f"models{run}"
        assert training.main(["-ng", "farm", "--dataset-dir", str(tmp_path / "dataset"), "--models-dir",
                              str(models), "--logs-dir", str(tmp_path / "logs"), *SMALL, "-e", "2", "--quiet"]) == 0
        results.append((json.loads((models / "farm" / "split.json").read_text(encoding="utf-8")),
                        json.loads((models / "farm" / "training.json").read_text(encoding="utf-8"))["metrics"]))
    assert results[0][0] == results[1][0]
    for key in ("test_accuracy", "test_loss", "best_val_loss", "best_epoch"):
        assert results[0][1][key] == results[1][1][key], key


def test_progress_lines_held_until_released():
    import io
    import logging

    from utils.cli import DeferredInfoHandler

    stream = io.StringIO()
    handler = DeferredInfoHandler(stream, window=60)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger("held-lines-test")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("decoding 7 photos")
        assert stream.getvalue() == ""
        logger.warning("dropping class 'b'")
        assert stream.getvalue() == "WARNING: dropping class 'b'\n"
        handler.write_held()
        assert stream.getvalue().splitlines() == ["WARNING: dropping class 'b'", "INFO: decoding 7 photos"]
        logger.info("after the window")
        assert stream.getvalue().splitlines()[-1] == "INFO: after the window"

        dropped = io.StringIO()
        handler.close()
        logger.removeHandler(handler)
        handler = DeferredInfoHandler(dropped, window=60)
        logger.addHandler(handler)
        logger.info("never shown")
        handler.drop_held()
        assert dropped.getvalue() == ""
    finally:
        handler.close()
        logger.removeHandler(handler)


def test_empty_unknown_dir_stops_before_training(tmp_path):
    make_granja(tmp_path / "dataset" / "farm")
    (tmp_path / "strangers").mkdir()
    assert_one_line_error(run_training(tmp_path, "--unknown-dir", str(tmp_path / "strangers")), "no photos in folder")
    assert not (tmp_path / "logs").exists()


def make_background(root, animals=5, photos=2):
    """Photos of animals outside the granja, one folder per animal."""
    for animal in range(animals):
        for photo in range(photos):
            write_photo(root / f"stray {animal}" / f"{photo}.jpg", seed=100 + 10 * animal + photo)
    return root


def background_with_a_granja_animal(root):
    make_background(root)
    write_photo(root / "rex" / "0.jpg", seed=1)
    return root


def background_with_a_granja_photo(root, tmp):
    """A background set with one photo of the granja's rex, copied under another name."""
    make_background(root)
    shutil.copy(next((tmp / "dataset" / "farm" / "rex").iterdir()), root / "stray 0" / "renamed.jpg")
    return root


def background_with_a_repeated_animal(root):
    """A background set in which one animal's folder is linked again under another name."""
    make_background(root)
    (root / "stray 0 again").symlink_to(root / "stray 0", target_is_directory=True)
    return root


@pytest.mark.parametrize("build, fragment", [
    (lambda tmp: tmp / "missing", "is not a folder"),
    (lambda tmp: make_background(tmp / "strays", animals=4), "has 4 animal folders with photos; give at least 5"),
    (lambda tmp: background_with_a_granja_animal(tmp / "strays"), "folders named like the granja's"),
    (lambda tmp: make_background(tmp / "strangers"), "are both"),
    (lambda tmp: make_background(tmp / "strays"), "share animal folders ('stray 0')"),
    (lambda tmp: background_with_a_granja_photo(tmp / "strays", tmp), "contains a photo of the granja's animals: "),
    (lambda tmp: make_background(tmp / "strays"), "contains a photo of --unknown-dir"),
    (lambda tmp: tmp / "empty", "--background-dir: no class folders"),
    (lambda tmp: background_with_a_repeated_animal(tmp / "strays"), "has the same photo in two animal folders"),
])
def test_bad_background_dir_stops_before_training(tmp_path, build, fragment):
    make_granja(tmp_path / "dataset" / "farm")
    (tmp_path / "empty").mkdir()
    background = build(tmp_path)
    flags = ["--background-dir", str(background)]
    if fragment == "are both":
        flags += ["--unknown-dir", str(background)]
    if fragment.startswith("share"):
        write_photo(tmp_path / "strangers" / "stray 0" / "0.jpg", seed=3)
        flags += ["--unknown-dir", str(tmp_path / "strangers")]
    if "--unknown-dir" in fragment:
        shutil.copytree(background / "stray 1", tmp_path / "strangers" / "new name")
        flags += ["--unknown-dir", str(tmp_path / "strangers")]
    assert_one_line_error(run_training(tmp_path, *flags), fragment)
    assert not (tmp_path / "logs").exists()


def test_unknown_dir_with_a_granja_animal_stops(tmp_path):
    make_granja(tmp_path / "dataset" / "farm")
    write_photo(tmp_path / "strangers" / "rex" / "0.jpg", seed=1)
    write_photo(tmp_path / "strangers" / "stray" / "0.jpg", seed=2)
    assert_one_line_error(run_training(tmp_path, "--unknown-dir", str(tmp_path / "strangers")),
                          "folders named like the granja's animals ('rex')")
    assert not (tmp_path / "logs").exists()


def test_background_without_enough_decodable_animals(tmp_path):
    make_granja(tmp_path / "dataset" / "farm")
    background = make_background(tmp_path / "strays", animals=4)
    (background / "broken").mkdir()
    (background / "broken" / "0.jpg").write_text("not a photo")
    result = run_training(tmp_path, "-e", "1", "--background-dir", str(background))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipping a background photo: cannot decode" in result.stderr
    assert "only 4 of the animals in --background-dir" in result.stderr
    record = json.loads((tmp_path / "models" / "farm" / "training.json").read_text(encoding="utf-8"))
    assert record["open_set"]["validation_unknowns"] == "held_out_classes"
    assert "identity_cosine" not in record["open_set"]["thresholds"]
    assert record["open_set"]["background"]["ignored"] == "too few animals with photos that decode"
