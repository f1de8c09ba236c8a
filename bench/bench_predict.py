#!/usr/bin/env python3
"""Scoring speed of testing.py, measured side by side in one run.

1. Cold start: the wall time of ``testing.py`` on one photo, a whole new process, against
   ``python -c "import tensorflow"`` on the same machine (median of several runs each).
2. Folder scoring: photos per second of the scorer behind ``testing.py --img FOLDER`` (the frozen
   inference graph) against ``model.predict`` of ``model.keras`` on the same decoded photos.

Needs a trained granja, for example the one from the README:

    .venv/bin/python bench/bench_predict.py --granja dogs42 --models-dir models \\
        --photos ../shared/data/granjas/dogs42
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# testing.py silences TensorFlow's C++ start-up messages with this setting. The bare import gets
# it too, so that both sides of the comparison do the same logging work.
QUIET_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def wall_times(commands: list[list[str]], repeats: int) -> list[float]:
    """Median wall time of each command over ``repeats`` rounds, in seconds.

    Each round runs every command once, so that changes in machine load hit all of them alike.
    """
    times: list[list[float]] = [[] for _ in commands]
    for _ in range(repeats):
        for command, measured in zip(commands, times):
            started = time.monotonic()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                           env=QUIET_ENV)
            measured.append(time.monotonic() - started)
    return [statistics.median(measured) for measured in times]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--granja", default="dogs42")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--photos", type=Path, required=True, help="a folder of photos (searched recursively)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from utils.images import expand_photos

    photos = expand_photos([args.photos])
    one_photo = str(photos[0])

    # Cold start, one whole process each.
    python = sys.executable
    import_seconds, testing_seconds = wall_times(
        [[python, "-c", "import tensorflow"],
         [python, "testing.py", "-ng", args.granja, "--models-dir", str(args.models_dir), "--img", one_photo]],
        args.repeats)

    # Folder scoring in this process: the same decoded photos through both code paths, each
    # warmed up on one batch first.
    import numpy as np

    import testing
    from utils.artifacts import load_scorer, load_trained
    from utils.images import load_photo

    trained = load_trained(args.models_dir, args.granja)
    scorer = load_scorer(trained, batch_size=testing.BATCH_SIZE)
    images = np.stack([load_photo(path, trained.input_size) for path in photos])
    trained.model.predict(images[:testing.BATCH_SIZE], verbose=0)
    scorer(images[:testing.BATCH_SIZE])

    started = time.monotonic()
    expected = trained.model.predict(images, batch_size=testing.BATCH_SIZE, verbose=0)
    predict_rate = len(images) / (time.monotonic() - started)

    started = time.monotonic()
    scores = scorer(images).probabilities
    ours_rate = len(images) / (time.monotonic() - started)
    assert np.allclose(scores, expected, atol=1e-5), float(np.abs(scores - expected).max())

    print(f"granja {args.granja}, backbone {trained.metadata['backbone']}, input {trained.input_size}, "
          f"{len(photos)} photos, scorer {type(scorer).__name__}")
    print(f"cold start: testing.py on one photo {testing_seconds:.2f} s, import tensorflow {import_seconds:.2f} s, "
          f"difference {testing_seconds - import_seconds:.2f} s (median of {args.repeats})")
    print(f"folder scoring: {ours_rate:.1f} photos/s, model.predict {predict_rate:.1f} photos/s, "
          f"ratio {ours_rate / predict_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
