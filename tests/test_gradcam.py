"""Grad-CAM heat maps: the maths, a model whose class depends on a known region, every backbone, dog faces, the CLI."""

import json
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

import grad_CAM
import training
from conftest import REPO, shared_path, write_photo
from utils import artifacts, cli, gradcam
from utils.backbones import BACKBONES, build_backbone
from utils.head import build_classifier

# --- Pure functions ----------------------------------------------------------------------------


def test_heatmap_all_zero_stays_zero():
    feature_map = np.ones((1, 3, 3, 2), dtype=np.float32)
    weights = np.array([[-1.0, -0.5]], dtype=np.float32)

    heatmap = gradcam.weighted_heatmap(feature_map, weights)

    assert heatmap.dtype == np.float32
    assert heatmap.shape == (1, 3, 3)
    assert np.all(heatmap == 0.0)


def test_heatmap_scaled_to_unit_range():
    feature_map = np.zeros((2, 2, 2, 1), dtype=np.float32)
    feature_map[:, 0, 1, 0] = [3.0, 0.001]
    feature_map[:, 1, 0, 0] = [1.5, 0.0005]

    heatmap = gradcam.weighted_heatmap(feature_map, np.ones((2, 1)))

    assert heatmap.max() == 1.0
    assert heatmap.min() == 0.0
    np.testing.assert_allclose(heatmap[0], [[0.0, 1.0], [0.5, 0.0]])
    np.testing.assert_allclose(heatmap[1], [[0.0, 1.0], [0.5, 0.0]])


def test_gradcam_weights_spatial_mean():
    gradients = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)

    weights = gradcam.channel_weights(np.ones_like(gradients), gradients, "gradcam")

    np.testing.assert_allclose(weights, [[3.0, 4.0]])


def test_gradcam_plus_plus_weights_formula():
    # One channel, two positions: A = (1, 3), dS/dA = (1, -1), so sum(A) = 4. Position 0 has
    # alpha = 1 / (2 + 4) and ReLU(g) = 1; position 1 has ReLU(g) = 0. Weight: 1/6.
    feature_map = np.array([1.0, 3.0]).reshape(1, 2, 1, 1)
    gradients = np.array([1.0, -1.0]).reshape(1, 2, 1, 1)

    weights = gradcam.channel_weights(feature_map, gradients, "gradcam++")

    np.testing.assert_allclose(weights, [[1.0 / 6.0]], rtol=1e-6)


def test_gradcam_plus_plus_zero_gradients():
    weights = gradcam.channel_weights(np.ones((1, 2, 2, 3)), np.zeros((1, 2, 2, 3)), "gradcam++")

    assert np.all(np.isfinite(weights))
    assert np.all(weights == 0.0)


def test_channel_weights_rejects_bad_input():
    with pytest.raises(ValueError, match="method must be one of gradcam, gradcam\\+\\+"):
        gradcam.channel_weights(np.ones((1, 2, 2, 1)), np.ones((1, 2, 2, 1)), "scorecam")
    with pytest.raises(ValueError, match="one 4-D shape"):
        gradcam.channel_weights(np.ones((1, 2, 2, 1)), np.ones((1, 2, 2, 2)), "gradcam")


def test_overlay_blend_and_size():
    image = np.full((20, 30, 3), 100, dtype=np.uint8)
    heatmap = np.zeros((4, 4), dtype=np.float32)

    assert np.array_equal(gradcam.overlay(image, heatmap, alpha=0.0), image)
    blended = gradcam.overlay(image, heatmap, alpha=1.0)
    assert blended.shape == image.shape
    assert blended.dtype == np.uint8
    # jet maps 0 to dark blue.
    assert blended[0, 0, 2] > 100
    assert blended[0, 0, 0] == 0


def test_overlay_rejects_bad_input():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="alpha must be from 0 to 1"):
        gradcam.overlay(image, np.zeros((2, 2)), alpha=1.5)
    with pytest.raises(ValueError, match="uint8 RGB photo"):
        gradcam.overlay(image.astype(np.float32), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="heat map in \\[0, 1\\]"):
        gradcam.overlay(image, np.full((2, 2), 2.0))


def test_resize_heatmap_to_photo():
    heatmap = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)

    resized = gradcam.resize_heatmap(heatmap, 40, 60)

    assert resized.shape == (40, 60)
    assert resized.dtype == np.float32
    assert resized.min() >= 0.0
    assert resized.max() <= 1.0


# --- A model whose class depends on a known region ---------------------------------------------

SIZE, HALF, PATCH = 32, 16, 8
# The class is the colour of one 8x8 patch, placed in any quadrant. A white patch in another
# quadrant is brighter than either colour but does not affect the class.
CLASS_COLOURS = ((230, 40, 40), (40, 230, 40))
DISTRACTOR = (230, 230, 230)


def patch_images(rng, labels, quadrants, distractor_quadrants):
    """Dark noise with a class-coloured patch in one quadrant and a white patch in another."""
    images = rng.integers(0, 60, (len(labels), SIZE, SIZE, 3)).astype(np.uint8)
    for index, (label, quadrant, distractor) in enumerate(zip(labels, quadrants, distractor_quadrants)):
        for where, colour in ((quadrant, CLASS_COLOURS[label]), (distractor, DISTRACTOR)):
            top = (where // 2) * HALF + rng.integers(0, HALF - PATCH + 1)
            left = (where % 2) * HALF + rng.integers(0, HALF - PATCH + 1)
            images[index, top:top + PATCH, left:left + PATCH] = colour
    return images


def quadrant_of_peak(heatmap):
    row, column = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    return (row // (heatmap.shape[0] // 2)) * 2 + column // (heatmap.shape[1] // 2)


@pytest.fixture(scope="module", params=["avg", "flatten"])
def patch_model(request, tmp_path_factory):
    """A small classifier trained on patch images, saved and loaded back, with a nested backbone."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 512)
    quadrants = rng.integers(0, 4, 512)
    images = patch_images(rng, labels, quadrants, (quadrants + rng.integers(1, 4, 512)) % 4)

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool2")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv3")(x)
    backbone = keras.Model(inputs, x, name="patch_backbone")
    model = build_classifier(backbone, input_size=SIZE, preprocessing="mobilenet_v2", pooling=request.param,
                             hidden=(16,), dropout=0.1, num_classes=2)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(images, labels, epochs=10, batch_size=32, verbose=0)

    path = tmp_path_factory.mktemp("patch") / "model.keras"
    artifacts.save_model_atomic(model, path)
    return artifacts.load_keras_model(path)


@pytest.mark.parametrize("method", gradcam.METHODS)
def test_peak_in_decisive_quadrant(patch_model, method):
    rng = np.random.default_rng(1)
    gradient_model = gradcam.build_gradient_model(patch_model)

    for label in (0, 1):
        for shift in (1, 2, 3):
            quadrants = [0, 1, 2, 3]
            images = patch_images(rng, [label] * 4, quadrants, [(q + shift) % 4 for q in quadrants])
            maps = gradcam.compute_activation_maps(gradient_model, images, label, method=method)
            for quadrant, result in zip(quadrants, maps):
                assert result.heatmap.shape == (8, 8)
                assert int(np.argmax(result.probabilities)) == label, "the model did not learn the patch colour"
                assert quadrant_of_peak(result.heatmap) == quadrant, (
                    f"class {label}, patch in quadrant {quadrant}, white patch in {(quadrant + shift) % 4}")


def test_default_layer_is_last_conv(patch_model):
    assert gradcam.find_conv_layer(gradcam.find_backbone(patch_model)) == "conv3"


def test_logits_match_softmax_output(patch_model):
    images = patch_images(np.random.default_rng(2), [0, 1], [0, 3], [1, 2])
    gradient_model = gradcam.build_gradient_model(patch_model)

    before = np.asarray(patch_model(images))
    feature_map, logits = gradient_model(images)
    after = np.asarray(patch_model(images))

    assert tuple(feature_map.shape) == (2, 8, 8, 32)
    np.testing.assert_allclose(keras.ops.softmax(logits).numpy(), before, atol=1e-5)
    # The loaded model keeps its softmax: its output is unchanged and sums to 1.
    np.testing.assert_allclose(after, before)
    np.testing.assert_allclose(after.sum(axis=1), 1.0, atol=1e-5)
    assert patch_model.get_layer("out").activation is keras.activations.softmax


def test_earlier_layer_map_size(patch_model):
    gradient_model = gradcam.build_gradient_model(patch_model, "conv1")
    images = patch_images(np.random.default_rng(3), [1], [2], [0])

    heatmap = gradcam.compute_heatmap(gradient_model, images[0], 1)

    assert heatmap.shape == (SIZE, SIZE)


def test_vector_backbone_without_hidden_layers():
    # As with --include-top: the backbone ends in its own dense layer, so the classifier has no
    # pooling, and with no hidden layers the softmax layer reads the backbone's output directly.
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(6, activation="relu", name="descriptor")(x)
    backbone = keras.Model(inputs, x, name="vector_backbone")
    model = build_classifier(backbone, input_size=SIZE, preprocessing="none", pooling="avg", hidden=(),
                             dropout=0.0, num_classes=3)
    images = patch_images(np.random.default_rng(4), [0, 1], [1, 2], [3, 0])

    gradient_model = gradcam.build_gradient_model(model)
    feature_map, logits = gradient_model(images)
    maps = gradcam.compute_activation_maps(gradient_model, images, method="gradcam++")

    assert gradcam.find_conv_layer(backbone) == "conv"
    assert tuple(feature_map.shape) == (2, SIZE - 2, SIZE - 2, 4)
    np.testing.assert_allclose(keras.ops.softmax(logits).numpy(), np.asarray(model(images)), atol=1e-5)
    assert [result.heatmap.shape for result in maps] == [(SIZE - 2, SIZE - 2)] * 2


def test_unknown_layer_lists_nearby(patch_model):
    with pytest.raises(ValueError, match="'conv4' not found .*conv[123]"):
        gradcam.build_gradient_model(patch_model, "conv4")


# --- Every backbone, saved and loaded back -----------------------------------------------------

BACKBONE_INPUT_SIZE = 64


def write_untrained_granja(models_dir, granja, backbone_name, input_size):
    """Write models/<granja>/ as training.py does, with random weights and no fitting.

    Returns:
        The default Grad-CAM layer found on the freshly built backbone, and its map shape.
    """
    spec = BACKBONES[backbone_name]
    backbone = build_backbone(spec, input_size, "none")
    model = build_classifier(backbone, input_size=input_size, preprocessing=spec.preprocessing,
                             pooling=spec.default_pooling, hidden=(8,), dropout=0.1, num_classes=2)
    found_layer = gradcam.find_conv_layer(backbone)
    map_shape = tuple(backbone.get_layer(found_layer).output.shape[1:3])

    folder = models_dir / granja
    class_names = ["Peluchín", "Perrete 2"]
    artifacts.save_model_atomic(model, folder / artifacts.MODEL_FILE)
    artifacts.atomic_write_json(folder / artifacts.LABELS_FILE,
                                {name: index for index, name in enumerate(class_names)}, sort_keys=False)
    artifacts.atomic_write_json(folder / artifacts.TRAINING_FILE, {
        "format_version": artifacts.FORMAT_VERSION, "granja": granja, "backbone": spec.name,
        "backbone_layer": backbone.name, "weights": "none", "include_top": False, "input_size": input_size,
        "preprocessing": spec.preprocessing, "pooling": spec.default_pooling, "gradcam_layer": spec.gradcam_layer,
        "class_names": class_names,
    })
    return found_layer, map_shape


@pytest.fixture(scope="module", params=list(BACKBONES))
def backbone_granja(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"granja_{request.param}")
    found_layer, map_shape = write_untrained_granja(root / "models", "farm", request.param, BACKBONE_INPUT_SIZE)
    photo = write_photo(root / "photos" / "face.jpg", seed=7, size=90)
    return {"name": request.param, "root": root, "photo": photo, "found_layer": found_layer, "map_shape": map_shape}


def test_registry_layer_is_last_conv(backbone_granja):
    assert backbone_granja["found_layer"] == BACKBONES[backbone_granja["name"]].gradcam_layer


def test_backbone_figure_and_array(backbone_granja, capsys):
    # Both methods share every step but the channel weights, which the patch model tests cover.
    root = backbone_granja["root"]
    out = root / "figures" / "face.png"

    code = cli.run(grad_CAM.main, ["-ng", "farm", "--img", str(backbone_granja["photo"]), "--models-dir",
                                   str(root / "models"), "--out", str(out), "--save-array",
                                   "-m", backbone_granja["name"]])

    assert code == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out.splitlines()
    assert len(stdout) == 1
    path, class_name, score = stdout[0].split("\t")
    assert path == str(out)
    assert class_name in ("Peluchín", "Perrete 2")
    assert 0.0 <= float(score) <= 1.0
    with Image.open(out) as figure:
        figure.verify()
    with Image.open(out) as figure:
        assert figure.format == "PNG"
        assert figure.width > 300
    heatmap = np.load(out.with_suffix(".npy"))
    assert heatmap.dtype == np.float32
    assert heatmap.shape == backbone_granja["map_shape"]
    assert heatmap.min() >= 0.0
    assert heatmap.max() <= 1.0


# --- The command line on a granja made by training.py ------------------------------------------


@pytest.fixture(scope="module")
def trained_granja(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    for class_index, name in enumerate(("Peluchín", "Perrete 2")):
        for index in range(4):
            write_photo(root / "dataset" / "farm" / name / f"{name[0]}{index}.jpg", seed=10 * class_index + index)
    code = cli.run(training.main, [
        "-ng", "farm", "-m", "mobilenetv2", "--weights", "none", "--input-size", "64", "-e", "1", "-bs", "4",
        "--hidden", "8", "--no-augment", "--quiet", "--dataset-dir", str(root / "dataset"),
        "--models-dir", str(root / "models"), "--logs-dir", str(root / "logs")])
    assert code == 0
    return root


def gradcam_args(root, *extra):
    return ["-ng", "farm", "--models-dir", str(root / "models"), "--logs-dir", str(root / "logs"), *extra]


def test_folder_one_figure_each(trained_granja, monkeypatch, capsys):
    loads = []
    original = artifacts.load_keras_model
    monkeypatch.setattr(artifacts, "load_keras_model", lambda path: loads.append(path) or original(path))
    folder = trained_granja / "dataset" / "farm"
    capsys.readouterr()

    code = cli.run(grad_CAM.main, gradcam_args(trained_granja, "--img", str(folder)))

    assert code == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 8
    assert len({line.split("\t")[0] for line in lines}) == 8
    assert len(loads) == 1
    class_names = json.loads((trained_granja / "models" / "farm" / "labels.json").read_text(encoding="utf-8"))
    for line in lines:
        path, class_name, score = line.split("\t")
        assert class_name in class_names
        assert path.startswith(str(trained_granja / "logs" / "farm" / "gradcam"))
        assert path.endswith(f"_{class_name}.png")
        with Image.open(path) as figure:
            assert figure.format == "PNG"


def test_folder_skips_a_broken_photo(trained_granja, tmp_path, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(trained_granja / "dataset" / "farm" / "Peluchín", folder)
    (folder / "empty.jpg").write_bytes(b"")
    capsys.readouterr()

    code = cli.run(grad_CAM.main, gradcam_args(trained_granja, "--img", str(folder), "--out", str(tmp_path / "out")))

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert len(captured.out.splitlines()) == len(list(folder.glob("P*.jpg")))
    assert [line for line in captured.err.splitlines() if "empty.jpg" in line][0].startswith("WARNING")


def test_class_flag_explains_that_class(trained_granja, capsys):
    photo = trained_granja / "dataset" / "farm" / "Peluchín" / "P0.jpg"

    code = cli.run(grad_CAM.main, gradcam_args(trained_granja, "--img", str(photo), "--class", "Perrete 2",
                                               "--method", "gradcam++"))

    assert code == 0, capsys.readouterr().err
    path, class_name, _ = capsys.readouterr().out.strip().split("\t")
    assert class_name == "Perrete 2"
    assert path == str(trained_granja / "logs" / "farm" / "gradcam" / "P0_Perrete 2.png")


def test_show_without_display_saves(trained_granja, monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    photo = trained_granja / "dataset" / "farm" / "Perrete 2" / "P1.jpg"
    out = trained_granja / "shown" / "figure.png"

    code = cli.run(grad_CAM.main, gradcam_args(trained_granja, "--img", str(photo), "--show", "--out", str(out)))

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "no display found" in captured.err
    assert out.is_file()


def run_failing(argv, capsys):
    """Run grad_CAM.main and return its one stderr line, checking the exit status and empty stdout."""
    capsys.readouterr()
    code = cli.run(grad_CAM.main, argv)
    captured = capsys.readouterr()
    assert code == cli.EXIT_USER_ERROR
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_error_missing_model(tmp_path, capsys):
    photo = write_photo(tmp_path / "face.jpg", seed=1)

    message = run_failing(gradcam_args(tmp_path, "--img", str(photo)), capsys)

    assert "no trained model for granja 'farm'" in message


def test_error_not_an_image(trained_granja, tmp_path, capsys):
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")

    message = run_failing(gradcam_args(trained_granja, "--img", str(notes)), capsys)

    assert "cannot decode" in message
    assert "notes.jpg" in message


def test_error_missing_photo(trained_granja, tmp_path, capsys):
    message = run_failing(gradcam_args(trained_granja, "--img", str(tmp_path / "gone.jpg")), capsys)

    assert "gone.jpg" in message


def test_error_unknown_class(trained_granja, capsys):
    photo = trained_granja / "dataset" / "farm" / "Peluchín" / "P0.jpg"

    message = run_failing(gradcam_args(trained_granja, "--img", str(photo), "--class", "Rex"), capsys)

    assert "--class 'Rex' is not a class" in message
    assert "Peluchín, Perrete 2" in message


def test_error_unknown_layer(trained_granja, capsys):
    photo = trained_granja / "dataset" / "farm" / "Peluchín" / "P0.jpg"

    message = run_failing(gradcam_args(trained_granja, "--img", str(photo), "--layer", "out_relux"), capsys)

    assert "--layer 'out_relux' is not a layer of" in message
    assert "out_relu" in message


def test_error_layer_without_feature_map(trained_granja, capsys):
    photo = trained_granja / "dataset" / "farm" / "Peluchín" / "P0.jpg"

    message = run_failing(gradcam_args(trained_granja, "--img", str(photo), "--layer", "fc1"), capsys)

    assert "--layer 'fc1'" in message


def test_error_model_mismatch(trained_granja, capsys):
    photo = trained_granja / "dataset" / "farm" / "Peluchín" / "P0.jpg"

    message = run_failing(gradcam_args(trained_granja, "--img", str(photo), "-m", "vgg16"), capsys)

    assert "--model vgg16" in message
    assert "mobilenetv2" in message


def test_error_png_out_for_several(trained_granja, tmp_path, capsys):
    folder = trained_granja / "dataset" / "farm" / "Peluchín"

    message = run_failing(gradcam_args(trained_granja, "--img", str(folder), "--out", str(tmp_path / "a.png")),
                          capsys)

    assert "names one PNG file" in message


def test_script_exit_status_two(tmp_path):
    photo = write_photo(tmp_path / "face.jpg", seed=2)

    result = subprocess.run(
        [sys.executable, str(REPO / "grad_CAM.py"), "-ng", "farm", "--img", str(photo),
         "--models-dir", str(tmp_path / "models")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: no trained model for granja 'farm'")


# --- Real dog faces ----------------------------------------------------------------------------

REAL_INPUT_SIZE = 160
REAL_DOGS = 8
# Share of a uniform map that falls in the central 60% of each side.
UNIFORM_CENTRE_SHARE = 0.6 * 0.6


@pytest.fixture(scope="module")
def dog_granja(tmp_path_factory):
    """A granja of 8 dogs of dogs42 trained on the shared dog-breed MobileNetV2 weights."""
    source = shared_path("data", "granjas", "dogs42")
    weights = shared_path("weights", "mobilenet_v2_dogbreeds_notop.weights.h5")
    root = tmp_path_factory.mktemp("dogs")
    dataset = root / "dataset" / "dogs"
    dataset.mkdir(parents=True)
    for dog in sorted(path for path in source.iterdir() if path.is_dir())[:REAL_DOGS]:
        (dataset / dog.name).symlink_to(dog)
    code = cli.run(training.main, [
        "-ng", "dogs", "-m", "mobilenetv2", "--weights", str(weights), "--input-size", str(REAL_INPUT_SIZE),
        "-e", "8", "--hidden", "64", "--freeze", "-2", "--quiet", "--dataset-dir", str(root / "dataset"),
        "--models-dir", str(root / "models"), "--logs-dir", str(root / "logs")])
    assert code == 0

    from utils.images import load_photo

    trained = artifacts.load_trained(root / "models", "dogs")
    split = json.loads((trained.folder / artifacts.SPLIT_FILE).read_text(encoding="utf-8"))
    photos = np.stack([load_photo(dataset / name, REAL_INPUT_SIZE) for name in split["test"]])
    labels = [trained.class_names.index(name.split("/")[0]) for name in split["test"]]
    return trained, photos, labels


def map_shares(gradient_model, photos, labels, method, top, bottom, left, right):
    """Share of each photo's heat map, resized to the photo, inside rows top:bottom and columns left:right."""
    shares = []
    for start in range(0, len(photos), 16):
        maps = gradcam.compute_activation_maps(gradient_model, photos[start:start + 16], labels[start:start + 16],
                                               method=method)
        for result in maps:
            heatmap = gradcam.resize_heatmap(result.heatmap, photos.shape[1], photos.shape[2])
            shares.append(float(heatmap[top:bottom, left:right].sum() / max(float(heatmap.sum()), 1e-12)))
    return np.array(shares)


@pytest.mark.slow
@pytest.mark.parametrize("method", gradcam.METHODS)
def test_dog_maps_on_face(dog_granja, method):
    trained, photos, labels = dog_granja
    gradient_model = gradcam.build_gradient_model(trained.model, trained.metadata["gradcam_layer"])
    low, high = round(0.2 * REAL_INPUT_SIZE), round(0.8 * REAL_INPUT_SIZE)

    shares = map_shares(gradient_model, photos, labels, method, low, high, low, high)

    print(f"{method}: share of the map in the central 60%: mean {shares.mean():.3f}, min {shares.min():.3f} "
          f"over {len(shares)} test photos")
    assert shares.mean() > 0.5
    assert shares.min() > UNIFORM_CENTRE_SHARE


@pytest.mark.slow
@pytest.mark.parametrize("method", gradcam.METHODS)
def test_dog_maps_follow_moved_face(dog_granja, method):
    # A map drawn to the centre by padding or by the network's shape would also pass the test
    # above, so each face is shrunk into a corner quadrant of a grey canvas and must pull the map
    # there. The top-left and bottom-right quadrants move the face along both axes.
    trained, photos, labels = dog_granja
    gradient_model = gradcam.build_gradient_model(trained.model, trained.metadata["gradcam_layer"])
    half = REAL_INPUT_SIZE // 2
    small = np.stack([np.asarray(Image.fromarray(photo).resize((half, half), Image.Resampling.BILINEAR))
                      for photo in photos])

    for quadrant in (0, 3):
        top, left = (quadrant // 2) * half, (quadrant % 2) * half
        canvas = np.full_like(photos, 128)
        canvas[:, top:top + half, left:left + half] = small

        shares = map_shares(gradient_model, canvas, labels, method, top, top + half, left, left + half)

        print(f"{method}, face in quadrant {quadrant}: mean share {shares.mean():.3f}, min {shares.min():.3f}")
        assert shares.mean() > 0.5, f"face in quadrant {quadrant}"
