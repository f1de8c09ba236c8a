#!/usr/bin/env python3
"""Score photos with a granja's trained recogniser and print the scores of every class as JSON.

Everything the model needs (class names, input size, preprocessing) comes from models/<granja>/.
Stdout carries only JSON, so it can be piped; logs go to stderr. Example:

    python testing.py --granja dogs42 --img photo.jpg
"""

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from utils import cli

cli.quiet_tensorflow()

logger = logging.getLogger("testing")

# Photos scored per forward pass when --img names several photos or a folder.
BATCH_SIZE = 32


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser."""
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("-ng", "--granja", required=True, type=cli.granja_name,
                        help="granja whose model scores the photos (models/<granja>/)")
    parser.add_argument("-img", "--img", required=True, nargs="+", type=Path, metavar="PATH",
                        help="photo files or folders of photos; with more than one photo the JSON maps each "
                             "path to its scores")
    parser.add_argument("--top-k", type=cli.positive_int, default=None, metavar="K",
                        help="keep only the K best classes of each photo (default: every class)")
    cli.add_root_flags(parser, dataset=False, logs=False)
    cli.add_debug_flag(parser)
    return parser


def ranked_scores(probabilities, class_names: Sequence[str], top_k: int | None) -> dict[str, float]:
    """Map class names to scores, best first, keeping the best ``top_k`` when it is set."""
    order = sorted(range(len(class_names)), key=lambda index: -float(probabilities[index]))
    if top_k is not None:
        order = order[:top_k]
    return {class_names[index]: round(float(probabilities[index]), 6) for index in order}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.debug)

    import numpy as np

    from utils.artifacts import load_scorer, load_trained
    from utils.errors import UserError
    from utils.images import expand_photos, load_given_photos, load_photo

    expand_photos(args.img)  # a missing --img is reported before the granja's files are read
    trained = load_trained(args.models_dir, args.granja, load_model=False)
    photos, images = load_given_photos(args.img, lambda path: load_photo(path, trained.input_size))
    scorer = load_scorer(trained, batch_size=BATCH_SIZE)
    probabilities = scorer(np.stack(images)).probabilities
    if not np.isfinite(probabilities).all():
        raise UserError(f"the model in {trained.folder} returns scores that are not finite (NaN); retrain the "
                        "granja with a lower --lr or another weights file")
    results = {str(path): ranked_scores(row, trained.class_names, args.top_k)
               for path, row in zip(photos, probabilities)}
    single = len(args.img) == 1 and len(photos) == 1 and not args.img[0].is_dir()
    output = next(iter(results.values())) if single else results
    print(json.dumps(output, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
