#!/usr/bin/env python3
"""Score photos with a granja's trained recogniser and print the scores of every class as JSON.

Everything the model needs (class names, input size, preprocessing) comes from models/<granja>/.
Stdout carries only JSON, so it can be piped; stderr gets one decision line per photo (a known
animal, or "unknown" when the photo scores under the granja's threshold) and the logs. Examples:

    python testing.py --granja dogs42 --img photo.jpg
    python testing.py --granja dogs42 --img photo.jpg --format full
    python testing.py --granja dogs42 --enroll Luna --img luna1.jpg luna2.jpg luna3.jpg
    python testing.py --granja dogs42 --forget Luna
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
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-ng", "--granja", required=True, type=cli.granja_name,
                        help="granja whose model scores the photos (models/<granja>/)")
    parser.add_argument("-img", "--img", nargs="+", type=Path, metavar="PATH",
                        help="photo files or folders of photos; with more than one photo the JSON maps each "
                             "path to its result")
    parser.add_argument("--top-k", type=cli.positive_int, default=None, metavar="K",
                        help="keep only the K best classes of each photo (default: every class)")
    parser.add_argument("--format", choices=("scores", "full"), default="scores",
                        help="scores: class -> score, as the original project printed; full: also the "
                             "prediction (a class, an enrolled animal or 'unknown'), its score and threshold")
    parser.add_argument("--unknown-threshold", type=cli.finite_float, default=None, metavar="X",
                        help="flag photos scoring under X as unknown, instead of the threshold saved by training "
                             "(the score is the one training.json names under open_set; when it is a cosine, X is "
                             "also the enrolled animals' threshold)")
    gallery = parser.add_mutually_exclusive_group()
    gallery.add_argument("--enroll", metavar="NAME",
                         help="add the animal in the --img photos to the granja's gallery under NAME, without "
                              "retraining; later runs can name it")
    gallery.add_argument("--forget", metavar="NAME", help="remove an enrolled animal from the gallery")
    cli.add_root_flags(parser, dataset=False, logs=False)
    cli.add_debug_flag(parser)
    return parser


def ranked_scores(probabilities, class_names: Sequence[str], top_k: int | None) -> dict[str, float]:
    """Map class names to scores, best first, keeping the best ``top_k`` when it is set."""
    order = sorted(range(len(class_names)), key=lambda index: -float(probabilities[index]))
    if top_k is not None:
        order = order[:top_k]
    return {class_names[index]: round(float(probabilities[index]), 6) for index in order}


def decision_line(decision) -> str:
    """Format the stderr line of one photo's decision."""
    if decision.prediction == "unknown":
        return f"prediction: unknown (score {decision.score:.2f} under threshold {decision.threshold:.2f})"
    kind = ", enrolled" if decision.enrolled else ""
    return f"prediction: {decision.prediction} (score {decision.score:.2f}, threshold {decision.threshold:.2f}{kind})"


def check_args(args: argparse.Namespace) -> None:
    """Reject flag combinations before any file is read."""
    from utils.errors import UserError

    if args.forget is not None:
        if args.img:
            raise UserError("--forget takes no --img; pass only --granja and --forget NAME")
        return
    if not args.img:
        raise UserError("--img is required: give photo files or folders of photos")
    if args.enroll is not None:
        name = args.enroll.strip()
        if not name or name != args.enroll or name.lower() == "unknown":
            raise UserError(f"--enroll {args.enroll!r} is not a usable name; give a name without leading or "
                            "trailing spaces, other than 'unknown'")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.debug)
    check_args(args)

    from utils.artifacts import load_trained
    from utils.images import expand_photos

    if args.img:
        expand_photos(args.img)  # a missing --img is reported before the granja's files are read
    trained = load_trained(args.models_dir, args.granja, load_model=False)
    if args.forget is not None:
        return forget(args, trained)
    if args.enroll is not None:
        return enroll(args, trained)
    return score(args, trained)


def embed_photos(args: argparse.Namespace, trained):
    """Decode the --img photos and run them through the granja's network."""
    import numpy as np

    from utils.artifacts import load_scorer
    from utils.errors import UserError
    from utils.images import load_given_photos, load_photo

    photos, images = load_given_photos(args.img, lambda path: load_photo(path, trained.input_size))
    scores = load_scorer(trained, batch_size=BATCH_SIZE)(np.stack(images))
    if not np.isfinite(scores.probabilities).all():
        raise UserError(f"the model in {trained.folder} returns scores that are not finite (NaN); retrain the "
                        "granja with a lower --lr or another weights file")
    return photos, scores


def score(args: argparse.Namespace, trained) -> int:
    """Print the scores of every photo as JSON, and each photo's decision on stderr."""
    from utils.artifacts import load_open_set
    from utils.open_set import decide

    photos, scores = embed_photos(args, trained)
    open_set = load_open_set(trained)
    if open_set is None:
        decisions = None
    else:
        if open_set.stale:
            logger.warning("ignoring enrolled animals %s: they were enrolled with another backbone or weights; "
                           "enroll them again with --enroll", ", ".join(open_set.stale))
        decisions = decide(scores.probabilities, scores.embeddings, scores.penultimate, trained.class_names,
                           open_set.class_model, open_set.calibration, open_set.enrolled,
                           threshold=args.unknown_threshold)

    single = len(args.img) == 1 and len(photos) == 1 and not args.img[0].is_dir()
    results = {}
    for index, (path, row) in enumerate(zip(photos, scores.probabilities)):
        ranked = ranked_scores(row, trained.class_names, args.top_k)
        decision = decisions[index] if decisions is not None else None
        if decision is not None:
            prefix = "" if single else f"{path}: "
            print(prefix + decision_line(decision), file=sys.stderr)
        if args.format == "full":
            name = decision.prediction if decision else trained.class_names[int(row.argmax())]
            results[str(path)] = {"prediction": name,
                                  "score": round(decision.score if decision else float(row.max()), 6),
                                  "threshold": round(decision.threshold, 6) if decision else None,
                                  "scores": ranked}
        else:
            results[str(path)] = ranked
    output = next(iter(results.values())) if single else results
    print(json.dumps(output, indent=2, ensure_ascii=False))
    return 0


def enroll(args: argparse.Namespace, trained) -> int:
    """Add the animal in the --img photos to the gallery, as the mean of their embeddings."""
    import numpy as np

    from utils import artifacts
    from utils.errors import UserError
    from utils.inference import file_sha256

    name = args.enroll
    if name in trained.class_names:
        raise UserError(f"--enroll {name!r} is a trained class of granja {args.granja!r}; pick another name")
    open_set = artifacts.load_open_set(trained)
    if open_set is None:
        raise UserError(f"{trained.folder} has no class means that match its model.keras, which enrolment compares "
                        "with; retrain the granja first")
    photos, scores = embed_photos(args, trained)
    with artifacts.granja_lock(args.models_dir, args.granja):
        animals = artifacts.read_gallery(trained.folder)
        entry = animals.get(name)
        if entry is None or entry.get("embedding_key") != open_set.embedding_key:
            entry = {"photos": 0, "mean": np.zeros(scores.embeddings.shape[1]), "sources": [], "digests": []}

        # A photo counts once in the mean, however often and under whatever name it is given.
        digests = [file_sha256(path) for path in photos]
        seen = set(entry.get("digests", []))
        new = []
        for index, digest in enumerate(digests):
            if digest not in seen:
                seen.add(digest)
                new.append(index)
        if not new:
            raise UserError(f"every --img photo is already enrolled as {name!r} (same file content); give other "
                            "photos of it")
        repeated = [str(photos[index]) for index in range(len(photos)) if index not in new]
        if repeated:
            logger.warning("skipping %d --img %s already enrolled as %r or given twice: %s", len(repeated),
                           "photo" if len(repeated) == 1 else "photos", name, ", ".join(repeated[:3]))

        count = entry["photos"] + len(new)
        total = scores.embeddings[new].astype(np.float64).sum(axis=0)
        mean = (total + entry["photos"] * np.asarray(entry["mean"])) / count
        sources = entry["sources"] + [str(Path(photos[index]).resolve()) for index in new]
        digests = entry.get("digests", []) + [digests[index] for index in new]
        animals[name] = {"mean": [round(float(value), 7) for value in mean], "photos": count,
                         "sources": sources, "digests": digests, "embedding_key": open_set.embedding_key}
        artifacts.write_gallery(trained.folder, animals)
    print(json.dumps({"enrolled": name, "photos": count, "gallery": sorted(animals)}, indent=2, ensure_ascii=False))
    return 0


def forget(args: argparse.Namespace, trained) -> int:
    """Remove an enrolled animal from the gallery."""
    from utils import artifacts
    from utils.errors import UserError

    name = args.forget
    with artifacts.granja_lock(args.models_dir, args.granja):
        animals = artifacts.read_gallery(trained.folder)
        if name not in animals:
            if name in trained.class_names:
                raise UserError(f"--forget {name!r}: it is a trained class, not an enrolled animal; retrain the "
                                "granja without its folder to remove it")
            listed = ", ".join(sorted(animals)) or "none"
            raise UserError(f"--forget {name!r} is not enrolled in granja {args.granja!r} (enrolled: {listed})")
        del animals[name]
        artifacts.write_gallery(trained.folder, animals)
    print(json.dumps({"forgotten": name, "gallery": sorted(animals)}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
