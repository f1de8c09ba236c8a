"""Grad-CAM and Grad-CAM++ heat maps of a trained classifier, and the overlay that draws them.

A heat map shows which part of a photo raised the score of one class. The functions here take
arrays and return arrays or draw into a given matplotlib figure. They read and write no files,
so ``grad_CAM.py`` owns the paths.

The classifier is the one ``utils.head.build_classifier`` makes: RGB pixels in [0, 255], a
``Preprocess`` layer, the backbone nested as one ``keras.Model`` layer, optional pooling, Dense
layers, and a softmax Dense layer at the end. The target layer lives inside the nested backbone,
so ``build_gradient_model`` rebuilds the path from the photo through that layer to the class
scores before the softmax.

References:
    Selvaraju, Cogswell, Das, Vedantam, Parikh and Batra, "Grad-CAM: Visual Explanations from
    Deep Networks via Gradient-based Localization", ICCV 2017.
    Chattopadhay, Sarkar, Howlader and Balasubramanian, "Grad-CAM++: Generalized Gradient-Based
    Visual Explanations for Deep Convolutional Networks", WACV 2018.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

logger = logging.getLogger(__name__)

METHODS = ("gradcam", "gradcam++")

# Layers that only pool, drop or pass values on. The default target is the last layer before
# them, so that the map keeps the resolution of the last convolution.
_PASS_THROUGH_LAYERS = (
    keras.layers.InputLayer,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.ZeroPadding2D,
)

_CONV_LAYERS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)


@dataclass(frozen=True)
class ClassActivationMap:
    """One photo's heat map for one class.

    Attributes:
        heatmap: float32 array (height, width) in [0, 1] at the target layer's resolution;
            all zeros when nothing in the photo raised the class score.
        class_index: the class the map explains.
        probabilities: float32 array (num_classes,), the model's softmax output for the photo.
    """

    heatmap: np.ndarray
    class_index: int
    probabilities: np.ndarray

    @property
    def probability(self) -> float:
        """The softmax probability of ``class_index``."""
        return float(self.probabilities[self.class_index])


def find_backbone(model: keras.Model, name: str | None = None) -> keras.Model:
    """Return the backbone nested as one layer of ``model``.

    Args:
        model: a classifier built by ``utils.head.build_classifier``.
        name: the backbone layer's name (``backbone_layer`` in ``training.json``). Without it,
            the backbone is the only layer of ``model`` that is itself a ``keras.Model``.

    Raises:
        ValueError: the named layer is missing or is not a model, or without ``name`` there is
            no nested model or more than one.
    """
    if name is not None:
        try:
            layer = model.get_layer(name)
        except ValueError:
            raise ValueError(f"backbone layer {name!r} not found in model {model.name!r}; its layers are "
                             f"{', '.join(layer.name for layer in model.layers)}") from None
        if not isinstance(layer, keras.Model):
            raise ValueError(f"layer {name!r} of model {model.name!r} is a {type(layer).__name__}, "
                             "not a nested backbone model")
        return layer

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise ValueError(f"expected one nested backbone model in {model.name!r} (found {len(nested)}: "
                         f"{', '.join(layer.name for layer in nested) or 'none'}); pass the backbone's name")
    return nested[0]


def _output_rank(layer: keras.layers.Layer) -> int | None:
    """Return the rank of a layer's single output, or None when it has no single output."""
    try:
        output = layer.output
    except (AttributeError, ValueError):
        return None
    if isinstance(output, (list, tuple)):
        return None
    return len(output.shape)


def spatial_layer_names(backbone: keras.Model) -> list[str]:
    """List the backbone's layers whose output is a 4-D feature map, in graph order.

    These are the valid Grad-CAM targets: (batch, height, width, channels) outputs.
    """
    return [layer.name for layer in backbone.layers
            if not isinstance(layer, keras.layers.InputLayer) and _output_rank(layer) == 4]


def find_conv_layer(backbone: keras.Model) -> str:
    """Return the name of the backbone's last convolutional layer, the default Grad-CAM target.

    Going back from the output in graph order, this skips layers without a 4-D output (a
    flattened or pooled top) and layers that only pool or drop values, and returns the first
    layer left. So it includes the batch norm, activation or residual sum that follows the last
    convolution: ``conv5_3`` in VGGFace VGG16 (its ReLU is built in, and ``pool5`` is skipped),
    the last bottleneck block's ReLU in ResNet50 and SENet50, ``out_relu`` in MobileNetV2 and
    ``top_activation`` in EfficientNetV2-B0.

    Raises:
        ValueError: the backbone has no convolution, or none of its layers has a 4-D output.
    """
    if not any(isinstance(layer, _CONV_LAYERS) for layer in backbone.layers):
        raise ValueError(f"backbone {backbone.name!r} has no convolutional layer, so Grad-CAM has no "
                         "feature map to explain")
    for layer in reversed(backbone.layers):
        if isinstance(layer, _PASS_THROUGH_LAYERS):
            continue
        if _output_rank(layer) == 4:
            return layer.name
    raise ValueError(f"no layer of backbone {backbone.name!r} has a 4-D output")


def _target_layer(backbone: keras.Model, layer_name: str) -> keras.layers.Layer:
    """Return the backbone layer ``layer_name``, checking that its output is a 4-D feature map."""
    from utils.head import suggest_names

    valid = spatial_layer_names(backbone)
    if layer_name not in valid:
        exists = any(layer.name == layer_name for layer in backbone.layers)
        reason = "has no 4-D feature map output" if exists else "not found"
        raise ValueError(f"layer {layer_name!r} {reason} in backbone {backbone.name!r}; nearby layers with a "
                         f"feature map: {suggest_names(layer_name, valid)}")
    return backbone.get_layer(layer_name)


def build_gradient_model(model: keras.Model, layer_name: str | None = None, *,
                         backbone_name: str | None = None) -> keras.Model:
    """Build a model that returns the target layer's feature map and the class scores before the softmax.

    The new model reuses ``model``'s layers and weights and leaves ``model`` unchanged. It runs
    the layers before the backbone, then a sub-model of the backbone with two outputs (the
    target layer's and the backbone's own), then the layers between the backbone and the last
    Dense layer. The logits come from a linear copy of that last layer's kernel and bias, so
    its softmax is left switched on in ``model``.

    Args:
        model: a classifier built by ``utils.head.build_classifier``, usually loaded from
            ``model.keras``.
        layer_name: a backbone layer with a 4-D output; default ``find_conv_layer(backbone)``.
        backbone_name: the nested backbone's layer name; see ``find_backbone``.

    Returns:
        A model that maps RGB pixels in [0, 255] of ``model``'s input shape to
        ``[feature_map, logits]``: shapes (batch, height, width, channels) and
        (batch, num_classes).

    Raises:
        ValueError: the backbone or the layer is not found, or the model does not end in a
            Dense layer.

    Notes:
        The layers around the backbone must form a chain, which is what ``build_classifier``
        makes: the layer listed right before the backbone feeds it, and the layer right after
        it reads its output. A model with branches around the backbone fails to build here
        rather than giving a wrong map.
    """
    backbone = find_backbone(model, backbone_name)
    layer_name = layer_name or find_conv_layer(backbone)
    target = _target_layer(backbone, layer_name)

    output_layer = model.layers[-1]
    if not isinstance(output_layer, keras.layers.Dense):
        raise ValueError(f"the last layer of model {model.name!r} is a {type(output_layer).__name__}; "
                         "Grad-CAM needs a Dense layer whose pre-activation values are the class scores")

    # Tensors of the outer graph around the backbone. ``backbone.input`` and ``backbone.output``
    # would give the backbone's own graph instead, because it is a model of its own.
    position = model.layers.index(backbone)
    if position == 0 or position == len(model.layers) - 1:
        raise ValueError(f"backbone {backbone.name!r} must sit between the input and the last layer of "
                         f"model {model.name!r}")
    backbone_input = model.layers[position - 1].output
    after_backbone = model.layers[position + 1]
    backbone_output = output_layer.input if after_backbone is output_layer else after_backbone.input

    # Three pieces: photo -> backbone input, backbone input -> (feature map, backbone output),
    # backbone output -> input of the last Dense layer.
    before = keras.Model(model.inputs, backbone_input, name="gradcam_before_backbone")
    inside = keras.Model(backbone.inputs, [target.output, backbone.outputs[0]], name="gradcam_backbone")
    after = None
    if after_backbone is not output_layer:
        after = keras.Model(backbone_output, output_layer.input, name="gradcam_after_backbone")

    # The class scores before the softmax: a linear Dense layer holding copies of the last
    # layer's kernel and bias, so the loaded layer keeps its activation.
    logits_layer = keras.layers.Dense(output_layer.units, use_bias=output_layer.use_bias, name="gradcam_logits")
    logits_layer.build(output_layer.input.shape)
    logits_layer.set_weights(output_layer.get_weights())
    logits_layer.trainable = False

    images = keras.Input(model.inputs[0].shape[1:], name="image")
    feature_map, features = inside(before(images))
    if after is not None:
        features = after(features)
    logits = logits_layer(features)
    return keras.Model(images, [feature_map, logits], name="gradcam")


def channel_weights(feature_map: np.ndarray, gradients: np.ndarray, method: str = "gradcam") -> np.ndarray:
    """Weight each channel of a feature map by how much it raises the class score.

    Args:
        feature_map: float array (batch, height, width, channels), the target layer's output A.
        gradients: float array of the same shape, dS/dA for the class score S before the softmax.
        method: "gradcam": the spatial mean of dS/dA. "gradcam++": the sum over positions of
            alpha * ReLU(dS/dA), with alpha = g^2 / (2 g^2 + sum_ab(A) g^3) and g = dS/dA.

    Returns:
        float32 array (batch, channels).

    Raises:
        ValueError: an unknown method, or arrays that are not 4-D or differ in shape.

    Notes:
        The Grad-CAM++ alpha is the closed form of the paper's second-order weights for an
        exponential of the score, exp(S). With exp(S) the second and third derivatives reduce to
        powers of the first, so no second-order gradient is computed. Where the denominator is
        zero, alpha is set to zero.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)} (got {method!r})")
    feature_map = np.asarray(feature_map, dtype=np.float64)
    gradients = np.asarray(gradients, dtype=np.float64)
    if feature_map.ndim != 4 or feature_map.shape != gradients.shape:
        raise ValueError(f"expected a feature map and gradients of one 4-D shape (batch, height, width, channels) "
                         f"(got {feature_map.shape} and {gradients.shape})")

    if method == "gradcam":
        return gradients.mean(axis=(1, 2)).astype(np.float32)

    squared = gradients ** 2
    cubed = gradients ** 3
    activation_sums = feature_map.sum(axis=(1, 2), keepdims=True)
    denominator = 2.0 * squared + activation_sums * cubed
    safe = np.where(denominator != 0.0, denominator, 1.0)
    alpha = np.where(denominator != 0.0, squared / safe, 0.0)
    return (alpha * np.maximum(gradients, 0.0)).sum(axis=(1, 2)).astype(np.float32)


def weighted_heatmap(feature_map: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Sum the channels by their weights, keep the positive part and scale each map to [0, 1].

    Args:
        feature_map: float array (batch, height, width, channels).
        weights: float array (batch, channels) from ``channel_weights``.

    Returns:
        float32 array (batch, height, width) in [0, 1]. A map with no positive value, so nothing
        raised the class score, stays all zeros instead of being divided by zero.
    """
    feature_map = np.asarray(feature_map, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    cam = np.maximum(np.einsum("bhwc,bc->bhw", feature_map, weights), 0.0)
    peaks = cam.max(axis=(1, 2), keepdims=True)
    usable = np.isfinite(peaks) & (peaks > 0.0)
    scaled = np.where(usable, cam / np.where(usable, peaks, 1.0), 0.0)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def compute_activation_maps(gradient_model: keras.Model, images: np.ndarray,
                            class_index: int | Sequence[int] | None = None, *,
                            method: str = "gradcam") -> list[ClassActivationMap]:
    """Compute one heat map per photo in one forward and one backward pass.

    Args:
        gradient_model: a model from ``build_gradient_model``.
        images: RGB pixels in [0, 255], shape (batch, size, size, 3) at the model's input size.
        class_index: the class to explain: None for each photo's top-scoring class, one index
            for all photos, or one index per photo.
        method: "gradcam" or "gradcam++"; see ``channel_weights``.

    Returns:
        One ``ClassActivationMap`` per photo, in order.

    Raises:
        ValueError: a bad method, image shape or class index.
    """
    import tensorflow as tf

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)} (got {method!r})")
    images = np.asarray(images, dtype=np.float32)
    expected = tuple(gradient_model.inputs[0].shape[1:])
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"expected images of shape (batch, {', '.join(map(str, expected))}) "
                         f"(got {images.shape})")
    num_classes = int(gradient_model.outputs[1].shape[-1])
    batch = images.shape[0]

    # Each photo's score depends only on that photo (batch norm and dropout run in inference
    # mode), so the gradient of the summed scores contains every photo's own gradient.
    with tf.GradientTape() as tape:
        feature_map, logits = gradient_model(images, training=False)
        if class_index is None:
            indices = tf.argmax(logits, axis=-1, output_type=tf.int32)
        else:
            indices = tf.constant(_class_indices(class_index, batch, num_classes), dtype=tf.int32)
        scores = tf.gather(logits, indices[:, None], batch_dims=1)
        total = tf.reduce_sum(scores)
    gradients = tape.gradient(total, feature_map)

    weights = channel_weights(feature_map.numpy(), gradients.numpy(), method)
    heatmaps = weighted_heatmap(feature_map.numpy(), weights)
    probabilities = tf.nn.softmax(logits, axis=-1).numpy().astype(np.float32)
    return [ClassActivationMap(heatmap=heatmaps[row], class_index=int(indices[row]), probabilities=probabilities[row])
            for row in range(batch)]


def _class_indices(class_index: int | Sequence[int], batch: int, num_classes: int) -> list[int]:
    """Expand ``class_index`` to one index per photo, checking each is a valid class."""
    if isinstance(class_index, (int, np.integer)):
        indices = [int(class_index)] * batch
    else:
        indices = [int(index) for index in class_index]
        if len(indices) != batch:
            raise ValueError(f"expected one class index per photo ({batch}) (got {len(indices)})")
    for index in indices:
        if not 0 <= index < num_classes:
            raise ValueError(f"class index must be from 0 to {num_classes - 1} (got {index})")
    return indices


def compute_heatmap(gradient_model: keras.Model, image: np.ndarray, class_index: int | None = None, *,
                    method: str = "gradcam") -> np.ndarray:
    """Compute the heat map of one photo.

    Args:
        gradient_model: a model from ``build_gradient_model``.
        image: RGB pixels in [0, 255], shape (size, size, 3) at the model's input size.
        class_index: the class to explain; default the top-scoring one.
        method: "gradcam" or "gradcam++".

    Returns:
        float32 array (height, width) in [0, 1] at the target layer's resolution.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected one image of shape (size, size, 3) (got {image.shape})")
    return compute_activation_maps(gradient_model, image[None], class_index, method=method)[0].heatmap


def resize_heatmap(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a heat map to height x width with bilinear interpolation; returns float32 in [0, 1]."""
    from PIL import Image

    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"expected a 2-D heat map (got shape {heatmap.shape})")
    if heatmap.shape == (height, width):
        return heatmap.copy()
    resized = Image.fromarray(heatmap, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def overlay(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
    """Blend a coloured heat map over a photo.

    Args:
        image: uint8 RGB array (height, width, 3).
        heatmap: 2-D array in [0, 1] of any size; it is resized to the photo.
        alpha: weight of the heat map colours: ``(1 - alpha) * image + alpha * colormap(heatmap)``,
            from 0 (photo only) to 1 (heat map only).
        colormap: a matplotlib colormap name.

    Returns:
        uint8 RGB array of the photo's shape.

    Raises:
        ValueError: a photo that is not uint8 RGB, a heat map outside [0, 1], or alpha outside [0, 1].
    """
    import matplotlib

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 RGB photo of shape (height, width, 3) "
                         f"(got {image.dtype} {image.shape})")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be from 0 to 1 (got {alpha})")
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.size and (heatmap.min() < 0.0 or heatmap.max() > 1.0):
        raise ValueError(f"expected a heat map in [0, 1] (got values from {heatmap.min()} to {heatmap.max()})")

    resized = resize_heatmap(heatmap, image.shape[0], image.shape[1])
    colours = matplotlib.colormaps[colormap](resized)[..., :3] * 255.0
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def draw_figure(figure, image: np.ndarray, heatmap: np.ndarray, title: str, *, alpha: float = 0.4,
                colormap: str = "jet", overlay_title: str = "heat map") -> None:
    """Draw the photo and the photo under its heat map side by side, with a colour bar and a title.

    Args:
        figure: an empty ``matplotlib.figure.Figure``.
        image: uint8 RGB photo (height, width, 3).
        heatmap: 2-D array in [0, 1]; see ``overlay``.
        title: the figure's title, for example ``Pr[img|label=dog_0098] = 0.97``.
        alpha: heat map weight in the blend; see ``overlay``.
        colormap: a matplotlib colormap name, used for the blend and the colour bar.
        overlay_title: the title above the blended panel.
    """
    from matplotlib import cm, colors

    blended = overlay(image, heatmap, alpha=alpha, colormap=colormap)

    # A narrow third column contains the colour bar, so both pictures get the same size.
    figure.set_layout_engine("constrained")
    photo_axes, overlay_axes, bar_axes = figure.subplots(1, 3, width_ratios=[1.0, 1.0, 0.05])
    photo_axes.imshow(image)
    photo_axes.set_title("photo")
    overlay_axes.imshow(blended)
    overlay_axes.set_title(overlay_title)
    for axes in (photo_axes, overlay_axes):
        axes.set_axis_off()

    scale = cm.ScalarMappable(norm=colors.Normalize(0.0, 1.0), cmap=colormap)
    bar = figure.colorbar(scale, cax=bar_axes)
    bar.set_label("relevance")
    figure.suptitle(title)
