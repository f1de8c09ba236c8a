"""The cached-feature training path, the feature cache and distributed training."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from test_training import make_granja, train_args

import training


def small_model(freeze=-2):
    from utils.backbones import KERAS_SPECS, build_backbone
    from utils.head import apply_freeze, build_classifier

    spec = KERAS_SPECS["mobilenetv2"]
    model = build_classifier(build_backbone(spec, 32, "none"), input_size=32, preprocessing=spec.preprocessing,
                             pooling="avg", hidden=(16,), dropout=0.3, num_classes=3)
    apply_freeze(model, freeze)
    return model


def test_head_on_features_matches_full_model():
    from utils.features import compute_features, split_at_head

    model = small_model()
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    extractor, head = split_at_head(model)
    features = compute_features(extractor, images, batch_size=4)
    direct = model.predict(images.astype(np.float32), verbose=0)
    via_features = head.predict(features, verbose=0)
    np.testing.assert_allclose(via_features, direct, atol=1e-5)


def test_saved_model_scores_like_head(tmp_path):
    """The saved full network gives the scores the head gave on cached features."""
    from utils.artifacts import load_keras_model, save_model_atomic
    from utils.features import compute_features, split_at_head

    model = small_model()
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    extractor, head = split_at_head(model)
    expected = head.predict(compute_features(extractor, images, batch_size=3), verbose=0)
    save_model_atomic(model, tmp_path / "model.keras")
    reloaded = load_keras_model(tmp_path / "model.keras")
    np.testing.assert_allclose(reloaded.predict(images.astype(np.float32), verbose=0), expected, atol=1e-5)


def test_head_only_detection():
    from utils.features import head_is_only_trainable

    assert head_is_only_trainable(small_model(freeze=-2))
    assert not head_is_only_trainable(small_model(freeze=-3))
    assert not head_is_only_trainable(small_model(freeze=None))


def test_augmented_views_differ_and_repeat():
    from utils.augment import AugmentConfig
    from utils.features import compute_features, split_at_head

    extractor, _ = split_at_head(small_model())
    images = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    views = compute_features(extractor, images, 4, augment=AugmentConfig(), views=3, seed=5)
    assert views.shape == (4, 3, extractor.output.shape[-1])
    # Random weights give tiny features, so compare relative to their size.
    assert not np.allclose(views[:, 0], views[:, 1], rtol=1e-3, atol=0)
    again = compute_features(extractor, images, 4, augment=AugmentConfig(), views=3, seed=5)
    np.testing.assert_allclose(views, again, rtol=1e-4, atol=0)


def read_record(tmp_path):
    return json.loads((tmp_path / "models" / "farm" / "training.json").read_text(encoding="utf-8"))


def test_cache_reused_and_invalidated(tmp_path):
    make_granja(tmp_path / "dataset" / "farm", photos_per_class=5)
    base = train_args(tmp_path, "-m", "mobilenetv2", "--weights", "none", "--input-size", "32", "-e", "1",
                      "--hidden", "8", "--views", "2")

    # Entries: the clean features of all 15 photos, and the augmented views of the 9 training photos.
    assert training.main(base) == 0
    first = read_record(tmp_path)["metrics"]
    assert first["training_path"] == "cached_features"
    assert first["features_read"] == 0
    assert first["features_computed"] == 15 + 9

    # Another head and learning rate reuse every entry.
    assert training.main([*base, "--hidden", "4", "--lr", "0.01"]) == 0
    second = read_record(tmp_path)["metrics"]
    assert second["features_read"] == 24
    assert second["features_computed"] == 0

    # A changed training photo is computed again, clean and augmented; the others come from the cache.
    split = json.loads((tmp_path / "models" / "farm" / "split.json").read_text(encoding="utf-8"))
    photo = tmp_path / "dataset" / "farm" / split["train"][0]
    from PIL import Image
    Image.new("RGB", (40, 40), (1, 2, 3)).save(photo)
    assert training.main(base) == 0
    changed = read_record(tmp_path)["metrics"]
    assert changed["features_computed"] == 2
    assert changed["features_read"] == 22

    # Other augmentation settings invalidate the training views only.
    assert training.main([*base, "--rotation", "5"]) == 0
    augmented = read_record(tmp_path)["metrics"]
    assert augmented["features_computed"] == 9
    assert augmented["features_read"] == 15

    # Another input size (a different extractor) misses everything.
    assert training.main([*base[:-6], "--input-size", "36", "-e", "1", "--hidden", "8", "--views", "2"]) == 0
    assert read_record(tmp_path)["metrics"]["features_read"] == 0


def test_no_cache_uses_plain_path(tmp_path):
    make_granja(tmp_path / "dataset" / "farm", photos_per_class=4)
    assert training.main(train_args(tmp_path, "-m", "mobilenetv2", "--weights", "none", "--input-size", "32",
                                     "-e", "1", "--hidden", "8", "--no-cache")) == 0
    assert read_record(tmp_path)["metrics"]["training_path"] == "plain"
    assert not (tmp_path / "models" / "farm" / "cache").exists()


TWO_CPUS = """
import sys
import tensorflow as tf
cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, {repo!r})
"""

STRATEGY_ACCURACY = TWO_CPUS + """
import logging
logging.basicConfig(level=logging.INFO)
import keras
import numpy as np
from utils.training import distribution_scope

# Three classes told apart by their mean colour.
rng = np.random.default_rng(0)
labels = np.repeat(np.arange(3), 40)
images = rng.uniform(0, 0.3, size=(120, 16, 16, 3)).astype("float32")
images[np.arange(120), :, :, labels] += 0.7
for name in ("none", "mirrored"):
    keras.utils.set_random_seed(1)
    with distribution_scope(name, 16):
        model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
                                  keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")])
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    model.fit(images, labels, epochs=30, batch_size=16, verbose=0)
    print(name, model.evaluate(images, labels, verbose=0)[1])
"""


def test_mirrored_strategy_matches_one_device():
    result = subprocess.run([sys.executable, "-c", STRATEGY_ACCURACY.format(repo=str(REPO))],
                            cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MirroredStrategy on 2 replicas" in result.stderr
    accuracy = dict(line.split() for line in result.stdout.splitlines())
    assert float(accuracy["none"]) >= 0.9
    assert float(accuracy["mirrored"]) >= 0.9


def test_multiworker_needs_tf_config(tmp_path, monkeypatch):
    make_granja(tmp_path / "dataset" / "farm", photos_per_class=4)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    result = subprocess.run([sys.executable, "training.py", *train_args(tmp_path, "--strategy", "multiworker",
                             "-m", "mobilenetv2", "--weights", "none", "--input-size", "32")],
                            cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "TF_CONFIG" in result.stderr


MIRRORED_TRAINING = TWO_CPUS + """
sys.path.insert(0, {tests!r})
import training
sys.exit(training.main({args!r}))
"""


@pytest.mark.parametrize("path_flags", [(), ("--no-cache",)])
def test_mirrored_training_with_uneven_splits(tmp_path, path_flags):
    # 7 photos per class: 3 validation and 3 test photos, which do not split across 2 replicas.
    make_granja(tmp_path / "dataset" / "farm", photos_per_class=7)
    args = train_args(tmp_path, "--strategy", "mirrored", "-m", "mobilenetv2", "--weights", "none",
                      "--input-size", "32", "-e", "2", "-bs", "4", "--hidden", "8", *path_flags)
    result = subprocess.run([sys.executable, "-c", MIRRORED_TRAINING.format(repo=str(REPO), tests=str(REPO / "tests"),
                                                                            args=args)],
                            cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MirroredStrategy on 2 replicas" in result.stderr
    record = read_record(tmp_path)
    assert record["split_sizes"] == {"train": 15, "val": 3, "test": 3}
    runs = list((tmp_path / "logs" / "farm").iterdir())
    report = json.loads((runs[0] / "classification_report.json").read_text(encoding="utf-8"))
    assert report["macro avg"]["support"] == 3


def test_mirrored_rejects_uneven_batch(tmp_path):
    make_granja(tmp_path / "dataset" / "farm", photos_per_class=4)
    args = train_args(tmp_path, "--strategy", "mirrored", "-m", "mobilenetv2", "--weights", "none",
                      "--input-size", "32", "-bs", "5")
    code = TWO_CPUS.format(repo=str(REPO)) + f"from utils import cli\nimport training\n" \
        f"sys.exit(cli.run(training.main, {args!r}))\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --batch-size 5 does not split evenly across the 2 replicas of --strategy mirrored; "
        "pass a multiple of 2, for example 4")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_multiworker_two_process_cluster(tmp_path):
    """Two workers on this machine, talking over localhost, train one model; the chief saves it."""
    make_granja(tmp_path / "dataset" / "farm", photos_per_class=7)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    workers = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        workers.append(subprocess.Popen(
            [sys.executable, "training.py", *train_args(tmp_path, "--strategy", "multiworker", "-m", "mobilenetv2",
                                                        "--weights", "none", "--input-size", "32", "-e", "3",
                                                        "-bs", "4", "--hidden", "8")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    assert "CollectiveAllReduceStrategy on 2 replicas" in outputs[0][1]
    # Both workers computed the same synchronised metrics and the same test scores.
    finals = [[line for line in stdout.splitlines() if line.startswith("test accuracy")][0] for stdout, _ in outputs]
    assert finals[0].split(";")[0] == finals[1].split(";")[0]
    assert str(tmp_path / "models" / "farm" / "model.keras") in finals[0]
    # Only the chief's files remain; the other worker's scratch folder is gone.
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == [".farm.lock", "farm"]
    assert (tmp_path / "models" / "farm" / "inference.pb").is_file()
