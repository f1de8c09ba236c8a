"""The VGGFace networks against the layouts of the six published keras-vggface weight files.

The real files cannot be downloaded here. The shared fixtures list each file's layer order,
weight names, shapes and parameter count, without values. The tests write HDF5 files with exactly
those layouts and seeded random values, and check that every value lands in its layer.
"""

import copy
import functools
import http.server
import json
import shutil
import socket
import threading
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from tests.conftest import shared_path
from utils import preprocessing
from utils.backbones import _vggface_nets, vggface
from utils.errors import UserError

LAYOUT_KEYS = ("vgg16_top", "vgg16_notop", "resnet50_top", "resnet50_notop", "senet50_top", "senet50_notop")

# Input side for the networks without top: small, to keep the tests fast.
SMALL_SIDE = 32


@pytest.fixture(scope="module")
def layouts() -> dict:
    """The six file layouts, keyed as "<arch>_top" and "<arch>_notop"."""
    return json.loads(shared_path("fixtures", "vggface_layouts.json").read_text())


@pytest.fixture(scope="module")
def vgg16_top_network():
    """The 145M-parameter VGG16 with top, built once for the module."""
    return vggface.build_vggface("vgg16", include_top=True)


@pytest.fixture(scope="module")
def vgg16_notop_file(layouts, tmp_path_factory) -> Path:
    """A file with the layout of rcmalli_vggface_tf_notop_vgg16.h5 and random values (59 MB)."""
    path = tmp_path_factory.mktemp("published") / "rcmalli_vggface_tf_notop_vgg16.h5"
    return write_keras2_weights(path, layouts["vgg16_notop"], seed=1)


@pytest.fixture(scope="module")
def resnet50_notop_file(layouts, tmp_path_factory) -> Path:
    """A file with the layout of rcmalli_vggface_tf_notop_resnet50.h5 and random values (94 MB)."""
    path = tmp_path_factory.mktemp("published") / "rcmalli_vggface_tf_notop_resnet50.h5"
    return write_keras2_weights(path, layouts["resnet50_notop"], seed=2)


def write_keras2_weights(path: Path, layout: dict, seed: int, *, edit=None, chunk_layer_names: bool = False,
                         weight_prefix=None) -> Path:
    """Write an HDF5 file as Keras 2 ``save_weights`` did, with ``layout``'s names and shapes.

    Args:
        path: the file to write.
        layout: one entry of the fixture.
        seed: seed of the standard-normal values, drawn in file order.
        edit: called with a deep copy of the layer list, returns the list to write.
        chunk_layer_names: split ``layer_names`` into ``layer_names0`` and ``layer_names1``, as
            Keras 2 did for attributes over 64 KB.
        weight_prefix: called with (layer name, weight name), returns the weight name to write.
    """
    rng = np.random.default_rng(seed)
    layers = copy.deepcopy(layout["layers"])
    if edit is not None:
        layers = edit(layers)
    names = np.array([layer["name"].encode("utf8") for layer in layers])
    with h5py.File(path, "w") as file:
        if chunk_layer_names:
            file.attrs["layer_names0"] = names[: len(names) // 2]
            file.attrs["layer_names1"] = names[len(names) // 2:]
        else:
            file.attrs["layer_names"] = names
        file.attrs["backend"] = layout["backend"].encode("utf8")
        file.attrs["keras_version"] = b"2.2.4"
        for layer in layers:
            group = file.create_group(layer["name"])
            weight_names = [
                weight["name"] if weight_prefix is None else weight_prefix(layer["name"], weight["name"])
                for weight in layer["weights"]
            ]
            group.attrs["weight_names"] = np.array([name.encode("utf8") for name in weight_names])
            for name, weight in zip(weight_names, layer["weights"]):
                group.create_dataset(name, data=rng.standard_normal(weight["shape"], dtype=np.float32))
    return path


def file_values(path: Path) -> dict[str, list[np.ndarray]]:
    """Read every layer's weights straight from the file with h5py, keyed by file layer name."""
    values = {}
    with h5py.File(path, "r") as file:
        if "layer_names" in file.attrs:
            names = list(file.attrs["layer_names"])
        else:
            names = list(file.attrs["layer_names0"]) + list(file.attrs["layer_names1"])
        for name in names:
            group = file[name.decode("utf8")]
            values[name.decode("utf8")] = [group[weight.decode("utf8")][()] for weight in group.attrs["weight_names"]]
    return values


def weighted_layers(model):
    return [layer for layer in model.layers if layer.weights]


def snapshot(model) -> list[np.ndarray]:
    return [variable.numpy() for variable in model.weights]


def assert_unchanged(model, before: list[np.ndarray]) -> None:
    for variable, value in zip(model.weights, before):
        assert np.array_equal(variable.numpy(), value), f"{variable.path} changed"


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Layer-name mapping


def test_mapping_replaces_slashes():
    assert vggface.keras_layer_name("conv1/7x7_s2/bn") == "conv1.7x7_s2.bn"
    assert vggface.keras_layer_name("fc6/relu") == "fc6.relu"
    assert vggface.keras_layer_name("conv5_3") == "conv5_3"
    assert vggface.file_layer_name("conv1.7x7_s2.bn") == "conv1/7x7_s2/bn"


def test_mapping_round_trips_fixture_names(layouts):
    for key in LAYOUT_KEYS:
        for layer in layouts[key]["layers"]:
            assert "." not in layer["name"], f"{key}: {layer['name']} would not map back"
            assert vggface.file_layer_name(vggface.keras_layer_name(layer["name"])) == layer["name"]


# ---------------------------------------------------------------------------------------------
# Architecture against the six layouts


def network_layout(model) -> list[tuple[str, list[str], list[tuple[int, ...]]]]:
    """(file layer name, weight names, shapes) of each layer with weights, in model order."""
    return [
        (vggface.file_layer_name(layer.name), [w.name for w in layer.weights], [tuple(w.shape) for w in layer.weights])
        for layer in weighted_layers(model)
    ]


def fixture_layout(layout: dict) -> list[tuple[str, list[str], list[tuple[int, ...]]]]:
    return [
        (
            layer["name"],
            [weight["name"].rsplit("/", 1)[-1].split(":")[0] for weight in layer["weights"]],
            [tuple(weight["shape"]) for weight in layer["weights"]],
        )
        for layer in layout["layers"]
        if layer["weights"]
    ]


@pytest.mark.parametrize("key", [key for key in LAYOUT_KEYS if key != "vgg16_top"])
def test_network_matches_layout(key, layouts):
    arch, top = key.split("_")
    include_top = top == "top"
    shape = None if include_top else (SMALL_SIDE, SMALL_SIDE, 3)
    model = vggface.build_vggface(arch, include_top, shape)

    expected = fixture_layout(layouts[key])
    actual = network_layout(model)
    assert len(actual) == len(expected)
    for position, (ours, theirs) in enumerate(zip(actual, expected)):
        assert ours == theirs, f"layer with weights number {position + 1}"
    assert model.count_params() == layouts[key]["params"]


def test_vgg16_top_matches_layout(layouts, vgg16_top_network):
    expected = fixture_layout(layouts["vgg16_top"])
    actual = network_layout(vgg16_top_network)
    assert actual == expected
    assert vgg16_top_network.count_params() == layouts["vgg16_top"]["params"]


def test_vgg16_top_features_are_fc7(vgg16_top_network):
    features = vggface._top_features(vgg16_top_network, "vgg16")
    assert features.output.shape == (None, 4096)
    assert features.layers[-1].name == "fc7.relu"
    assert "fc8" not in [layer.name for layer in features.layers]


@pytest.mark.parametrize("arch", ["resnet50", "senet50"])
def test_top_backbone_gives_pooled_vector(arch):
    model = vggface.vggface_backbone(arch, 224, None, include_top=True)
    assert model.output.shape == (None, 2048)
    assert "classifier" not in [layer.name for layer in model.layers]


# ---------------------------------------------------------------------------------------------
# Input sizes, Grad-CAM layers, preprocessing modes


@pytest.mark.parametrize("arch", vggface.ARCHS)
def test_min_input_size_is_smallest(arch):
    side = vggface.MIN_INPUT_SIZE[arch]
    model = vggface.build_vggface(arch, False, (side, side, 3))
    assert model.output.shape[1:3] == (1, 1)
    with pytest.raises(ValueError):
        _vggface_nets.build_network(arch, False, (side - 1, side - 1, 3))
    with pytest.raises(UserError, match=f"at least {side}x{side}"):
        vggface.build_vggface(arch, False, (side - 1, side - 1, 3))


@pytest.mark.parametrize("arch", vggface.ARCHS)
def test_backbone_without_top_gives_feature_map(arch):
    model = vggface.vggface_backbone(arch, 64, None)
    channels = 512 if arch == "vgg16" else 2048
    assert model.input.shape == (None, 64, 64, 3)
    assert model.output.shape == (None, 2, 2, channels)
    gradcam = model.get_layer(vggface.GRADCAM_LAYER[arch])
    assert len(gradcam.output.shape) == 4
    assert gradcam.output.shape[-1] == channels
    assert preprocessing.check_mode(vggface.PREPROCESSING[arch])


@pytest.mark.parametrize("arch", vggface.ARCHS)
def test_top_needs_input_224(arch):
    with pytest.raises(UserError, match="--input-size 224") as err:
        vggface.vggface_backbone(arch, 160, None, include_top=True)
    assert_one_line(err)


def test_unknown_arch_rejected():
    with pytest.raises(UserError, match="vgg16, resnet50, senet50"):
        vggface.build_vggface("resnet")


# Known pixel: RGB (10, 20, 30), so BGR (30, 20, 10) minus the BGR means.
PIXEL = np.array([[[10, 20, 30]]], dtype=np.uint8)
EXPECTED_PIXEL = {
    "vggface1": (30 - 93.5940, 20 - 104.7624, 10 - 129.1863),
    "vggface2": (30 - 91.4953, 20 - 103.8827, 10 - 131.0912),
}


@pytest.mark.parametrize("arch", vggface.ARCHS)
def test_preprocessing_of_known_pixel(arch):
    mode = vggface.PREPROCESSING[arch]
    expected = np.array([[EXPECTED_PIXEL[mode]]], dtype=np.float32)

    # One float32 rounding step separates these from exact decimal arithmetic.
    from_numpy = preprocessing.preprocess(PIXEL, mode)
    assert from_numpy.dtype == np.float32
    np.testing.assert_allclose(from_numpy, expected, rtol=0, atol=1e-5)

    from_layer = np.asarray(preprocessing.Preprocess(mode)(PIXEL[None].astype(np.float32)))
    np.testing.assert_allclose(from_layer[0], expected, rtol=0, atol=1e-5)


def test_preprocessing_modes_per_arch():
    assert vggface.PREPROCESSING == {"vgg16": "vggface1", "resnet50": "vggface2", "senet50": "vggface2"}


# ---------------------------------------------------------------------------------------------
# Loading files with the published layouts


# Tensors worth naming, per layout: the first convolution, a batch norm in the middle, a
# squeeze-excitation block and the projection after it (senet50), and the last layer. Every
# other tensor is checked too, in the sweep over all layers.
CHOSEN = {
    "vgg16_notop": ["conv1_1", "conv3_2", "conv5_3"],
    "resnet50_notop": ["conv1/7x7_s2", "conv3_2_3x3/bn", "conv4_1_1x1_proj/bn", "conv5_3_1x1_increase/bn"],
    "resnet50_top": ["conv1/7x7_s2", "conv3_2_3x3/bn", "conv5_3_1x1_increase/bn", "classifier"],
    "senet50_notop": ["conv1/7x7_s2/bn", "conv3_3_3x3/bn", "conv3_1_1x1_down", "conv3_1_1x1_up",
                      "conv3_1_1x1_proj", "conv5_3_1x1_up"],
    "senet50_top": ["conv1/7x7_s2", "conv4_2_3x3/bn", "conv4_1_1x1_down", "conv4_1_1x1_proj/bn", "classifier"],
}


def assert_has_file_values(model, values: dict[str, list[np.ndarray]], chosen: list[str]) -> None:
    """Check that the chosen layers, then every layer with weights, hold the file's values exactly."""
    layer_names = {layer.name for layer in model.layers}
    for name in chosen:
        if vggface.keras_layer_name(name) not in layer_names:
            continue  # The classifier, checked on the full network instead.
        layer = model.get_layer(vggface.keras_layer_name(name))
        for variable, value in zip(layer.weights, values[name], strict=True):
            assert np.array_equal(variable.numpy(), value), f"{variable.path} differs from the file"
    for layer in weighted_layers(model):
        for variable, value in zip(layer.weights, values[vggface.file_layer_name(layer.name)], strict=True):
            assert np.array_equal(variable.numpy(), value), f"{variable.path} differs from the file"


@pytest.mark.parametrize("key", ["vgg16_notop", "resnet50_notop", "senet50_notop"])
def test_notop_file_loads_exactly(key, layouts, tmp_path, vgg16_notop_file, resnet50_notop_file):
    arch = key.split("_")[0]
    if arch == "vgg16":
        path = vgg16_notop_file
    elif arch == "resnet50":
        path = resnet50_notop_file
    else:
        path = write_keras2_weights(tmp_path / vggface.WEIGHTS_FILES[(arch, False)], layouts[key], seed=3,
                                    chunk_layer_names=True)
    values = file_values(path)

    model = vggface.vggface_backbone(arch, SMALL_SIDE, str(path))

    assert_has_file_values(model, values, CHOSEN[key])


@pytest.mark.parametrize("arch", ["resnet50", "senet50"])
def test_top_file_loads_exactly(arch, layouts, tmp_path):
    key = f"{arch}_top"
    path = write_keras2_weights(tmp_path / vggface.WEIGHTS_FILES[(arch, True)], layouts[key], seed=4)
    values = file_values(path)

    # The path users take: the backbone keeps everything up to the pooled vector.
    backbone = vggface.vggface_backbone(arch, 224, str(path), include_top=True)
    assert_has_file_values(backbone, values, CHOSEN[key])

    # The classifier, which the backbone drops, loads too.
    network = vggface.build_vggface(arch, include_top=True)
    vggface.load_vggface_weights(network, path)
    classifier = network.get_layer("classifier")
    assert np.array_equal(classifier.kernel.numpy(), values["classifier"][0])
    assert np.array_equal(classifier.bias.numpy(), values["classifier"][1])


def test_top_file_serves_network_without_top(layouts, tmp_path):
    path = write_keras2_weights(tmp_path / "rcmalli_vggface_tf_resnet50.h5", layouts["resnet50_top"], seed=5)
    values = file_values(path)

    model = vggface.vggface_backbone("resnet50", SMALL_SIDE, str(path), include_top=False)

    assert model.output.shape == (None, 1, 1, 2048)
    assert_has_file_values(model, values, CHOSEN["resnet50_notop"])


def test_weight_prefixes_ignored(layouts, tmp_path):
    # Older Keras versions wrote other prefixes, such as "conv1_1_1/kernel:0".
    path = write_keras2_weights(tmp_path / "prefixed.h5", layouts["vgg16_notop"], seed=6,
                                weight_prefix=lambda layer, weight: f"{layer}_1/{weight.rsplit('/', 1)[-1]}")
    model = vggface.build_vggface("vgg16", False, (SMALL_SIDE, SMALL_SIDE, 3))

    vggface.load_vggface_weights(model, path)

    with h5py.File(path, "r") as file:
        expected = file["conv5_3"]["conv5_3_1/kernel:0"][()]
    assert np.array_equal(model.get_layer("conv5_3").kernel.numpy(), expected)


def test_vggface_weights_come_from_cache(vgg16_notop_file, tmp_path, monkeypatch):
    cache = tmp_path / "keras" / "models" / "vggface"
    cache.mkdir(parents=True)
    shutil.copy(vgg16_notop_file, cache / vgg16_notop_file.name)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))

    model = vggface.vggface_backbone("vgg16", SMALL_SIDE, "vggface")

    assert np.array_equal(model.get_layer("conv1_1").kernel.numpy(), file_values(vgg16_notop_file)["conv1_1"][0])


# ---------------------------------------------------------------------------------------------
# Rejected files leave the network unchanged


@pytest.fixture
def vgg16_notop_network():
    return vggface.build_vggface("vgg16", False, (SMALL_SIDE, SMALL_SIDE, 3))


def change_shape(layers):
    layer = next(layer for layer in layers if layer["name"] == "conv4_2")
    layer["weights"][0]["shape"] = [3, 3, 512, 511]
    return layers


def drop_layer(layers):
    return [layer for layer in layers if layer["name"] != "conv3_2"]


def rename_weight(layers):
    layer = next(layer for layer in layers if layer["name"] == "conv2_1")
    layer["weights"][1]["name"] = "conv2_1/gamma:0"
    return layers


@pytest.mark.parametrize(
    "edit, expected",
    [
        (change_shape, "weight 'conv4_2/kernel:0' has shape (3, 3, 512, 511) in the file but (3, 3, 512, 512)"),
        (drop_layer, "is 'conv3_3' in the file but 'conv3_2' in the network"),
        (rename_weight, "'conv2_1/gamma:0' in the file where the network has 'bias'"),
    ],
    ids=["shape changed", "layer missing", "weight renamed"],
)
def test_mismatched_file_rejected(edit, expected, layouts, tmp_path, vgg16_notop_network):
    path = write_keras2_weights(tmp_path / "edited.h5", layouts["vgg16_notop"], seed=7, edit=edit)
    before = snapshot(vgg16_notop_network)

    with pytest.raises(UserError) as err:
        vggface.load_vggface_weights(vgg16_notop_network, path)

    message = assert_one_line(err)
    assert expected in message
    assert str(path) in message
    assert "rcmalli_vggface_tf_notop_vgg16.h5" in message
    assert_unchanged(vgg16_notop_network, before)


def test_cut_short_file_rejected(vgg16_notop_file, tmp_path, vgg16_notop_network):
    path = tmp_path / "cut.h5"
    path.write_bytes(vgg16_notop_file.read_bytes()[: vgg16_notop_file.stat().st_size // 2])
    before = snapshot(vgg16_notop_network)

    with pytest.raises(UserError, match="not a readable Keras 2 HDF5 weights file") as err:
        vggface.load_vggface_weights(vgg16_notop_network, path)

    assert "truncated" in assert_one_line(err)
    assert_unchanged(vgg16_notop_network, before)


def test_non_hdf5_file_rejected(tmp_path, vgg16_notop_network):
    path = tmp_path / "page.h5"
    path.write_text("<html>Not Found</html>\n")

    with pytest.raises(UserError, match="not a readable Keras 2 HDF5 weights file") as err:
        vggface.load_vggface_weights(vgg16_notop_network, path)
    assert_one_line(err)


def test_missing_file_rejected(tmp_path, vgg16_notop_network):
    with pytest.raises(UserError, match="weights file not found"):
        vggface.load_vggface_weights(vgg16_notop_network, tmp_path / "absent.h5")


def test_unreadable_values_leave_network_unchanged(layouts, tmp_path, vgg16_notop_network):
    # The layout is right, but the last bias lives in an external file that is gone, so reading
    # its values fails after every earlier layer was read.
    path = write_keras2_weights(tmp_path / "external.h5", layouts["vgg16_notop"], seed=8)
    external = tmp_path / "conv5_3_bias.bin"
    external.write_bytes(np.zeros(512, np.float32).tobytes())
    with h5py.File(path, "a") as file:
        group = file["conv5_3"]
        del group["conv5_3/bias:0"]
        group.create_dataset("conv5_3/bias:0", shape=(512,), dtype="float32", external=[(str(external), 0, 2048)])
    external.unlink()
    before = snapshot(vgg16_notop_network)

    with pytest.raises(UserError, match="cannot read the weights") as err:
        vggface.load_vggface_weights(vgg16_notop_network, path)

    assert_one_line(err)
    assert_unchanged(vgg16_notop_network, before)


def test_theano_file_rejected(vgg16_notop_file, tmp_path, vgg16_notop_network):
    path = tmp_path / "theano.h5"
    shutil.copy(vgg16_notop_file, path)
    with h5py.File(path, "a") as file:
        file.attrs["backend"] = b"theano"

    with pytest.raises(UserError, match="theano backend"):
        vggface.load_vggface_weights(vgg16_notop_network, path)


def test_notop_file_rejected_by_top_network(resnet50_notop_file):
    network = vggface.build_vggface("resnet50", include_top=True)
    before = snapshot(network)

    with pytest.raises(UserError) as err:
        vggface.load_vggface_weights(network, resnet50_notop_file)

    message = assert_one_line(err)
    assert "the file ends after 106 layers with weights" in message
    assert "continues with 'classifier'" in message
    assert "give rcmalli_vggface_tf_resnet50.h5" in message
    assert_unchanged(network, before)


def test_notop_file_rejected_for_include_top(resnet50_notop_file):
    with pytest.raises(UserError) as err:
        vggface.vggface_backbone("resnet50", 224, str(resnet50_notop_file), include_top=True)

    message = assert_one_line(err)
    assert "resnet50 without top" in message
    assert "--include-top" in message
    assert "rcmalli_vggface_tf_resnet50.h5" in message


def test_resnet50_file_rejected_by_senet50(resnet50_notop_file):
    network = vggface.build_vggface("senet50", False, (SMALL_SIDE, SMALL_SIDE, 3))
    before = snapshot(network)

    with pytest.raises(UserError) as err:
        vggface.load_vggface_weights(network, resnet50_notop_file)

    message = assert_one_line(err)
    assert "does not fit the senet50 without top" in message
    assert "weighted layer 8 is 'conv2_1_1x1_proj' in the file but 'conv2_1_1x1_increase/bn' in the network" in message
    assert "it contains resnet50 without top" in message
    assert_unchanged(network, before)


def test_backbone_names_both_archs(resnet50_notop_file):
    with pytest.raises(UserError) as err:
        vggface.vggface_backbone("senet50", SMALL_SIDE, str(resnet50_notop_file))

    message = assert_one_line(err)
    assert "contains resnet50 without top" in message
    assert "the network is senet50 without top" in message
    assert "-m resnet50" in message


# ---------------------------------------------------------------------------------------------
# Downloading into the cache


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class _CutHandler(_QuietHandler):
    """Announces the whole file, sends half of it, then closes the connection."""

    def do_GET(self):
        data = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.close_connection = True


@pytest.fixture
def serve(tmp_path):
    """Return a function that serves a folder over HTTP on 127.0.0.1 and returns the base URL."""
    servers = []

    def start(folder: Path, handler=_QuietHandler) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def notop_layout_network():
    return vggface.build_vggface("vgg16", False, (SMALL_SIDE, SMALL_SIDE, 3))


def test_download_lands_in_cache(vgg16_notop_file, tmp_path, serve, notop_layout_network):
    url = serve(vgg16_notop_file.parent)
    cache = tmp_path / "cache"

    path = vggface.fetch_vggface_weights("vgg16", False, cache, base_url=url, network=notop_layout_network)

    assert path == cache / "rcmalli_vggface_tf_notop_vgg16.h5"
    assert path.read_bytes() == vgg16_notop_file.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == [path.name]

    # A second call uses the cached file without contacting the server.
    offline = f"http://127.0.0.1:{closed_port()}/"
    assert vggface.fetch_vggface_weights("vgg16", False, cache, base_url=offline, network=notop_layout_network) == path


def test_download_from_file_url(vgg16_notop_file, tmp_path, notop_layout_network):
    cache = tmp_path / "cache"
    path = vggface.fetch_vggface_weights(
        "vgg16", False, cache, base_url=vgg16_notop_file.parent.as_uri() + "/", network=notop_layout_network
    )
    assert path.stat().st_size == vgg16_notop_file.stat().st_size


def test_truncated_download_rejected(vgg16_notop_file, tmp_path, serve, notop_layout_network):
    served = tmp_path / "served"
    served.mkdir()
    data = vgg16_notop_file.read_bytes()
    (served / vgg16_notop_file.name).write_bytes(data[: len(data) // 2])
    cache = tmp_path / "cache"

    with pytest.raises(UserError) as err:
        vggface.fetch_vggface_weights("vgg16", False, cache, base_url=serve(served), network=notop_layout_network)

    message = assert_one_line(err)
    assert "rcmalli_vggface_tf_notop_vgg16.h5" in message
    assert "truncated" in message
    assert "--weights PATH" in message
    assert list(cache.iterdir()) == []


def test_dropped_connection_rejected(vgg16_notop_file, tmp_path, serve, notop_layout_network):
    cache = tmp_path / "cache"
    url = serve(vgg16_notop_file.parent, handler=_CutHandler)

    with pytest.raises(UserError) as err:
        vggface.fetch_vggface_weights("vgg16", False, cache, base_url=url, network=notop_layout_network)

    message = assert_one_line(err)
    assert f"{url}rcmalli_vggface_tf_notop_vgg16.h5" in message
    assert "--weights PATH" in message
    assert list(cache.iterdir()) == []


def test_wrong_size_download_rejected(vgg16_notop_file, tmp_path, serve, notop_layout_network, monkeypatch):
    size = vgg16_notop_file.stat().st_size
    monkeypatch.setitem(vggface.FILE_SIZES, vgg16_notop_file.name, size + 1)
    cache = tmp_path / "cache"

    with pytest.raises(UserError) as err:
        vggface.fetch_vggface_weights("vgg16", False, cache, base_url=serve(vgg16_notop_file.parent),
                                      network=notop_layout_network)

    assert f"expected {size + 1:,}" in assert_one_line(err)
    assert list(cache.iterdir()) == []


def test_download_of_other_network_rejected(resnet50_notop_file, tmp_path, serve, notop_layout_network):
    # The server returns the ResNet50 file under the VGG16 name.
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(resnet50_notop_file, served / "rcmalli_vggface_tf_notop_vgg16.h5")
    cache = tmp_path / "cache"

    with pytest.raises(UserError) as err:
        vggface.fetch_vggface_weights("vgg16", False, cache, base_url=serve(served), network=notop_layout_network)

    message = assert_one_line(err)
    assert "is wrong" in message
    assert "'conv1/7x7_s2' in the file but 'conv1_1' in the network" in message
    assert list(cache.iterdir()) == []


def closed_port() -> int:
    """Return a port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_offline_download_names_file_and_fix(tmp_path, notop_layout_network):
    url = f"http://127.0.0.1:{closed_port()}/"
    cache = tmp_path / "cache"

    with pytest.raises(UserError) as err:
        vggface.fetch_vggface_weights("vgg16", False, cache, base_url=url, network=notop_layout_network)

    message = assert_one_line(err)
    assert f"cannot download rcmalli_vggface_tf_notop_vgg16.h5 from {url}rcmalli_vggface_tf_notop_vgg16.h5" in message
    assert "--weights PATH" in message
    assert list(cache.iterdir()) == []


def test_missing_release_file_rejected(tmp_path, serve, notop_layout_network):
    empty = tmp_path / "empty"
    empty.mkdir()

    with pytest.raises(UserError, match="HTTP 404") as err:
        vggface.fetch_vggface_weights("vgg16", False, tmp_path / "cache", base_url=serve(empty),
                                      network=notop_layout_network)
    assert_one_line(err)


def test_wrong_cached_file_rejected(tmp_path, notop_layout_network):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "rcmalli_vggface_tf_notop_vgg16.h5").write_text("partial")

    with pytest.raises(UserError, match="delete it to download it again") as err:
        vggface.fetch_vggface_weights("vgg16", False, cache, network=notop_layout_network)
    assert_one_line(err)


def test_known_size_of_resnet50_notop():
    assert vggface.FILE_SIZES["rcmalli_vggface_tf_notop_resnet50.h5"] == 94_694_792
    assert vggface.RELEASE_URL == "https://github.com/rcmalli/keras-vggface/releases/download/v2.0/"


def test_backbone_survives_keras_save(tmp_path):
    # Layer names with "." (from "/" in the files) must survive the .keras format.
    model = vggface.vggface_backbone("resnet50", SMALL_SIDE, None)
    model.save(tmp_path / "backbone.keras")

    loaded = keras.models.load_model(tmp_path / "backbone.keras")

    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    assert loaded.get_layer("conv1.7x7_s2.bn").name == "conv1.7x7_s2.bn"
    for saved, restored in zip(model.weights, loaded.weights, strict=True):
        assert np.array_equal(saved.numpy(), restored.numpy()), saved.path
