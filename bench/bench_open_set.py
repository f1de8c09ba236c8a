#!/usr/bin/env python3
"""Unknown animals and enrolment on real dogs: how often the suite flags a dog it never saw as
"unknown", and names a dog enrolled from a few photos.

1. Trains dogs42 with ``--unknown-dir`` pointing at DogFaceNet dogs that are not in dogs42 (every
   fifth of the other identities, up to ``--unknown-dogs``), and prints the open-set metrics that
   training.py records: AUROC of each score, and the shares of unknown photos flagged and of known
   test photos wrongly flagged at the calibrated threshold.
   With ``--background``, every other DogFaceNet dog is the ``--background-dir``.
2. Enrols ``--enroll-dogs`` further DogFaceNet dogs (none of them in dogs42 or the unknown set)
   with ``testing.py --enroll`` from their first ``--enroll-photos`` photos each, then scores their
   other photos: the share named as the right dog. Also prints how the known test photos fare
   with those dogs in the gallery.

    .venv/bin/python bench/bench_open_set.py --shared ../shared \\
        --weights ../shared/weights/mobilenet_v2_dogbreeds_notop.weights.h5
"""

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def link_dogs(dogs: list[Path], target: Path) -> int:
    """Make ``target/<dog>/<photo>`` links to the photos of ``dogs``; returns the photo count."""
    count = 0
    for dog in dogs:
        (target / dog.name).mkdir(parents=True)
        for photo in sorted(dog.iterdir()):
            os.symlink(photo.resolve(), target / dog.name / photo.name)
            count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, required=True, help="folder with data/granjas/dogs42 and data/dogfacenet")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--unknown-dogs", type=int, default=100)
    parser.add_argument("--enroll-dogs", type=int, default=10)
    parser.add_argument("--enroll-photos", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--background", action="store_true",
                        help="train with --background-dir set to every other DogFaceNet dog (none of them in "
                             "dogs42, the unknown set or the enrolled dogs)")
    parser.add_argument("training_args", nargs=argparse.REMAINDER,
                        help="further training.py flags, after --, for example -- --pooling max")
    args = parser.parse_args()
    extra = args.training_args[1:] if args.training_args[:1] == ["--"] else args.training_args

    granjas = args.shared / "data" / "granjas"
    in_granja = {int(folder.name.split("_")[1]) for folder in (granjas / "dogs42").iterdir()}
    others = sorted((folder for folder in (args.shared / "data" / "dogfacenet").iterdir()
                     if folder.is_dir() and int(folder.name) not in in_granja), key=lambda folder: int(folder.name))
    unknown_dogs = others[::5][:args.unknown_dogs]
    enroll_dogs = [folder for folder in others if folder not in unknown_dogs
                   and len(list(folder.iterdir())) >= args.enroll_photos + 5][:args.enroll_dogs]

    background_dogs = [folder for folder in others if folder not in unknown_dogs and folder not in enroll_dogs]

    with tempfile.TemporaryDirectory(prefix="bench_open_set_") as temp:
        temp = Path(temp)
        unknown_photos = link_dogs(unknown_dogs, temp / "unknown")
        if args.background:
            background_photos = link_dogs(background_dogs, temp / "background")
            extra = ["--background-dir", str(temp / "background"), *extra]
        models = temp / "models"
        subprocess.run([sys.executable, str(REPO / "training.py"), "-ng", "dogs42", "--dataset-dir", str(granjas),
                        "-m", "mobilenetv2", "--weights", args.weights, "-e", str(args.epochs), "--models-dir",
                        str(models), "--logs-dir", str(temp / "logs"), "--unknown-dir", str(temp / "unknown"),
                        "--quiet", *extra], check=True, stdout=subprocess.DEVNULL)
        record = json.loads((models / "dogs42" / "training.json").read_text(encoding="utf-8"))
        open_set = record["open_set"]

        import testing
        from utils import artifacts
        from utils.images import load_photo
        from utils.open_set import decide

        for dog in enroll_dogs:
            photos = [str(path) for path in sorted(dog.iterdir())[:args.enroll_photos]]
            with contextlib.redirect_stdout(io.StringIO()):
                assert testing.main(["-ng", "dogs42", "--models-dir", str(models), "--enroll", f"new_{dog.name}",
                                     "--img", *photos]) == 0

        trained = artifacts.load_trained(models, "dogs42", load_model=False)
        scorer = artifacts.load_scorer(trained)
        state = artifacts.load_open_set(trained)

        def decisions(paths):
            import numpy as np

            scores = scorer(np.stack([load_photo(path, trained.input_size) for path in paths]))
            return decide(scores.probabilities, scores.embeddings, scores.penultimate, trained.class_names,
                          state.class_model, state.calibration, state.enrolled)

        named = total = 0
        for dog in enroll_dogs:
            rest = sorted(dog.iterdir())[args.enroll_photos:]
            named += sum(decision.prediction == f"new_{dog.name}" for decision in decisions(rest))
            total += len(rest)
        split = json.loads((models / "dogs42" / "split.json").read_text(encoding="utf-8"))
        test_paths = [Path(split["root"]) / relative for relative in split["test"]]
        test_decisions = decisions(test_paths)
        test_right = sum(decision.prediction == Path(relative).parts[0]
                         for decision, relative in zip(test_decisions, split["test"]))
        test_enrolled = sum(decision.enrolled for decision in test_decisions)
        unknown_paths = sorted(path for path in (temp / "unknown").rglob("*") if path.is_file())
        unknown_enrolled = sum(decision.enrolled for decision in decisions(unknown_paths))

    unknown = open_set["unknown_test"]
    if args.background:
        print(f"background: {len(background_dogs)} other DogFaceNet dogs, {background_photos} photos")
    print(f"dogs42, mobilenetv2 with {Path(args.weights).name}, {args.epochs} epochs; test accuracy "
          f"{record['metrics']['test_accuracy']:.4f}")
    print(f"unknown dogs: {len(unknown_dogs)} DogFaceNet dogs, {unknown_photos} photos; known: "
          f"{unknown['known_photos']} test photos; accept rate {open_set['accept_rate']}")
    print(f"validation AUROC against {open_set['validation_unknowns']}: " + ", ".join(f"{name} {value:.3f}" for name, value in
                                                           open_set["validation_auroc"].items()))
    for name, metrics in unknown["by_score"].items():
        chosen = " (chosen)" if name == open_set["score"] else ""
        print(f"  {name:<16} AUROC {metrics['auroc']:.3f}  unknown flagged {metrics['unknown_flagged']:.1%}  "
              f"known flagged {metrics['known_flagged']:.1%}{chosen}")
    if "enrolment_threshold" in open_set:
        print(f"enrolment threshold {open_set['enrolment_threshold']:.4f} "
              f"(threshold of the trained classes {open_set['threshold']:.4f})")
    print(f"enrolment: {len(enroll_dogs)} new dogs from {args.enroll_photos} photos each; their other {total} photos "
          f"named right {named / total:.1%}")
    print(f"known test photos with those dogs enrolled: {test_right / len(test_paths):.1%} named right, "
          f"{test_enrolled} named as an enrolled dog; unknown photos named as an enrolled dog: "
          f"{unknown_enrolled} of {len(unknown_paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
