"""The backbone registry: one entry per ``-m`` name, with its builder, preprocessing and defaults.

A backbone is a Keras model that maps a preprocessed image of shape (size, size, 3) to features:
a 4-D feature map, or a vector for the VGGFace networks built with their original top layers.
The classifier nests it as one layer, after a ``Preprocess`` layer and before the pooling and head.
"""

import logging
import urllib.error
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras

from utils.errors import UserError

logger = logging.getLogger(__name__)

WEIGHTS_CHOICES_HELP = "vggface, imagenet, none, or a path to a local weights file"


@dataclass(frozen=True)
class BackboneSpec:
    """What the trainer, the tester and Grad-CAM need to know about one backbone.

    Attributes:
        name: the ``-m`` value.
        family: "vggface" for our own VGGFace networks, "keras" for keras.applications ones.
        preprocessing: a mode of ``utils.preprocessing.MODES``.
        default_pooling: pooling between the feature map and the head.
        default_weights: "vggface" or "imagenet".
        gradcam_layer: the last convolutional layer's name, the default Grad-CAM target.
        min_input_size: the smallest square input the network accepts without ``--include-top``.
        description: one line for ``--help``.
    """

    name: str
    family: str
    preprocessing: str
    default_pooling: str
    default_weights: str
    gradcam_layer: str
    min_input_size: int
    description: str


def _keras_application(name: str) -> Callable[..., keras.Model]:
    """Return the keras.applications constructor for a registry name."""
    constructors = {
        "mobilenetv2": keras.applications.MobileNetV2,
        "efficientnetv2b0": keras.applications.EfficientNetV2B0,
    }
    return constructors[name]


def _vggface_specs() -> dict[str, BackboneSpec]:
    """Registry entries of the three VGGFace networks."""
    from utils.backbones import vggface

    descriptions = {
        "vgg16": "VGGFace VGG16 (2,622 identities)",
        "resnet50": "VGGFace2 ResNet50 (8,631 identities)",
        "senet50": "VGGFace2 SENet50 (8,631 identities)",
    }
    return {
        arch: BackboneSpec(
            name=arch,
            family="vggface",
            preprocessing=vggface.PREPROCESSING[arch],
            default_pooling="flatten" if arch == "vgg16" else "avg",
            default_weights="vggface",
            gradcam_layer=vggface.GRADCAM_LAYER[arch],
            min_input_size=vggface.MIN_INPUT_SIZE[arch],
            description=descriptions[arch],
        )
        for arch in ("vgg16", "resnet50", "senet50")
    }


KERAS_SPECS = {
    "mobilenetv2": BackboneSpec(
        name="mobilenetv2",
        family="keras",
        preprocessing="mobilenet_v2",
        default_pooling="avg",
        default_weights="imagenet",
        gradcam_layer="out_relu",
        min_input_size=32,
        description="keras.applications MobileNetV2 (alpha 1.0)",
    ),
    "efficientnetv2b0": BackboneSpec(
        name="efficientnetv2b0",
        family="keras",
        preprocessing="efficientnet_v2",
        default_pooling="avg",
        default_weights="imagenet",
        gradcam_layer="top_activation",
        min_input_size=32,
        description="keras.applications EfficientNetV2-B0",
    ),
}

BACKBONES: dict[str, BackboneSpec] = {**_vggface_specs(), **KERAS_SPECS}


def get_spec(name: str) -> BackboneSpec:
    """Return the registry entry for ``name``, or raise UserError listing the valid names."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserError(f"--model must be one of {', '.join(BACKBONES)} (got {name!r})") from None


def resolve_weights(spec: BackboneSpec, weights: str | None) -> str:
    """Turn a ``--weights`` value into "vggface", "imagenet", "none" or an existing file path."""
    if weights is None:
        return spec.default_weights
    if weights in ("vggface", "imagenet", "none"):
        if weights == "vggface" and spec.family != "vggface":
            raise UserError(f"--weights vggface is only for vgg16, resnet50 and senet50 (got -m {spec.name}); "
                            "use --weights imagenet or a local file")
        if weights == "imagenet" and spec.family != "keras":
            raise UserError(f"--weights imagenet is only for the keras.applications backbones (got -m {spec.name}); "
                            "use --weights vggface or a local file")
        return weights
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"--weights file not found: {weights}; give an existing weights file or one of "
                        "vggface, imagenet, none")
    return str(path)


def build_backbone(spec: BackboneSpec, input_size: int, weights: str, *, include_top: bool = False) -> keras.Model:
    """Build a backbone and load its weights.

    Args:
        spec: the registry entry.
        input_size: side of the square input in pixels.
        weights: a value returned by ``resolve_weights``.
        include_top: for the VGGFace networks, keep the original dense layers (fc6/fc7 or the
            pooled 2,048 values), without the identity classifier.

    Raises:
        UserError: the input size is too small, the weights cannot be fetched, or the file does
            not fit the network.
    """
    if input_size < spec.min_input_size:
        raise UserError(f"--input-size {input_size} is too small for {spec.name}; "
                        f"use at least {spec.min_input_size}")
    if weights == "none":
        logger.warning("training %s from random weights (--weights none): accuracy will be poor", spec.name)

    if spec.family == "vggface":
        from utils.backbones import vggface

        return vggface.vggface_backbone(
            spec.name, input_size, None if weights == "none" else weights, include_top=include_top
        )

    if include_top:
        raise UserError(f"--include-top is only for vgg16, resnet50 and senet50 (got -m {spec.name})")
    constructor = _keras_application(spec.name)
    shape = (input_size, input_size, 3)
    if weights == "imagenet":
        try:
            return constructor(input_shape=shape, include_top=False, weights="imagenet")
        except Exception as err:  # keras.utils.get_file wraps download failures in a plain Exception.
            if not _looks_like_download_error(err):
                raise
            raise UserError(
                f"cannot download the ImageNet weights of {spec.name} ({' '.join(str(err).split())}); "
                f"when offline pass --weights PATH to a local {spec.name} weights file"
            ) from err

    model = constructor(input_shape=shape, include_top=False, weights=None)
    if weights != "none":
        try:
            # Keras warns once per layer it cannot match before raising, so the error below reports it once.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.load_weights(weights)
        except (ValueError, OSError, KeyError) as err:
            reason = " ".join(str(err).split()).split(". ")[0]
            raise UserError(f"--weights {weights} does not fit {spec.name} without top ({reason}); "
                            f"give a weights file saved from {spec.name} without its top layers") from err
    return model


def _looks_like_download_error(err: BaseException) -> bool:
    """Return True when an exception from keras.applications came from fetching the weights file."""
    text = str(err).lower()
    return isinstance(err, (urllib.error.URLError, ConnectionError, TimeoutError)) or any(
        word in text for word in ("url fetch failure", "urlopen", "name or service", "temporary failure",
                                  "network is unreachable", "connection")
    )
