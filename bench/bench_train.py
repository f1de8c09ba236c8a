#!/usr/bin/env python3
"""Training speed: the cached-feature path against the plain path, side by side in one run.

Both train the same granja with the same backbone, weights, epochs and seed, each in its own
process (``training.py``), with early stopping effectively off so both finish every epoch. A
last run repeats the cached path, reading the features the first cached run stored. Prints the
wall times of whole processes, the training times alone, the ratios and the test accuracies.

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
    parser.add_argument("--repeats", type=int, default=1, help="runs of each path, alternating")
    parser.add_argument("--views", type=int, nargs="*", default=[],
                        help="also time the cached path with each of these --views values")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_train_") as temp:
        temp = Path(temp)
        plain, cached = [], []
        # Alternating runs, so that changes in machine load hit both paths alike. Each cached run
        # starts from an empty cache.
        for repeat in range(args.repeats):
            plain.append(run_training(args, temp / f"plain{repeat}", temp / "logs", "--no-cache"))
            cached.append(run_training(args, temp / f"cached{repeat}", temp / "logs"))
        reused = run_training(args, temp / "cached0", temp / "logs")
        extra = {}
        for views in args.views:
            extra[views] = run_training(args, temp / f"views{views}", temp / "logs", "--views", str(views))

    print(f"granja {args.granja}, backbone {args.model}, {args.epochs} epochs, input {args.input_size}, "
          f"seed {args.seed}; wall time of the whole process, and of training alone (backbone features "
          "and fit)")

    def line(name, seconds, metrics):
        print(f"{name:<22} {seconds:7.1f} s  training {metrics['train_seconds']:7.1f} s  "
              f"test accuracy {metrics['test_accuracy']:.4f}")

    for repeat in range(args.repeats):
        line(f"plain, run {repeat + 1}", *plain[repeat])
        line(f"cached, run {repeat + 1}", *cached[repeat])
    line("cached, reused cache", *reused)
    for views, (seconds, metrics) in extra.items():
        line(f"cached, --views {views}", seconds, metrics)

    def mean(runs, key=None):
        values = [seconds if key is None else metrics[key] for seconds, metrics in runs]
        return sum(values) / len(values)

    print(f"speed-up over {args.repeats} runs each: wall {mean(plain) / mean(cached):.2f}x, training alone "
          f"{mean(plain, 'train_seconds') / mean(cached, 'train_seconds'):.2f}x; reused cache: wall "
          f"{mean(plain) / reused[0]:.2f}x")
    print(f"mean test accuracy: plain {mean(plain, 'test_accuracy'):.4f}, cached {mean(cached, 'test_accuracy'):.4f}, "
          f"change {mean(cached, 'test_accuracy') - mean(plain, 'test_accuracy'):+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
