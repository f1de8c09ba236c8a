#!/usr/bin/env python3
"""Train a granja's face recogniser by transfer learning from a pretrained backbone.

Photos come from dataset/<granja>/<class>/; the model and its files go to models/<granja>/;
TensorBoard logs, the classification report, the confusion matrix and learning curves go to
logs/<granja>/<YYYYmmdd-HHMMSS>/. Example:

    python training.py -ng dogs42 -m mobilenetv2 --weights imagenet -e 20 -bs 32
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from utils import cli

cli.quiet_tensorflow()

from utils.augment import AugmentConfig  # noqa: E402
from utils.backbones import BACKBONES, WEIGHTS_CHOICES_HELP  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.head import DEFAULT_HIDDEN, POOLINGS, parse_freeze  # noqa: E402
from utils.training import DEFAULT_VIEWS, MIN_BACKGROUND_ANIMALS  # noqa: E402


def _positive_list(text: str, kind=int) -> tuple:
    """Parse a comma-separated list of positive numbers, for argparse."""
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers (got {text!r})") from None
    if not values or any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers (got {text!r})")
    return values


def _hidden_units(text: str) -> tuple[int, ...]:
    return _positive_list(text, int)


def _range_pair(text: str) -> tuple[float, float]:
    values = _positive_list(text, float)
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with 0 < MIN <= MAX (got {text!r})")
    return values


def _model_help() -> str:
    lines = [f"{name}: {spec.description}, input at least {spec.min_input_size} px, default weights "
             f"{spec.default_weights}, pooling {spec.default_pooling}" for name, spec in BACKBONES.items()]
    return "backbone. " + "; ".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser, grouped by concern."""
    parser = cli.ArgumentParser(description=__doc__)

    data = parser.add_argument_group("data")
    data.add_argument("-ng", "--granja", required=True, type=cli.granja_name,
                      help="granja name: the folder dataset/<granja>/ with one sub-folder of photos per class")
    data.add_argument("--val-fraction", type=cli.open_fraction, default=0.15, metavar="F",
                      help="share of each class's photos used for validation (early stopping, best epoch)")
    data.add_argument("--test-fraction", type=cli.open_fraction, default=0.15, metavar="F",
                      help="share of each class's photos held out for the final test report")
    data.add_argument("--seed", type=int, default=42, help="seed of the split, the shuffling and the weights")
    data.add_argument("--min-images", type=cli.positive_int, default=None, metavar="N",
                      help="drop classes with fewer than N photos instead of stopping (at least 3 are needed)")
    data.add_argument("--dedup-threshold", type=cli.unit_interval, default=None, metavar="T",
                      help="keep photos whose SSIM exceeds T (near-duplicates) on one side of the split")
    cli.add_root_flags(parser)

    model = parser.add_argument_group("model")
    model.add_argument("-m", "--model", default="vgg16", choices=list(BACKBONES), help=_model_help())
    model.add_argument("--weights", default=None, metavar="SOURCE",
                       help=f"backbone weights: {WEIGHTS_CHOICES_HELP}; default: the backbone's own "
                            "(vggface for vgg16/resnet50/senet50, imagenet for the others)")
    model.add_argument("--include-top", action="store_true",
                       help="VGGFace only: keep the original dense layers (fc6, fc7 for vgg16; the pooled "
                            "2,048 values for resnet50/senet50); needs --input-size 224")
    model.add_argument("--input-size", type=cli.positive_int, default=224, metavar="PX",
                       help="side of the square input in pixels")
    model.add_argument("--pooling", choices=POOLINGS, default=None,
                       help="pooling of the backbone's feature map; default flatten for vgg16, avg otherwise")
    model.add_argument("--hidden", type=_hidden_units, default=DEFAULT_HIDDEN, metavar="UNITS",
                       help="units of the dense head layers fc1, fc2, ..., comma-separated")
    model.add_argument("--dropout", type=cli.open_fraction, default=0.0, metavar="RATE",
                       help="dropout rate after each dense head layer (0 turns it off)")
    model.add_argument("--freeze", default=None, metavar="N",
                       help="freeze policy over the layers that hold weights: N > 0 freezes the first N, "
                            "N < 0 all but the last |N|, 0 or 'none' nothing; default: minus the number of "
                            "head layers (-4 with the default --hidden), so only the head trains")

    training = parser.add_argument_group("training")
    training.add_argument("-e", "--epochs", type=cli.positive_int, default=20, help="maximum number of epochs")
    training.add_argument("-bs", "--batch_size", "--batch-size", dest="batch_size", type=cli.positive_int,
                          default=32, help="photos per batch")
    training.add_argument("--lr", type=cli.positive_float, default=1e-3, help="Adam learning rate")
    training.add_argument("--no-cache", action="store_true",
                          help="always run the full network every epoch, even when only the head trains")
    training.add_argument("--views", type=cli.positive_int, default=DEFAULT_VIEWS, metavar="K",
                          help="views of each training photo (the photo itself and K-1 augmented copies) whose "
                               "backbone features are cached when only the head trains; one view is drawn per "
                               "photo and epoch")
    training.add_argument("--strategy", choices=("none", "mirrored", "multiworker"), default="none",
                          help="tf.distribute strategy: mirrored uses every visible GPU on this machine; "
                               "multiworker spreads training over machines listed in TF_CONFIG")
    training.add_argument("--resume", action="store_true",
                          help="continue the interrupted run of this granja from its last completed epoch, with "
                               "its own split and flags (only --quiet and --models-dir come from this command)")
    training.add_argument("--patience", type=cli.positive_int, default=5,
                          help="epochs without a lower validation loss before early stopping")

    unknown = parser.add_argument_group("unknown animals")
    unknown.add_argument("--accept-rate", type=cli.accept_rate, default=0.95, metavar="R",
                         help="share of known validation photos the unknown-animal threshold accepts (with "
                              "--background-dir, also the share of held-out animals' photos the enrolment "
                              "threshold accepts)")
    unknown.add_argument("--unknown-dir", type=Path, default=None, metavar="DIR",
                         help="folders of animals that are not in the granja: report how well they are flagged "
                              "as unknown (AUROC, shares flagged) on the test split plus these photos")
    unknown.add_argument("--background-dir", type=Path, default=None, metavar="DIR",
                         help="a folder with one sub-folder of photos per animal of the same kind, none of them "
                              "in the granja: learn an identity space from them, and choose the unknown-animal "
                              f"score against a fifth of them held out (at least {MIN_BACKGROUND_ANIMALS} animals; "
                              "hundreds give steady figures)")

    augment = parser.add_argument_group("augmentation (training split only)")
    defaults = AugmentConfig()
    augment.add_argument("--rotation", type=float, default=defaults.rotation, metavar="DEG",
                         help="maximum random rotation in degrees (0 turns it off)")
    augment.add_argument("--shift", type=cli.open_fraction, default=defaults.shift, metavar="F",
                         help="maximum random shift as a fraction of height and width (0 turns it off)")
    augment.add_argument("--no-flip", action="store_true", help="turn off random horizontal flips")
    augment.add_argument("--zoom", type=_range_pair, default=defaults.zoom, metavar="MIN,MAX",
                         help="range of the visible field's scale: below 1 zooms in, above 1 out")
    augment.add_argument("--brightness", type=_range_pair, default=defaults.brightness, metavar="MIN,MAX",
                         help="range of the factor pixel values are multiplied by")
    augment.add_argument("--no-augment", action="store_true", help="turn every augmentation off")

    output = parser.add_argument_group("output")
    output.add_argument("--quiet", action="store_true", help="print one line per epoch instead of a progress bar")
    cli.add_debug_flag(output)
    return parser


def granja_photos(granja: Path) -> dict[str, list[Path]]:
    """List a granja's photos by class; empty when the folder is missing (training reports that)."""
    from utils.data import scan_granja

    return scan_granja(granja).photos if granja.is_dir() else {}


def sub_folder_names(folder: Path) -> set[str]:
    from utils.images import is_junk_name

    return {entry.name for entry in folder.iterdir() if entry.is_dir() and not is_junk_name(entry.name)}


def name_list(names: Sequence[str], limit: int = 3) -> str:
    """Join up to ``limit`` quoted names and how many more, for one-line messages."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(name) for name in names[:limit]) + more


def file_digests(photos: Sequence[Path]) -> dict[str, Path]:
    """Map the SHA-256 of each photo file's bytes to the photo."""
    from utils.inference import file_sha256

    return {file_sha256(path): path for path in photos}


def check_same_photos(flag: str, folder: Path, digests: dict[str, Path], others: dict[str, Path], what: str) -> None:
    """Stop when a photo of ``folder`` (by its digest) is also one of ``others``, under whatever name."""
    shared = sorted((path, others[digest]) for digest, path in digests.items() if digest in others)
    if shared:
        path, other = shared[0]
        more, pronoun = ("", "it") if len(shared) == 1 else (f" (and {len(shared) - 1} more)", "them")
        raise UserError(f"{flag} {folder} contains a photo of {what}: {path} is the same file as {other}{more}; "
                        f"remove {pronoun}, or give a folder of links that leaves {pronoun} out")


def check_unknown_dir(unknown: Path, granja: Path) -> list[Path]:
    """Stop before training when --unknown-dir is not a folder of photos, or shares an animal with the granja.

    Returns the photos of --unknown-dir.
    """
    from utils.images import expand_photos

    if not unknown.is_dir():
        raise UserError(f"--unknown-dir {unknown} is not a folder; give a folder of photos of animals "
                        "outside the granja")
    try:
        photos = expand_photos([unknown])  # an empty folder stops here, before any training
    except UserError as err:
        raise UserError(f"--unknown-dir: {err}") from None
    known = granja_photos(granja)
    shared = sorted(sub_folder_names(unknown) & set(known))
    if shared:
        raise UserError(f"--unknown-dir {unknown} has folders named like the granja's animals "
                        f"({name_list(shared)}); unknown animals must be others: remove those folders")
    check_same_photos("--unknown-dir", unknown, file_digests(photos),
                      file_digests([path for paths in known.values() for path in paths]), "the granja's animals")
    return photos


def check_background_dir(background: Path, granja: Path, unknown_photos: Sequence[Path] | None,
                         unknown: Path | None = None) -> None:
    """Stop before training when --background-dir cannot serve: too few animals, or shared with the granja.

    ``unknown_photos`` are the photos of ``unknown`` (--unknown-dir), which must not be background photos.
    """
    from utils.data import scan_granja
    from utils.inference import file_sha256

    if not background.is_dir():
        raise UserError(f"--background-dir {background} is not a folder; give a folder with one sub-folder of "
                        "photos per animal that is not in the granja")
    try:
        scan = scan_granja(background)
    except UserError as err:
        raise UserError(f"--background-dir: {err}") from None
    animals = {name: photos for name, photos in scan.photos.items() if photos}
    if len(animals) < MIN_BACKGROUND_ANIMALS:
        raise UserError(f"--background-dir {background} has {len(animals)} animal folders with photos; give at "
                        f"least {MIN_BACKGROUND_ANIMALS}, one sub-folder of photos per animal")
    known = granja_photos(granja)
    shared = sorted(set(animals) & set(known))
    if shared:
        raise UserError(f"--background-dir {background} has folders named like the granja's animals "
                        f"({name_list(shared)}); background animals must be others: remove those folders")
    digests: dict[str, Path] = {}
    for name, photos in animals.items():
        for path in photos:
            digest = file_sha256(path)
            first = digests.setdefault(digest, path)
            if first.relative_to(background).parts[0] != name:
                raise UserError(f"--background-dir {background} has the same photo in two animal folders ({first} "
                                f"and {path}); each animal must be one folder: remove one of the two")
    check_same_photos("--background-dir", background, digests,
                      file_digests([path for paths in known.values() for path in paths]), "the granja's animals")
    if unknown is None:
        return
    if background.resolve() == unknown.resolve():
        raise UserError(f"--background-dir and --unknown-dir are both {background}; unknown animals that trained "
                        "the identity space would not measure new ones: give two folders of different animals")
    shared = sorted(set(animals) & sub_folder_names(unknown))
    if shared:
        raise UserError(f"--background-dir {background} and --unknown-dir {unknown} share animal folders "
                        f"({name_list(shared)}); an unknown animal must not train the identity space: "
                        "remove them from one of the two")
    check_same_photos("--background-dir", background, digests, file_digests(unknown_photos), f"--unknown-dir {unknown}")


def options_from_args(args: argparse.Namespace):
    """Check flag combinations and turn the parsed flags into TrainOptions."""
    from utils.training import TrainOptions

    if args.val_fraction <= 0 or args.test_fraction <= 0 or args.val_fraction + args.test_fraction >= 1:
        raise UserError(f"--val-fraction {args.val_fraction} and --test-fraction {args.test_fraction} must each be "
                        "above 0 and add up to less than 1, leaving photos to train on")
    unknown_photos = None
    # --resume takes these folders from the interrupted run, so the ones given here are not checked.
    if args.unknown_dir is not None and not args.resume:
        unknown_photos = check_unknown_dir(args.unknown_dir, args.dataset_dir / args.granja)
    if args.background_dir is not None and not args.resume:
        check_background_dir(args.background_dir, args.dataset_dir / args.granja, unknown_photos, args.unknown_dir)
    if not 0 <= args.rotation <= 180:
        raise UserError(f"--rotation must be from 0 to 180 degrees (got {args.rotation})")
    augment = AugmentConfig.off() if args.no_augment else AugmentConfig(
        rotation=args.rotation, shift=args.shift, flip=not args.no_flip, zoom=tuple(args.zoom),
        brightness=tuple(args.brightness))
    return TrainOptions(
        granja=args.granja, model=args.model, dataset_dir=args.dataset_dir, models_dir=args.models_dir,
        logs_dir=args.logs_dir, weights=args.weights, include_top=args.include_top, input_size=args.input_size,
        pooling=args.pooling, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
        hidden=tuple(args.hidden), dropout=args.dropout,
        freeze=-(len(args.hidden) + 1) if args.freeze is None else parse_freeze(args.freeze),
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
        min_images=args.min_images, dedup_threshold=args.dedup_threshold, augment=augment,
        cache=not args.no_cache, views=args.views, strategy=args.strategy, resume=args.resume,
        accept_rate=args.accept_rate, unknown_dir=args.unknown_dir, background_dir=args.background_dir,
        verbose=2 if args.quiet else 1,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.debug)
    options = options_from_args(args)

    from utils.training import train

    train(options)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
