"""Input preprocessing per backbone, as a NumPy function and as a Keras layer inside the model.

Every saved model starts with a ``Preprocess`` layer, so it takes RGB pixels in [0, 255] and
training, testing and Grad-CAM cannot disagree on preprocessing. ``training.json`` records the
mode name as well.
"""

import keras
import numpy as np

# Per-channel means in BGR order, subtracted after RGB is flipped to BGR, with no scaling.
# Version 1 goes with the VGG16 weights trained on 2,622 identities (VGGFace), version 2 with
# the ResNet50 and SENet50 weights trained on 8,631 identities (VGGFace2); both are the values
# of keras_vggface.utils.preprocess_input in keras-vggface 0.6.
VGGFACE_BGR_MEANS = {
    "vggface1": (93.5940, 104.7624, 129.1863),
    "vggface2": (91.4953, 103.8827, 131.0912),
}

# Every mode: a one-line description for help text and training.json.
MODES = {
    "vggface1": "RGB to BGR, minus the VGGFace version 1 channel means",
    "vggface2": "RGB to BGR, minus the VGGFace version 2 channel means",
    "mobilenet_v2": "scale to [-1, 1] (keras.applications.mobilenet_v2.preprocess_input)",
    "efficientnet_v2": "none: keras.applications EfficientNetV2 rescales inside the network",
    "none": "none: the network takes RGB pixels in [0, 255]",
}


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is a known preprocessing mode, else raise ValueError naming the valid ones."""
    if mode not in MODES:
        raise ValueError(f"preprocessing mode must be one of {', '.join(MODES)} (got {mode!r})")
    return mode


def preprocess(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Apply a backbone's preprocessing to RGB pixels in [0, 255].

    Args:
        pixels: array of shape (..., 3), RGB, any numeric dtype.
        mode: a key of ``MODES``.

    Returns:
        float32 array of the same shape.
    """
    check_mode(mode)
    x = np.asarray(pixels, dtype=np.float32)
    if mode in VGGFACE_BGR_MEANS:
        return x[..., ::-1] - np.asarray(VGGFACE_BGR_MEANS[mode], dtype=np.float32)
    if mode == "mobilenet_v2":
        return x / 127.5 - 1.0
    return x.copy()


@keras.saving.register_keras_serializable(package="granja")
class Preprocess(keras.layers.Layer):
    """The backbone's input preprocessing as the first layer of a model (no weights)."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        self.mode = check_mode(mode)

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float32")
        if self.mode in VGGFACE_BGR_MEANS:
            x = keras.ops.flip(x, axis=-1)
            return x - keras.ops.convert_to_tensor(VGGFACE_BGR_MEANS[self.mode], dtype="float32")
        if self.mode == "mobilenet_v2":
            return x / 127.5 - 1.0
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
