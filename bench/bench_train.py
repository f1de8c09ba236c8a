#!/usr/bin/env python3
"""Training speed: the cached-feature path against the plain path, side by side in one run.

Both train the same granja with the same backbone, weights, epochs and seed, each in its own
process (``training.py``), with early stopping effectively off so both finish every epoch. A
third run repeats the cached path, reading the features the second run stored. Prints the wall
times, the ratio and the test accuracies.

    .venv/bin/python bench/bench_train.py --dataset-dir ../shared/data/granjas --granja dogs42 \\
        --weights ../shared/weights/mobilenet_v2_dogbreeds_notop.weights.h5
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_training(args, models_dir: Path, logs_dir: Path, *extra: str) -> tuple[float, dict]:
    """Run training.py in a fresh process; returns its wall time and the saved metrics."""
    command = [sys.executable, str(REPO / "training.py"), "-ng", args.granja, "--dataset-dir", str(args.dataset_dir),
               "-m", args.model, "--weights", args.weights, "-e", str(args.epochs), "--patience", str(args.epochs),
               "--input-size", str(args.input_size), "--seed", str(args.seed), "--models-dir", str(models_dir),
               "--logs-dir", str(logs_dir), "--quiet", *extra]
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    record = json.loads((models_dir / args.granja / "training.json").read_text(encoding="utf-8"))
    return seconds, record["metrics"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", type=Path, required=True)
    parser.add_argument("--granja", default="dogs42")
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--views", type=int, nargs="*", default=[],
                        help="also time the cached path with each of these --views values")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_train_") as temp:
        temp = Path(temp)
        plain_seconds, plain = run_training(args, temp / "plain", temp / "logs", "--no-cache")
        cached_seconds, cached = run_training(args, temp / "cached", temp / "logs")
        reuse_seconds, reused = run_training(args, temp / "cached", temp / "logs")
        extra = {}
        for views in args.views:
            extra[views] = run_training(args, temp / f"views{views}", temp / "logs", "--views", str(views))

    print(f"granja {args.granja}, backbone {args.model}, {args.epochs} epochs, input {args.input_size}, "
          f"seed {args.seed}")
    print(f"plain path:            {plain_seconds:7.1f} s  test accuracy {plain['test_accuracy']:.4f}")
    print(f"cached path, 1st run:  {cached_seconds:7.1f} s  test accuracy {cached['test_accuracy']:.4f}")
    print(f"cached path, reused:   {reuse_seconds:7.1f} s  test accuracy {reused['test_accuracy']:.4f}")
    for views, (seconds, metrics) in extra.items():
        print(f"cached, --views {views:<3}    {seconds:7.1f} s  test accuracy {metrics['test_accuracy']:.4f}")
    print(f"speed-up, 1st run: {plain_seconds / cached_seconds:.2f}x; reused cache: "
          f"{plain_seconds / reuse_seconds:.2f}x; accuracy change "
          f"{cached['test_accuracy'] - plain['test_accuracy']:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
