"""tf.data input pipelines over decoded photos held in memory."""

import numpy as np
import tensorflow as tf

from utils.augment import AugmentConfig, build_augmenter


def make_dataset(images: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int, *,
                 shuffle: bool = False, augment: AugmentConfig | None = None,
                 seed: int | None = None, drop_remainder: bool = False) -> tf.data.Dataset:
    """Batch uint8 photos with one-hot labels; shuffle and augment on the fly for training.

    Augmentation runs on whole batches inside the tf.data graph (each photo gets its own random
    transform), in parallel with the model, so no Python code runs per photo. ``drop_remainder``
    drops the last, smaller batch (see ``training_batch``).
    """
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    if augment is not None and augment.enabled:
        augmenter = build_augmenter(augment, seed=seed)
        dataset = dataset.map(lambda x, y: (augmenter(tf.cast(x, tf.float32), training=True), y),
                              num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), tf.one_hot(y, num_classes)),
                          num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def replica_count() -> int:
    """Number of replicas that the current tf.distribute strategy splits each batch across (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def pad_for_replicas(count: int, replicas: int) -> np.ndarray:
    """Indices ``0..count-1`` followed by repeats of the first ones, up to a multiple of ``replicas``.

    tf.distribute fails on a batch that does not split evenly across replicas (an AddN shape
    error in TensorFlow 2.21). With a batch size that is a multiple of ``replicas``, padding the
    photos to a multiple of it makes every batch, the last one included, split evenly. Outputs
    for the repeated photos are cut off again by the caller.
    """
    padded = -(-count // replicas) * replicas
    return np.arange(padded) % max(count, 1)


def training_batch(count: int, batch_size: int, replicas: int) -> tuple[int, bool]:
    """Batch size and ``drop_remainder`` for training batches that split evenly across replicas.

    Dropping the last, smaller batch costs nothing with reshuffling: every photo is still seen
    over the epochs.
    """
    if replicas == 1:
        return batch_size, False
    return max(replicas, min(batch_size, count // replicas * replicas)), True
