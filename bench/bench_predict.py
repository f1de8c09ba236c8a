#!/usr/bin/env python3
"""Scoring speed of testing.py, measured side by side in one run.

1. Cold start: the wall time of ``testing.py`` on one photo, a whole new process, against
   ``python -c "import tensorflow"`` on the same machine (median of several runs each).
2. Folder scoring: photos per second of ``testing.score_photos`` (the code behind ``--img FOLDER``)
   against ``model.predict`` on the same decoded batch.

Needs a trained granja, for example the one from the README:

    .venv/bin/python bench/bench_predict.py --granja dogs42 --models-dir models \\
        --photos ../shared/data/granjas/dogs42
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def wall_time(command: list[str], repeats: int) -> float:
    """Median wall time of a command over ``repeats`` runs, in seconds."""
    times = []
    for _ in range(repeats):
        started = time.monotonic()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        times.append(time.monotonic() - started)
    return statistics.median(times)


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

    # Cold start, one whole process each, alternating so that machine load hits both alike.
    python = sys.executable
    import_seconds = wall_time([python, "-c", "import tensorflow"], args.repeats)
    testing_seconds = wall_time([python, "testing.py", "-ng", args.granja, "--models-dir", str(args.models_dir),
                                 "--img", one_photo], args.repeats)

    # Folder scoring in this process: the same decoded photos through both code paths.
    import numpy as np

    import testing
    from utils.artifacts import load_trained
    from utils.images import load_photo

    trained = load_trained(args.models_dir, args.granja)
    images = np.stack([load_photo(path, trained.input_size) for path in photos])
    trained.model.predict(images[:testing.BATCH_SIZE], verbose=0)  # build predict's function once

    started = time.monotonic()
    expected = trained.model.predict(images, batch_size=testing.BATCH_SIZE, verbose=0)
    predict_rate = len(images) / (time.monotonic() - started)

    started = time.monotonic()
    scores = testing.score_images(trained.model, images)
    ours_rate = len(images) / (time.monotonic() - started)
    assert np.allclose(scores, expected, atol=1e-5)

    print(f"granja {args.granja}, backbone {trained.metadata['backbone']}, input {trained.input_size}, "
          f"{len(photos)} photos")
    print(f"cold start: testing.py on one photo {testing_seconds:.2f} s, import tensorflow {import_seconds:.2f} s, "
          f"difference {testing_seconds - import_seconds:.2f} s (median of {args.repeats})")
    print(f"folder scoring: {ours_rate:.1f} photos/s, model.predict {predict_rate:.1f} photos/s, "
          f"ratio {ours_rate / predict_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
