"""A training loop for ``tf.distribute.MultiWorkerMirroredStrategy``.

Keras 3's ``fit()`` does not run under this strategy (measured with TensorFlow 2.21 and Keras
3.15). Before the first step it reduces a batch eagerly across workers, which fails with "Attempt
to convert a value (PerReplica ...)". It also averages scalar metrics along an axis they lack.
This loop does what ``fit()`` would: one synchronous step per batch across all
workers, loss and accuracy summed over every replica, validation after each epoch, and the usual
callbacks (early stopping, checkpoints, backups, TensorBoard, CSV log). Every worker sees the same
summed metrics, so callbacks such as early stopping decide alike on every worker.
"""

import keras
import numpy as np
import tensorflow as tf


def fit_multiworker(model: keras.Model, train_data: tf.data.Dataset, val_data: tf.data.Dataset, *,
                    epochs: int, callbacks: list, verbose: int | str) -> keras.callbacks.History:
    """Train a compiled ``model`` with categorical cross-entropy under the current strategy.

    Every batch of both datasets must split evenly across the replicas (see
    ``utils.pipeline.pad_for_replicas``), so that every worker runs the same number of steps.

    Returns:
        The History callback, as ``fit()`` returns it.
    """
    strategy = tf.distribute.get_strategy()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_batches = strategy.experimental_distribute_dataset(train_data.with_options(options))
    val_batches = strategy.experimental_distribute_dataset(val_data.with_options(options))
    loss_function = keras.losses.CategoricalCrossentropy(reduction=None)
    optimizer = model.optimizer
    with strategy.scope():
        optimizer.build(model.trainable_variables)

    def sums(labels, probabilities):
        losses = loss_function(labels, probabilities)
        correct = tf.cast(tf.equal(tf.argmax(labels, -1), tf.argmax(probabilities, -1)), tf.float32)
        return tf.reduce_sum(losses), tf.reduce_sum(correct), tf.cast(tf.shape(labels)[0], tf.float32)

    def train_replica(images, labels):
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            losses = loss_function(labels, probabilities)
            loss = tf.nn.compute_average_loss(losses)
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return sums(labels, probabilities)

    def test_replica(images, labels):
        return sums(labels, model(images, training=False))

    @tf.function
    def train_step(batch):
        return [strategy.reduce("SUM", value, axis=None) for value in strategy.run(train_replica, args=batch)]

    @tf.function
    def test_step(batch):
        return [strategy.reduce("SUM", value, axis=None) for value in strategy.run(test_replica, args=batch)]

    def run_epoch(step_function, batches, on_batch_end=None):
        totals = np.zeros(3)
        for index, batch in enumerate(batches):
            totals += [float(value) for value in step_function(batch)]
            if on_batch_end is not None:
                on_batch_end(index, {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]})
        return {"loss": totals[0] / max(totals[2], 1), "accuracy": totals[1] / max(totals[2], 1)}

    steps = int(train_data.cardinality())
    callback_list = keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=verbose != 0,
                                                 model=model, verbose=verbose, epochs=epochs,
                                                 steps=steps if steps > 0 else None)
    model.stop_training = False
    callback_list.on_train_begin()
    # BackupAndRestore sets this when it restored a backup, as fit() reads it.
    initial_epoch = getattr(model, "_initial_epoch", None) or 0
    logs = {}
    for epoch in range(initial_epoch, epochs):
        callback_list.on_epoch_begin(epoch)
        logs = run_epoch(train_step, train_batches, callback_list.on_train_batch_end)
        validation = run_epoch(test_step, val_batches)
        logs.update({f"val_{name}": value for name, value in validation.items()})
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end(logs)
    return model.history
