#!/usr/bin/env python3
"""Show where a granja's trained recogniser looked when it scored a photo, as a Grad-CAM heat map.

A recogniser can be right for the wrong reason (a collar, the background, a watermark). The
figure puts the photo next to the photo under its heat map, titled with the class probability,
so a user can check that the network looks at the face. The backbone, weights, class names,
input size and preprocessing come from models/<granja>/. Figures go to
logs/<granja>/gradcam/<photo name>_<class>.png unless --out gives another path.

Stdout carries one line per photo: the saved PNG path, the class and its probability, separated
by tabs. Logs go to stderr. Example:

    python grad_CAM.py --granja dogs42 --img photo.jpg
"""

import argparse
import io
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from utils import cli

cli.quiet_tensorflow()

from utils.backbones import BACKBONES  # noqa: E402
from utils.errors import UserError  # noqa: E402

logger = logging.getLogger("grad_CAM")

# Photos per forward and backward pass when --img names several photos or a folder.
BATCH_SIZE = 8

# Figure size in inches at FIGURE_DPI: about 800 x 360 pixels, two panels of about 300 pixels.
FIGURE_SIZE = (8.0, 3.6)
FIGURE_DPI = 100

# Photos are shrunk to this longest side before drawing, because the panels are smaller anyway.
# A full-size blend of a 12-megapixel photo would need gigabytes of float arrays.
DISPLAY_MAX_SIDE = 1024

# Beyond this many classes, an unknown --class lists only the closest names.
MAX_CLASSES_LISTED = 30

METHOD_TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++"}


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser, grouped by concern."""
    from utils.gradcam import METHODS

    parser = cli.ArgumentParser(description=__doc__)

    data = parser.add_argument_group("photos and model")
    data.add_argument("-ng", "--granja", required=True, type=cli.granja_name,
                      help="granja whose trained model is explained (models/<granja>/)")
    data.add_argument("-img", "--img", required=True, nargs="+", type=Path, metavar="PATH",
                      help="photo files or folders of photos (searched recursively); one figure per photo")
    data.add_argument("-m", "--model", choices=list(BACKBONES), default=None,
                      help="backbone the granja was trained with; optional, checked against "
                           "models/<granja>/training.json when given")

    explain = parser.add_argument_group("heat map")
    explain.add_argument("--class", dest="class_name", default=None, metavar="NAME",
                         help="class to explain; without it, each photo's top-scoring class")
    explain.add_argument("--layer", default=None, metavar="NAME",
                         help="backbone layer whose feature map is weighted; without it, the backbone's last "
                              "convolutional layer, as recorded in training.json")
    explain.add_argument("--method", choices=METHODS, default="gradcam",
                         help="channel weights: gradcam (mean gradient) or gradcam++ (second-order weights)")
    explain.add_argument("--alpha", type=cli.unit_interval, default=0.4, metavar="A",
                         help="weight of the heat map colours in the blend, from 0 (photo only) to 1")

    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=None, metavar="PATH",
                        help="a .png file (one photo only) or a folder for the figures; without it, "
                             "logs/<granja>/gradcam/")
    output.add_argument("--save-array", action="store_true",
                        help="also write each heat map as a float32 .npy array in [0, 1] beside its PNG, at "
                             "the target layer's resolution")
    output.add_argument("--show", action="store_true",
                        help="also open each figure in a window when a display is available")
    cli.add_root_flags(parser, dataset=False)
    cli.add_debug_flag(output)
    return parser


def has_display() -> bool:
    """Return True when matplotlib can open a window: always on macOS and Windows, else with X11 or Wayland."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def resolve_class(class_name: str | None, class_names: Sequence[str], labels_path: Path) -> int | None:
    """Return the index of ``--class``, or None when it is not given."""
    if class_name is None:
        return None
    if class_name in class_names:
        return list(class_names).index(class_name)
    if len(class_names) <= MAX_CLASSES_LISTED:
        listed = f"the classes are {', '.join(class_names)}"
    else:
        from utils.head import suggest_names

        listed = (f"the closest of its {len(class_names)} classes are {suggest_names(class_name, class_names)} "
                  f"(all are in {labels_path})")
    raise UserError(f"--class {class_name!r} is not a class of this granja; {listed}")


def resolve_layer(requested: str | None, recorded: str | None, backbone) -> str:
    """Choose the target layer: --layer, else the one training.json records, else the last conv layer."""
    from utils.gradcam import find_conv_layer, spatial_layer_names
    from utils.head import suggest_names

    valid = spatial_layer_names(backbone)
    if requested is not None:
        if requested not in valid:
            exists = any(layer.name == requested for layer in backbone.layers)
            reason = "has no 4-D feature map output" if exists else "is not a layer of"
            raise UserError(f"--layer {requested!r} {reason} backbone {backbone.name!r}; nearby layers with a "
                            f"feature map: {suggest_names(requested, valid)}")
        return requested
    if recorded in valid:
        return recorded
    found = find_conv_layer(backbone)
    if recorded is not None:
        logger.warning("layer %r from training.json is not in backbone %r; using its last convolutional layer %r",
                       recorded, backbone.name, found)
    return found


def figure_stems(photos: Sequence[Path]) -> list[str]:
    """Name each photo's figure by its file stem, prefixed by its folder when two photos share a stem."""
    counts: dict[str, int] = {}
    for path in photos:
        counts[path.stem] = counts.get(path.stem, 0) + 1
    return [f"{path.parent.name}_{path.stem}" if counts[path.stem] > 1 else path.stem for path in photos]


def output_folder(args: argparse.Namespace, photo_count: int) -> tuple[Path, Path | None]:
    """Return the folder for the figures and, when --out names a .png file, that file."""
    if args.out is None:
        return args.logs_dir / args.granja / "gradcam", None
    if args.out.suffix.lower() == ".png":
        if photo_count > 1:
            raise UserError(f"--out {args.out} names one PNG file but --img gives {photo_count} photos; "
                            "pass a folder to --out instead")
        return args.out.parent, args.out
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is an existing file but not a .png; pass a .png path or a folder")
    return args.out, None


def unique_path(folder: Path, stem: str, used: set[Path]) -> Path:
    """Return ``folder/stem.png``, adding -2, -3, ... when this run already wrote that name."""
    path = folder / f"{stem}.png"
    copy = 2
    while path in used:
        path = folder / f"{stem}-{copy}.png"
        copy += 1
    used.add(path)
    return path


def fit_for_display(image):
    """Shrink a photo so that its longer side is at most DISPLAY_MAX_SIDE pixels."""
    import numpy as np
    from PIL import Image

    height, width = image.shape[:2]
    if max(height, width) <= DISPLAY_MAX_SIDE:
        return image
    scale = DISPLAY_MAX_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)


def render_figure(image, heatmap, title: str, overlay_title: str, alpha: float, interactive: bool) -> bytes:
    """Draw one figure and return it as PNG bytes; pyplot keeps interactive figures open for --show."""
    from utils.gradcam import draw_figure

    if interactive:
        import matplotlib.pyplot as plt

        figure = plt.figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    else:
        from matplotlib.figure import Figure

        figure = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    draw_figure(figure, image, heatmap, title, alpha=alpha, overlay_title=overlay_title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    return buffer.getvalue()


def array_bytes(array) -> bytes:
    """Serialise an array in NumPy's .npy format."""
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Check the photos and flags, load the model once, then write one figure per photo."""
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.debug)

    import matplotlib

    interactive = args.show and has_display()
    if args.show and not interactive:
        logger.warning("--show: no display found (DISPLAY and WAYLAND_DISPLAY are unset), so the figures are "
                       "only saved")
    if not interactive:
        matplotlib.use("Agg")

    from utils import artifacts
    from utils.images import expand_photos, load_given_photos, load_rgb

    figure_folder, single_file = output_folder(args, len(expand_photos(args.img)))
    # Decode every photo once before the model loads: a broken file named on the command line
    # stops the run, a broken photo inside a folder is skipped with a warning.
    photos, _ = load_given_photos(args.img, lambda path: load_rgb(path).shape)

    # Flags that only need training.json are checked before the model loads.
    trained = artifacts.load_trained(args.models_dir, args.granja, load_model=False)
    backbone_name = trained.metadata["backbone"]
    if args.model is not None and args.model != backbone_name:
        raise UserError(f"--model {args.model} does not match granja {args.granja!r}, which was trained with "
                        f"{backbone_name}; pass -m {backbone_name} or leave --model out")
    class_index = resolve_class(args.class_name, trained.class_names, trained.folder / artifacts.LABELS_FILE)

    trained = artifacts.load_trained(args.models_dir, args.granja)
    explain_photos(args, trained, photos, class_index, figure_folder, single_file, interactive)

    if interactive:
        import matplotlib.pyplot as plt

        plt.show()
    return 0


def explain_photos(args: argparse.Namespace, trained, photos: Sequence[Path], class_index: int | None,
                   figure_folder: Path, single_file: Path | None, interactive: bool) -> None:
    """Compute, draw and save the heat map of every photo, BATCH_SIZE photos per pass."""
    import numpy as np

    from utils import gradcam
    from utils.artifacts import MODEL_FILE, atomic_write_bytes
    from utils.images import load_rgb, resize_rgb

    try:
        backbone = gradcam.find_backbone(trained.model, trained.metadata.get("backbone_layer"))
    except ValueError as err:
        raise UserError(f"{trained.folder / MODEL_FILE} does not contain the expected backbone ({err}); "
                        "retrain the granja") from err
    layer = resolve_layer(args.layer, trained.metadata.get("gradcam_layer"), backbone)
    try:
        gradient_model = gradcam.build_gradient_model(trained.model, layer, backbone_name=backbone.name)
    except ValueError as err:
        raise UserError(f"cannot compute heat maps for {trained.folder / MODEL_FILE} ({err}); "
                        "retrain the granja") from err
    map_shape = tuple(gradient_model.outputs[0].shape[1:3])
    if map_shape == (1, 1):
        logger.warning("layer %r has a 1x1 feature map at input size %d, so every heat map is uniform; pass "
                       "--layer with an earlier layer, or retrain with a larger --input-size",
                       layer, trained.input_size)
    logger.info("explaining %d photo%s with %s at layer %r (%dx%d) of %s",
                len(photos), "" if len(photos) == 1 else "s", args.method, layer, map_shape[0], map_shape[1], backbone.name)

    stems = figure_stems(photos)
    used: set[Path] = set()
    overlay_title = f"{METHOD_TITLES[args.method]} at {layer}"
    for start in range(0, len(photos), BATCH_SIZE):
        batch = photos[start:start + BATCH_SIZE]
        originals = [load_rgb(path) for path in batch]
        inputs = np.stack([resize_rgb(image, trained.input_size) for image in originals])
        maps = gradcam.compute_activation_maps(gradient_model, inputs, class_index, method=args.method)

        for offset, (path, image, result) in enumerate(zip(batch, originals, maps)):
            name = trained.class_names[result.class_index]
            if not np.any(result.heatmap > 0):
                logger.warning("the heat map of %s for class %r is blank: no region of layer %r raises that class's "
                               "score (%.2g); pass another --class or --layer", path, name, layer, result.probability)
            title = f"Pr[img|label={name}] = {result.probability:.2f}"
            png = render_figure(fit_for_display(image), result.heatmap, title, overlay_title, args.alpha,
                                interactive)
            target = single_file or unique_path(figure_folder, f"{stems[start + offset]}_{name}", used)
            atomic_write_bytes(target, png)
            if args.save_array:
                array_path = target.with_suffix(".npy")
                atomic_write_bytes(array_path, array_bytes(result.heatmap))
                logger.info("saved the heat map array to %s", array_path)
            print(f"{target}\t{name}\t{result.probability:.4f}", flush=True)
    logger.info("saved %d figure%s", len(photos), "" if len(photos) == 1 else "s")


if __name__ == "__main__":
    sys.exit(cli.run(main))
