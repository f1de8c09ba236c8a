"""Training the head on cached backbone features when the backbone is frozen.

With a frozen backbone, every epoch of a plain fit pushes each photo through the whole backbone
again. Here the backbone (with preprocessing and pooling) runs once per photo and per augmented
view, the results are cached on disk, and only the dense head trains. The head's layers are the
very layer objects of the full model, so training them updates the full model in place.
"""

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from utils.augment import AugmentConfig, build_augmenter
from utils.inference import file_sha256
from utils.pipeline import pad_for_replicas, replica_count

logger = logging.getLogger(__name__)


def split_at_head(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Split a classifier into a feature extractor and a head that share the model's layers.

    The head starts at the first top-level Dense layer (``fc1``, or ``out`` without hidden
    layers). Returns ``(extractor, head)``: the extractor maps photos to pooled features; the head
    maps features to class probabilities.
    """
    layers = model.layers
    start = next(index for index, layer in enumerate(layers) if isinstance(layer, keras.layers.Dense))
    extractor = keras.Model(model.inputs[0], layers[start].input, name="feature_extractor")
    features = keras.Input(shape=tuple(extractor.output.shape[1:]), name="features")
    x = features
    for layer in layers[start:]:
        x = layer(x)
    return extractor, keras.Model(features, x, name="head")


def penultimate_model(model: keras.Model) -> keras.Model:
    """Map pooled features to the input of the classifier's last Dense layer (``out``).

    These are the head's own features, trained to tell the granja's animals apart; with no hidden
    layers they are the pooled features themselves.
    """
    layers = model.layers
    start = next(index for index, layer in enumerate(layers) if isinstance(layer, keras.layers.Dense))
    features = keras.Input(shape=tuple(layers[start].input.shape[1:]), name="features")
    x = features
    for layer in layers[start:-1]:
        x = layer(x)
    return keras.Model(features, x, name="penultimate")


def head_is_only_trainable(model: keras.Model) -> bool:
    """Return True when no layer before the head has trainable weights."""
    extractor, _ = split_at_head(model)
    return not extractor.trainable_weights


def photo_digest(path: Path) -> str:
    """SHA-256 of a photo file's bytes, the cache key of its features."""
    return file_sha256(path)


def weights_identity(weights: str) -> str:
    """Identify a weights source: its name, or the SHA-256 of a weights file's bytes."""
    return f"file:{photo_digest(Path(weights))}" if os.path.isfile(weights) else weights


class FeatureCache:
    """Feature arrays on disk, one file per photo and kind, under a folder keyed by the extractor.

    The folder name hashes everything that changes the features of a clean photo: backbone,
    weights, input size, top layers, preprocessing and pooling. Augmented views add the
    augmentation settings, the number of views and the seed to the file name.
    """

    def __init__(self, root: Path, extractor_key: dict):
        self.key = _digest(extractor_key)
        self.folder = root / self.key
        self.hits = 0
        self.misses = 0

    def path(self, photo: str, kind: str) -> Path:
        return self.folder / f"{photo}.{kind}.npy"

    def get(self, photo: str, kind: str) -> np.ndarray | None:
        path = self.path(photo, kind)
        try:
            array = np.load(path, allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError):
            self.misses += 1
            return None
        self.hits += 1
        return array

    def put(self, photo: str, kind: str, array: np.ndarray) -> None:
        """Store an array atomically, so a killed run never leaves a half-written entry."""
        self.folder.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{photo}.", suffix=".npy", dir=self.folder)
        try:
            with os.fdopen(handle, "wb") as stream:
                np.save(stream, array, allow_pickle=False)
            os.replace(temp, self.path(photo, kind))
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


def _digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def augmented_kind(augment: AugmentConfig, views: int, seed: int) -> str:
    """Cache file kind of ``views`` augmented views drawn with these settings and seed."""
    return "views-" + _digest({"augment": augment.to_dict(), "views": views, "seed": seed})


def compute_features(extractor: keras.Model, images: np.ndarray, batch_size: int, *,
                     augment: AugmentConfig | None = None, views: int = 1, seed: int = 0) -> np.ndarray:
    """Run photos through the extractor, clean or as augmented views.

    Returns:
        float32 array of shape (len(images), views, features) with ``augment``, else
        (len(images), features).
    """
    if len(images) == 0:
        shape = (0, views, *extractor.output.shape[1:]) if augment else (0, *extractor.output.shape[1:])
        return np.zeros(shape, dtype=np.float32)
    count = len(images)
    replicas = replica_count()
    if replicas > 1:
        images = images[pad_for_replicas(count, replicas)]

    def run(dataset: tf.data.Dataset) -> np.ndarray:
        return extractor.predict(dataset.prefetch(tf.data.AUTOTUNE), verbose=0).astype(np.float32)

    clean = tf.data.Dataset.from_tensor_slices(images).batch(batch_size).map(
        lambda x: tf.cast(x, tf.float32), num_parallel_calls=tf.data.AUTOTUNE)
    if augment is None:
        return run(clean)[:count]

    # One pass over the photos repeated ``views`` times, through one augmenter whose random state
    # advances from batch to batch, so every view differs. Tracing the augmentation graph once
    # instead of once per view saves seconds, and the sequential map keeps a seeded run repeatable.
    augmenter = build_augmenter(augment, seed=seed)
    augmented = clean.repeat(views).map(lambda x: augmenter(x, training=True))
    stacked = run(augmented).reshape(views, len(images), -1)
    return np.ascontiguousarray(stacked.transpose(1, 0, 2)[:count])


def cached_features(cache: FeatureCache | None, digests: Sequence[str], extractor: keras.Model,
                    images: np.ndarray, batch_size: int, *, augment: AugmentConfig | None = None,
                    views: int = 1, seed: int = 0) -> np.ndarray:
    """Features of each photo, from the cache where present; computes and stores the rest."""
    kind = "clean" if augment is None else augmented_kind(augment, views, seed)
    found = [cache.get(digest, kind) if cache is not None else None for digest in digests]
    missing = [index for index, array in enumerate(found) if array is None]
    if missing:
        computed = compute_features(extractor, images[missing], batch_size, augment=augment, views=views,
                                    seed=seed)
        for index, array in zip(missing, computed):
            found[index] = array
            if cache is not None:
                cache.put(digests[index], kind, array)
    return np.stack(found) if found else np.zeros((0,), dtype=np.float32)


def view_dataset(features: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int, *,
                 seed: int, drop_remainder: bool = False) -> tf.data.Dataset:
    """Training batches that draw one random view of each photo per epoch, shuffled."""
    views = features.shape[1]
    dataset = tf.data.Dataset.from_tensor_slices((features, labels))
    dataset = dataset.shuffle(len(features), seed=seed, reshuffle_each_iteration=True)
    generator = tf.random.Generator.from_seed(seed)

    def pick(stack, label):
        view = generator.uniform((), 0, views, dtype=tf.int32)
        return tf.gather(stack, view), tf.one_hot(label, num_classes)

    return dataset.map(pick).batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def feature_dataset(features: np.ndarray, labels: np.ndarray, num_classes: int,
                    batch_size: int) -> tf.data.Dataset:
    """Batches of clean features with one-hot labels, in order."""
    dataset = tf.data.Dataset.from_tensor_slices((features, tf.one_hot(labels, num_classes)))
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
