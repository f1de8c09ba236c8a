#!/usr/bin/env python3
"""Does dropout in the dense head help? Test accuracy per dropout rate, over several seeds.

Each seed gives another split and initialisation; all rates of one seed share the split and the
cached backbone features, so the rates are compared on the same photos. Prints one row per rate
with the accuracy per seed, the mean and the spread.

    .venv/bin/python bench/bench_dropout.py --dataset-dir ../shared/data/granjas --granja dogs42 \\
        --weights ../shared/weights/mobilenet_v2_dogbreeds_notop.weights.h5
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", type=Path, required=True)
    parser.add_argument("--granja", default="dogs42")
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.2, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    accuracy: dict[float, list[float]] = {rate: [] for rate in args.rates}
    with tempfile.TemporaryDirectory(prefix="bench_dropout_") as temp:
        models = Path(temp) / "models"
        for seed in args.seeds:
            for rate in args.rates:
                command = [sys.executable, str(REPO / "training.py"), "-ng", args.granja, "--dataset-dir",
                           str(args.dataset_dir), "-m", args.model, "--weights", args.weights, "-e", str(args.epochs),
                           "--seed", str(seed), "--dropout", str(rate), "--models-dir", str(models),
                           "--logs-dir", str(Path(temp) / "logs"), "--quiet"]
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                record = json.loads((models / args.granja / "training.json").read_text(encoding="utf-8"))
                accuracy[rate].append(record["metrics"]["test_accuracy"])
                print(f"seed {seed} dropout {rate}: test accuracy {accuracy[rate][-1]:.4f}", flush=True)

    print(f"\n{args.granja}, {args.model}, {args.epochs} epochs (early stopping on), seeds {args.seeds}")
    print("dropout  " + "  ".join(f"seed {seed:<3}" for seed in args.seeds) + "   mean   stdev")
    for rate, values in accuracy.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{rate:<8} " + "  ".join(f"{value:8.4f}" for value in values)
              + f"  {statistics.mean(values):.4f}  {spread:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
