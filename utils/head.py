"""The classifier around a backbone (preprocessing, pooling, dense head) and the freeze policy."""

import difflib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import keras

from utils.errors import UserError
from utils.preprocessing import Preprocess

logger = logging.getLogger(__name__)

POOLINGS = ("flatten", "avg", "max")
DEFAULT_HIDDEN = (512, 256, 128)


def build_classifier(backbone: keras.Model, *, input_size: int, preprocessing: str, pooling: str,
                     hidden: Sequence[int], dropout: float, num_classes: int) -> keras.Model:
    """Wrap a backbone into a model that takes RGB pixels in [0, 255] and returns class probabilities.

    Layers: input, ``Preprocess``, the backbone (nested as one layer), pooling of a 4-D feature
    map, Dense layers ``fc1``, ``fc2``, ... with ReLU (each followed by Dropout when ``dropout`` > 0),
    and the softmax layer ``out``.
    """
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = Preprocess(preprocessing, name="preprocess")(inputs)

    # training=False keeps the backbone's batch normalisation in inference mode even while
    # fine-tuning, so small batches of a few animals do not overwrite statistics learned on millions
    # of photos (the Keras transfer-learning guide does the same).
    x = backbone(x, training=False)

    if len(x.shape) == 4:
        poolers = {
            "flatten": keras.layers.Flatten(name="flatten"),
            "avg": keras.layers.GlobalAveragePooling2D(name="avg_pool"),
            "max": keras.layers.GlobalMaxPooling2D(name="max_pool"),
        }
        x = poolers[pooling](x)
    for index, units in enumerate(hidden, start=1):
        x = keras.layers.Dense(units, activation="relu", name=f"fc{index}")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"dropout{index}")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="out")(x)
    return keras.Model(inputs, outputs, name="classifier")


def weighted_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """List the layers that hold weights, in order, looking inside nested models."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(weighted_layers(layer))
        elif layer.weights:
            found.append(layer)
    return found


@dataclass(frozen=True)
class FreezeSummary:
    """Counts of trainable and frozen weighted layers after a freeze policy."""

    trainable: int
    frozen: int
    first_trainable: str | None


def parse_freeze(text: str) -> int | None:
    """Parse ``--freeze``: "none" or an integer; None means nothing is frozen."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--freeze must be an integer or 'none' (got {text!r}); for example -4 trains "
                        "only the head") from None


def apply_freeze(model: keras.Model, freeze: int | None) -> FreezeSummary:
    """Set ``trainable`` on every weighted layer according to the freeze policy.

    The policy counts the layers that hold weights, in order through the nested backbone: a
    positive N freezes the first N, a negative N freezes all but the last |N|, and 0 or None
    freezes nothing. The default -4 leaves the four head layers fc1, fc2, fc3 and out trainable.

    Raises:
        UserError: |N| is larger than the number of weighted layers.
    """
    layers = weighted_layers(model)
    count = len(layers)
    if freeze is None or freeze == 0:
        frozen_count = 0
    elif abs(freeze) > count:
        raise UserError(f"--freeze {freeze} is out of range: the model has {count} layers with weights; "
                        f"use a value from -{count} to {count}")
    elif freeze > 0:
        frozen_count = freeze
    else:
        frozen_count = count + freeze

    for index, layer in enumerate(layers):
        layer.trainable = index >= frozen_count
    first = layers[frozen_count].name if frozen_count < count else None
    return FreezeSummary(trainable=count - frozen_count, frozen=frozen_count, first_trainable=first)


def suggest_names(name: str, candidates: Sequence[str], limit: int = 5) -> str:
    """Return up to ``limit`` candidate names closest to ``name``, comma-separated, for error messages."""
    close = difflib.get_close_matches(name, candidates, n=limit, cutoff=0.3)
    return ", ".join(close or list(candidates)[-limit:])
