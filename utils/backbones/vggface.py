"""The VGGFace networks (VGG16, ResNet50, SENet50) with the original keras-vggface weight files.

keras-vggface 0.6 published six weight files in its v2.0 release, one with and one without the
top layers per network, and no longer imports under Keras 3. The networks here are rebuilt layer
for layer so that those files load unchanged, and every file is checked against the network
before any value is assigned, because a shifted or partial load would train but recognise nothing.

References:
    Parkhi, Vedaldi and Zisserman, "Deep Face Recognition", BMVC 2015 (VGG16, 2,622 people).
    Cao, Shen, Xie, Parkhi and Zisserman, "VGGFace2: A dataset for recognising faces across pose
    and age", FG 2018 (ResNet50 and SENet50, 8,631 people).

Layer names:
    The files name layers such as ``conv1/7x7_s2/bn`` and ``fc6/relu``, and Keras 3 rejects "/" in
    layer names. ``keras_layer_name`` replaces every "/" with "." and ``file_layer_name`` reverses
    it. Both building and loading use this one mapping, so layers with weights keep their file
    names otherwise: ``conv5_3`` in vgg16, ``conv1.7x7_s2.bn`` in resnet50 and senet50.

Inputs:
    Every network takes BGR images minus the channel means of its training set, not rescaled:
    the ``PREPROCESSING`` mode of ``utils.preprocessing``.
"""

import logging
import os
from pathlib import Path

import keras

from utils.backbones import _download, _keras2_h5
from utils.backbones._vggface_nets import (
    ARCHS,
    TOP_INPUT_SIZE,
    build_network,
    file_layer_name,
    keras_layer_name,
)
from utils.errors import UserError

__all__ = [
    "ARCHS",
    "FILE_SIZES",
    "GRADCAM_LAYER",
    "MIN_INPUT_SIZE",
    "PREPROCESSING",
    "RELEASE_URL",
    "TOP_INPUT_SIZE",
    "WEIGHTS_FILES",
    "build_vggface",
    "default_cache_dir",
    "fetch_vggface_weights",
    "file_layer_name",
    "keras_layer_name",
    "load_vggface_weights",
    "vggface_backbone",
]

logger = logging.getLogger(__name__)

# The keras-vggface v2.0 release that published the six files.
RELEASE_URL = "https://github.com/rcmalli/keras-vggface/releases/download/v2.0/"

WEIGHTS_FILES = {
    ("vgg16", True): "rcmalli_vggface_tf_vgg16.h5",
    ("vgg16", False): "rcmalli_vggface_tf_notop_vgg16.h5",
    ("resnet50", True): "rcmalli_vggface_tf_resnet50.h5",
    ("resnet50", False): "rcmalli_vggface_tf_notop_resnet50.h5",
    ("senet50", True): "rcmalli_vggface_tf_senet50.h5",
    ("senet50", False): "rcmalli_vggface_tf_notop_senet50.h5",
}

# Sizes in bytes of the published files, where known. No checksums were published.
# NOTE: only the notop ResNet50 size is known, so a download of the other five files is checked
# against the Content-Length header and the layout, which catch a truncated file but not
# corrupted values.
FILE_SIZES = {
    "rcmalli_vggface_tf_notop_resnet50.h5": 94_694_792,
}

# The smallest square input side each network accepts without top: the final feature map is
# then 1x1. Measured by building each network at every side from 1 upward with Keras 3.15.
# VGG16 halves the side in five 2x2 pools. ResNet50 and SENet50 need three pixels after their
# stride-2 stem for the 3x3 pool, and their later stride-2 1x1 convolutions never reach zero.
# The weights were trained at 224x224, so much smaller faces lose accuracy long before this.
MIN_INPUT_SIZE = {"vgg16": 32, "resnet50": 5, "senet50": 5}

# The default Grad-CAM target: the last convolutional layer of VGG16 (ReLU included), and the
# output of the last bottleneck block of ResNet50 and SENet50.
GRADCAM_LAYER = {
    "vgg16": "conv5_3",
    "resnet50": keras_layer_name("conv5_3/relu"),
    "senet50": keras_layer_name("conv5_3/relu"),
}

# The ``utils.preprocessing`` mode of each network: version 1 means for the VGGFace weights,
# version 2 for the VGGFace2 weights.
PREPROCESSING = {"vgg16": "vggface1", "resnet50": "vggface2", "senet50": "vggface2"}

# The layer whose output is the feature vector when the original top is kept: the 4,096-value
# fc7 descriptor after its ReLU, or the 2,048 pooled values before the classifier.
_TOP_FEATURES_LAYER = {
    "vgg16": keras_layer_name("fc7/relu"),
    "resnet50": "flatten",
    "senet50": "flatten",
}


def default_cache_dir() -> Path:
    """Return the download cache: ``$KERAS_HOME/models/vggface``, by default ``~/.keras/models/vggface``."""
    return Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models" / "vggface"


def build_vggface(
    arch: str, include_top: bool = False, input_shape: tuple[int, int, int] | None = None
) -> keras.Model:
    """Build one of the original VGGFace networks with random weights.

    Args:
        arch: "vgg16", "resnet50" or "senet50".
        include_top: keep the original dense layers up to the identity classifier (2,622 classes
            for vgg16, 8,631 for the others). The input must then be 224x224x3.
        input_shape: (height, width, 3). Defaults to (224, 224, 3). Without top, each side must
            be at least ``MIN_INPUT_SIZE[arch]``.

    Returns:
        A model named ``vggface_<arch>`` whose layers with weights match the keras-vggface file
        of the same ``arch`` and ``include_top`` in order, name and shape. Without top it ends at
        pool5 (vgg16) or at the last bottleneck block's ReLU (resnet50, senet50), so the caller
        chooses the pooling. With top it ends at the classifier's softmax.

    Raises:
        UserError: an unknown ``arch`` or an input shape the network cannot take.
    """
    _check_arch(arch)
    shape = (TOP_INPUT_SIZE, TOP_INPUT_SIZE, 3) if input_shape is None else tuple(int(n) for n in input_shape)
    if len(shape) != 3 or shape[2] != 3:
        raise UserError(f"input_shape must be (height, width, 3) for {arch} (got {input_shape!r})")
    if include_top and shape != (TOP_INPUT_SIZE, TOP_INPUT_SIZE, 3):
        raise UserError(
            f"{arch} with its original top layers needs 224x224 inputs (got {shape[0]}x{shape[1]}); "
            "use --input-size 224 or leave out --include-top"
        )
    if min(shape[:2]) < MIN_INPUT_SIZE[arch]:
        raise UserError(
            f"{arch} needs inputs of at least {MIN_INPUT_SIZE[arch]}x{MIN_INPUT_SIZE[arch]} pixels "
            f"(got {shape[0]}x{shape[1]}); use a larger --input-size"
        )
    return build_network(arch, include_top, shape)


def load_vggface_weights(model: keras.Model, path: str | Path) -> None:
    """Load a keras-vggface weight file into a network from ``build_vggface``, all or nothing.

    As keras-vggface did, the layers with weights of the file and of the network are paired by
    order. Before any value is assigned, each pair is checked: the file's layer name through
    ``keras_layer_name``, the number of weights, each weight's last name part ("kernel",
    "gamma" and so on, because the prefixes differ between Keras versions) and each shape. The
    layer counts must also be equal. All values are then read into memory, and only then
    assigned, so the model is unchanged whenever this raises.

    Args:
        model: the network, as ``build_vggface`` returns it with the same ``arch`` and
            ``include_top`` as the file.
        path: a weights file in the Keras 2 HDF5 layout, such as one of ``WEIGHTS_FILES``.

    Raises:
        UserError: the file is missing, not HDF5, damaged, or does not fit the network. The
            one-line message names the first mismatch and the file to use instead.
    """
    path = Path(path)
    layout = _read_checked_layout(path, model)
    try:
        values = _keras2_h5.read_values(path, layout)
    except _keras2_h5.WeightsFileError as err:
        raise UserError(f"cannot read the weights in {path} ({err}); the file is damaged, download it again") from err

    network_layers = _weighted_layers(model)
    for layer, layer_values in zip(network_layers, values):
        for variable, value in zip(layer.weights, layer_values):
            variable.assign(value.astype(variable.dtype, copy=False))
    logger.info("loaded %d layers with weights from %s into %s", len(network_layers), path, model.name)


def fetch_vggface_weights(
    arch: str,
    include_top: bool,
    cache_dir: str | Path | None = None,
    *,
    base_url: str = RELEASE_URL,
    network: keras.Model | None = None,
) -> Path:
    """Return the cached keras-vggface weight file of a network, downloading it on first use.

    The file goes to a temporary name in the cache folder and takes its final name only once it
    has the size announced by the server (and the published size, where ``FILE_SIZES`` lists it)
    and its layout fits the network. A file already in the cache gets the same checks.

    Args:
        arch: "vgg16", "resnet50" or "senet50".
        include_top: fetch the file with the top layers instead of the one without.
        cache_dir: the cache folder; ``default_cache_dir()`` when None. Created if missing.
        base_url: the folder URL that the file name is appended to.
        network: the network to check the layout against, as ``build_vggface(arch,
            include_top)`` returns it; built when None.

    Raises:
        UserError: the download failed (offline, HTTP error, stopped early) or gave a wrong
            file, or the cached file is wrong. The one-line message names the file, its URL and
            ``--weights PATH``.
    """
    _check_arch(arch)
    filename = WEIGHTS_FILES[(arch, include_top)]
    url = base_url + filename
    cache = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    path = cache / filename
    if network is None:
        network = _layout_network(arch, include_top)

    if path.is_file():
        problem = _download_problem(path, filename, network)
        if problem is not None:
            raise UserError(
                f"the cached {path} is wrong ({problem}); delete it to download it again from {url}, "
                "or pass --weights PATH"
            )
        return path

    try:
        cache.mkdir(parents=True, exist_ok=True)
        _download.download_file(
            url, path, expected_size=FILE_SIZES.get(filename), check=lambda file: _reject_download(file, filename, network)
        )
    except _download.DownloadError as err:
        raise UserError(
            f"cannot download {filename} from {url} ({err}); download it by other means and pass --weights PATH"
        ) from err
    except _WrongDownload as err:
        raise UserError(
            f"the download of {filename} from {url} is wrong ({err}) and was deleted; try again, "
            "or download it by other means and pass --weights PATH"
        ) from err
    except OSError as err:
        raise UserError(
            f"cannot write {filename} to the cache folder {cache} ({' '.join(str(err).split())}); "
            "set KERAS_HOME to a writable folder or pass --weights PATH"
        ) from err
    return path


def vggface_backbone(arch: str, input_size: int, weights: str | Path | None, include_top: bool = False) -> keras.Model:
    """Build a VGGFace feature extractor with its weights, for nesting inside a classifier.

    Args:
        arch: "vgg16", "resnet50" or "senet50".
        input_size: side of the square input in pixels. It must be 224 with ``include_top``, and
            at least ``MIN_INPUT_SIZE[arch]`` without.
        weights: "vggface" to use the published file (downloaded once into
            ``default_cache_dir()``), a path to any of the six ``WEIGHTS_FILES``, or None for
            random weights. A file with the top layers also serves a network without them: it is
            loaded and checked whole, then the convolutional layers are taken.
        include_top: keep the original dense layers, without the identity classifier.

    Returns:
        A model named ``vggface_<arch>`` that takes preprocessed float images of shape
        (input_size, input_size, 3). Without top it returns a 4-D feature map: pool5 for vgg16,
        the last block's output for resnet50 and senet50. With top it returns vectors: the
        4,096-value fc7 descriptor after its ReLU for vgg16, the 2,048 average-pooled values for
        resnet50 and senet50.

    Raises:
        UserError: a wrong input size, a file of another network or without the requested top,
            a damaged file, or a failed download.
    """
    _check_arch(arch)
    shape = (input_size, input_size, 3)
    if include_top and input_size != TOP_INPUT_SIZE:
        raise UserError(
            f"--include-top keeps the original dense layers of {arch}, which need --input-size 224 "
            f"(got {input_size}); use --input-size 224 or leave out --include-top"
        )

    if weights is None:
        network = build_vggface(arch, include_top, shape)
    elif str(weights) == "vggface":
        network = build_vggface(arch, include_top, shape)
        load_vggface_weights(network, fetch_vggface_weights(arch, include_top, network=network))
    else:
        network = _network_from_file(arch, include_top, shape, Path(weights))

    return _top_features(network, arch) if include_top else network


def _top_features(network: keras.Model, arch: str) -> keras.Model:
    """Cut the identity classifier off a network with top, keeping the feature vector before it."""
    features = network.get_layer(_TOP_FEATURES_LAYER[arch]).output
    return keras.Model(network.input, features, name=network.name)


def _network_from_file(arch: str, include_top: bool, shape: tuple[int, int, int], path: Path) -> keras.Model:
    """Build the network and load a local file, taking the convolutional layers of a top file."""
    file_kind = _identify(_read_layout(path).weighted_layers)
    requested = _describe(arch, include_top)
    if file_kind is not None and file_kind[0] != arch:
        raise UserError(
            f"--weights {path} contains {_describe(*file_kind)} weights, but the network is {requested}; "
            f"pass {WEIGHTS_FILES[(arch, include_top)]} or use -m {file_kind[0]}"
        )
    if file_kind == (arch, False) and include_top:
        raise UserError(
            f"--weights {path} contains {_describe(arch, False)} weights, but --include-top needs the top "
            f"layers too; pass {WEIGHTS_FILES[(arch, True)]} or leave out --include-top"
        )

    if file_kind == (arch, True) and not include_top:
        top_network = build_vggface(arch, True)
        load_vggface_weights(top_network, path)
        network = build_vggface(arch, False, shape)
        for layer in _weighted_layers(network):
            layer.set_weights(top_network.get_layer(layer.name).get_weights())
        logger.info("copied the %d layers with weights below the top from %s", len(_weighted_layers(network)), path)
        return network

    network = build_vggface(arch, include_top, shape)
    load_vggface_weights(network, path)
    return network


def _read_layout(path: Path) -> _keras2_h5.FileLayout:
    """Read a weight file's layout, turning every failure into a one-line UserError."""
    if not path.is_file():
        raise UserError(f"weights file not found: {path}; give the path of a keras-vggface .h5 file")
    try:
        return _keras2_h5.read_layout(path)
    except _keras2_h5.WeightsFileError as err:
        raise UserError(
            f"{path} is not a readable Keras 2 HDF5 weights file ({err}); "
            "give one of the keras-vggface .h5 files, downloaded completely"
        ) from err


def _read_checked_layout(path: Path, model: keras.Model) -> _keras2_h5.FileLayout:
    """Read the layout of ``path`` and raise a UserError naming the first mismatch with ``model``."""
    layout = _read_layout(path)
    if not _is_tensorflow_file(layout):
        raise UserError(
            f"{path} contains weights for the {layout.backend} backend, whose convolution kernels are stored "
            "flipped; give the TensorFlow file of the same network (rcmalli_vggface_tf_...h5)"
        )
    mismatch = _first_mismatch(layout.weighted_layers, _weighted_layers(model))
    if mismatch is None:
        return layout

    network_kind = _identify([_record_of(layer) for layer in _weighted_layers(model)])
    file_kind = _identify(layout.weighted_layers)
    network = _describe(*network_kind) if network_kind else f"network {model.name}"
    if file_kind is not None and network_kind is not None and file_kind != network_kind:
        fix = f"it contains {_describe(*file_kind)} weights; give {WEIGHTS_FILES[network_kind]}"
    elif network_kind is not None:
        fix = f"the file is damaged or not from keras-vggface; give {WEIGHTS_FILES[network_kind]}"
    else:
        fix = "give the keras-vggface file of this network"
    raise UserError(f"{path} does not fit the {network}: {mismatch}; {fix}")


def _is_tensorflow_file(layout: _keras2_h5.FileLayout) -> bool:
    """Return whether the file stores kernels in TensorFlow order, which files without a ``backend`` attribute do."""
    return layout.backend in (None, "tensorflow")


def _layout_mismatch(layout: _keras2_h5.FileLayout, model: keras.Model) -> str | None:
    """Describe why a file's layout cannot load into ``model``, or return None when it can."""
    if not _is_tensorflow_file(layout):
        return f"it contains weights for the {layout.backend} backend, whose convolution kernels are stored flipped"
    return _first_mismatch(layout.weighted_layers, _weighted_layers(model))


def _first_mismatch(file_layers, network_layers) -> str | None:
    """Describe the first difference between the file's and the network's layers with weights.

    Both lists are in order. Returns None when they agree in names (through the mapping), weight
    counts, weight names (last part only) and shapes.
    """
    for position, (record, layer) in enumerate(zip(file_layers, network_layers), start=1):
        if keras_layer_name(record.name) != layer.name:
            return (
                f"weighted layer {position} is {record.name!r} in the file "
                f"but {file_layer_name(layer.name)!r} in the network"
            )
        if len(record.weights) != len(layer.weights):
            return f"layer {record.name!r} has {len(record.weights)} weights in the file but {len(layer.weights)} in the network"
        for weight, variable in zip(record.weights, layer.weights):
            if weight.short_name != variable.name:
                return (
                    f"layer {record.name!r} has weight {weight.name!r} in the file "
                    f"where the network has {variable.name!r}"
                )
            if weight.shape != tuple(variable.shape):
                return f"weight {weight.name!r} has shape {weight.shape} in the file but {tuple(variable.shape)} in the network"

    if len(file_layers) < len(network_layers):
        missing = file_layer_name(network_layers[len(file_layers)].name)
        return (
            f"the file ends after {len(file_layers)} layers with weights, "
            f"but the network has {len(network_layers)} and continues with {missing!r}"
        )
    if len(file_layers) > len(network_layers):
        return (
            f"the file has {len(file_layers)} layers with weights but the network only {len(network_layers)}, "
            f"so {file_layers[len(network_layers)].name!r} and later are left over"
        )
    return None


class _WrongDownload(Exception):
    """A downloaded file that is not the published one: wrong size, damaged or of another network."""


def _download_problem(path: Path, filename: str, network: keras.Model) -> str | None:
    """Describe why ``path`` is not the published ``filename`` that fits ``network``, or return None."""
    expected = FILE_SIZES.get(filename)
    size = path.stat().st_size
    if expected is not None and size != expected:
        return f"{size:,} bytes instead of the published {expected:,}"
    try:
        layout = _keras2_h5.read_layout(path)
    except _keras2_h5.WeightsFileError as err:
        return f"not a readable Keras 2 HDF5 weights file: {err}"
    return _layout_mismatch(layout, network)


def _reject_download(path: Path, filename: str, network: keras.Model) -> None:
    """Raise _WrongDownload unless the downloaded ``path`` is the published ``filename`` that fits ``network``."""
    problem = _download_problem(path, filename, network)
    if problem is not None:
        raise _WrongDownload(problem)


def _layout_network(arch: str, include_top: bool) -> keras.Model:
    """Build the network whose layout a downloaded file is checked against."""
    if include_top:
        return build_vggface(arch, True)
    # Layer shapes without top do not depend on the input size, so the smallest builds fastest.
    side = MIN_INPUT_SIZE[arch]
    return build_vggface(arch, False, (side, side, 3))


def _weighted_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Return the layers of ``model`` that have weights, in model order."""
    return [layer for layer in model.layers if layer.weights]


def _record_of(layer: keras.layers.Layer) -> _keras2_h5.LayerRecord:
    """Describe a network layer like a file layer, in the file's naming."""
    weights = tuple(_keras2_h5.WeightRecord(variable.name, tuple(variable.shape)) for variable in layer.weights)
    return _keras2_h5.LayerRecord(file_layer_name(layer.name), weights)


def _identify(layers) -> tuple[str, bool] | None:
    """Guess which of the six networks a list of layers with weights belongs to, for messages.

    Returns:
        (arch, include_top), or None when the names fit none of them.
    """
    names = {layer.name for layer in layers}
    if "conv1_1" in names:
        return "vgg16", bool(names & {"fc6", "fc7", "fc8"})
    if "conv1/7x7_s2" in names:
        arch = "senet50" if any(name.endswith("_1x1_down") for name in names) else "resnet50"
        return arch, "classifier" in names
    return None


def _describe(arch: str, include_top: bool) -> str:
    return f"{arch} {'with' if include_top else 'without'} top ({WEIGHTS_FILES[(arch, include_top)]})"


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise UserError(f"the VGGFace network must be one of {', '.join(ARCHS)} (got {arch!r})")
