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
    drops the last, smaller batch: tf.distribute fails on a training batch that does not split
    evenly across replicas, and with reshuffling every photo is still seen over the epochs.
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
