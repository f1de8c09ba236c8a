"""The three VGGFace networks (VGG16, ResNet50, SENet50) in Keras 3, layer for layer as published.

The architectures follow keras-vggface 0.6 (``keras_vggface/models.py``), whose weight files
store the layers in the order Keras 2 listed them. Keras 3 lists a functional model's layers
with the same graph walk, so building the blocks in the same call order reproduces the file
order. ``tests/test_vggface.py`` checks it layer for layer against the layouts of all six files.

Layer names are the file's names passed through ``keras_layer_name``. Layers without weights
had generated names in the files (``activation_12``, ``add_3``) that are never compared, so
they get readable names here in the same style (``conv2_1_1x1_reduce.relu``, ``conv2_1.add``).
"""

import keras
from keras import layers

# Keras 3 rejects "/" in layer names, while the weight files use names such as
# "conv1/7x7_s2/bn" and "fc6/relu". The one mapping between the two replaces every "/" with
# FILE_SEPARATOR_REPLACEMENT. No file layer name contains ".", so the mapping is reversible.
FILE_SEPARATOR_REPLACEMENT = "."

ARCHS = ("vgg16", "resnet50", "senet50")

# Classes of the original identity classifiers: 2,622 people of VGGFace (vgg16) and 8,631
# people of the VGGFace2 training set (resnet50, senet50).
CLASSES = {"vgg16": 2622, "resnet50": 8631, "senet50": 8631}

# The input size the networks were trained at. The top networks only fit their dense layers
# at this size.
TOP_INPUT_SIZE = 224

# Batch-norm epsilon of each architecture as set in keras-vggface 0.6: the Keras default for
# ResNet50, 1e-4 for SENet50.
_BN_EPSILON = {"resnet50": 1e-3, "senet50": 1e-4}

# (filters of the 1x1 reduce, 3x3 and 1x1 increase convolutions, number of blocks) per stage
# 2 to 5 of ResNet50 and SENet50.
_STAGES = (
    ((64, 64, 256), 3),
    ((128, 128, 512), 4),
    ((256, 256, 1024), 6),
    ((512, 512, 2048), 3),
)

# Channel reduction inside the squeeze-and-excitation blocks of SENet50.
_SE_REDUCTION = 16


def keras_layer_name(file_name: str) -> str:
    """Map a layer name of a keras-vggface weight file to our Keras 3 layer name.

    Every "/" becomes ".", so "conv1/7x7_s2/bn" becomes "conv1.7x7_s2.bn" and "conv5_3" stays
    "conv5_3". ``file_layer_name`` is the inverse.
    """
    return file_name.replace("/", FILE_SEPARATOR_REPLACEMENT)


def file_layer_name(keras_name: str) -> str:
    """Map our Keras 3 layer name back to the layer name used in a keras-vggface weight file."""
    return keras_name.replace(FILE_SEPARATOR_REPLACEMENT, "/")


def build_network(arch: str, include_top: bool, input_shape: tuple[int, int, int]) -> keras.Model:
    """Build one VGGFace network with random weights, without checking the arguments.

    ``vggface.build_vggface`` is the public entry point and checks them first.

    Returns:
        For vgg16, a model ending at pool5 without top, or at the fc8 softmax with it. For
        resnet50 and senet50, a model ending at the last block's ReLU without top, or at the
        classifier softmax with it.
    """
    inputs = keras.Input(shape=input_shape, name="input")
    if arch == "vgg16":
        outputs = _vgg16(inputs, include_top)
    else:
        outputs = _resnet(inputs, include_top, squeeze_excitation=arch == "senet50", epsilon=_BN_EPSILON[arch])
    return keras.Model(inputs, outputs, name=f"vggface_{arch}")


def _name(file_name: str) -> str:
    return keras_layer_name(file_name)


def _vgg16(x, include_top: bool):
    """VGG16 of VGGFace: five blocks of 3x3 convolutions with ReLU, each ending in a 2x2 max pool."""
    for block, (filters, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)), start=1):
        for index in range(1, convs + 1):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{block}_{index}")(x)
        x = layers.MaxPooling2D(2, strides=2, name=f"pool{block}")(x)
    if not include_top:
        return x

    # Classifier: fc6 and fc7 give the 4,096-value face descriptor, fc8 scores 2,622 identities.
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(4096, name="fc6")(x)
    x = layers.Activation("relu", name=_name("fc6/relu"))(x)
    x = layers.Dense(4096, name="fc7")(x)
    x = layers.Activation("relu", name=_name("fc7/relu"))(x)
    x = layers.Dense(CLASSES["vgg16"], name="fc8")(x)
    return layers.Activation("softmax", name=_name("fc8/softmax"))(x)


def _resnet(x, include_top: bool, squeeze_excitation: bool, epsilon: float):
    """ResNet50 of VGGFace2, or SENet50 when ``squeeze_excitation`` is set."""
    # Stem: 7x7 convolution with stride 2, then a 3x3 max pool with stride 2.
    x = layers.Conv2D(64, 7, strides=2, padding="same", use_bias=False, name=_name("conv1/7x7_s2"))(x)
    x = layers.BatchNormalization(epsilon=epsilon, name=_name("conv1/7x7_s2/bn"))(x)
    x = layers.Activation("relu", name=_name("conv1/relu"))(x)
    x = layers.MaxPooling2D(3, strides=2, name=_name("pool1/3x3_s2"))(x)

    # Stages 2 to 5. The first block of each stage projects the shortcut, and the first block
    # of stages 3 to 5 halves the resolution in its 1x1 reduce convolution.
    for stage, (filters, blocks) in enumerate(_STAGES, start=2):
        for block in range(1, blocks + 1):
            x = _bottleneck(
                x,
                filters,
                prefix=f"conv{stage}_{block}",
                strides=2 if block == 1 and stage > 2 else 1,
                project=block == 1,
                squeeze_excitation=squeeze_excitation,
                epsilon=epsilon,
            )
    if not include_top:
        return x

    # Classifier: a 7x7 average pool, which leaves 1x1 at the 224x224 training size, then
    # 8,631 identities.
    x = layers.AveragePooling2D(7, name="avg_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    return layers.Dense(CLASSES["resnet50"], activation="softmax", name="classifier")(x)


def _conv_bn(x, filters: int, kernel_size: int, name: str, epsilon: float, strides: int = 1):
    """Apply a bias-free convolution named ``name``, then its batch norm named ``name/bn``."""
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False, name=_name(name))(x)
    return layers.BatchNormalization(epsilon=epsilon, name=_name(f"{name}/bn"))(x)


def _bottleneck(x, filters, prefix: str, strides: int, project: bool, squeeze_excitation: bool, epsilon: float):
    """Apply one bottleneck block: 1x1 reduce, 3x3, 1x1 increase, optional SE, then the residual sum.

    The files list layers by depth from the output, and layers of equal depth in the order of the
    graph walk, which follows the inputs of ``Add`` and ``Multiply`` in order. Keeping the block
    output first in both reproduces the file order: in ResNet50 ``_1x1_proj`` comes right after
    ``_1x1_increase``, and in SENet50 after ``_1x1_up``.
    """
    reduce_filters, middle_filters, increase_filters = filters

    # 1x1 convolutions have no spatial extent, so "same" padding equals the original "valid".
    y = _conv_bn(x, reduce_filters, 1, f"{prefix}_1x1_reduce", epsilon, strides=strides)
    y = layers.Activation("relu", name=_name(f"{prefix}_1x1_reduce/relu"))(y)
    y = _conv_bn(y, middle_filters, 3, f"{prefix}_3x3", epsilon)
    y = layers.Activation("relu", name=_name(f"{prefix}_3x3/relu"))(y)
    y = _conv_bn(y, increase_filters, 1, f"{prefix}_1x1_increase", epsilon)
    if squeeze_excitation:
        y = _squeeze_excitation(y, increase_filters, prefix)

    shortcut = x
    if project:
        shortcut = _conv_bn(x, increase_filters, 1, f"{prefix}_1x1_proj", epsilon, strides=strides)
    y = layers.Add(name=_name(f"{prefix}/add"))([y, shortcut])
    return layers.Activation("relu", name=_name(f"{prefix}/relu"))(y)


def _squeeze_excitation(x, channels: int, prefix: str):
    """Rescale each channel by a gate computed from the global average of all channels."""
    se = layers.GlobalAveragePooling2D(keepdims=True, name=_name(f"{prefix}_global_pool"))(x)
    se = layers.Conv2D(channels // _SE_REDUCTION, 1, name=_name(f"{prefix}_1x1_down"))(se)
    se = layers.Activation("relu", name=_name(f"{prefix}_1x1_down/relu"))(se)
    se = layers.Conv2D(channels, 1, name=_name(f"{prefix}_1x1_up"))(se)
    se = layers.Activation("sigmoid", name=_name(f"{prefix}_1x1_up/sigmoid"))(se)
    return layers.Multiply(name=_name(f"{prefix}/scale"))([x, se])
