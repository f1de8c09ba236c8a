"""Measure ssim.py's search against the original pair-by-pair method on the same photos, in one run.

The original method handles every pair on its own: it reads both photos with OpenCV, converts
them to grayscale, resizes them to 224x224 and calls scikit-image's structural_similarity.
It is timed on a random sample of pairs, spread over the same number of worker processes.

Ours is timed on every pair of the photos: decoding once, the upper bound and the exact SSIM
of the pairs the bound keeps, as ``ssim.py --scope tree --dry-run`` does. It is also timed with
the bound turned off, on the pairs of fewer photos, to show the speed of the exact stage alone.

Rates are pairs decided per second. The run also reports the largest SSIM difference between
the two methods on the sampled pairs and whether their decisions at the threshold agree.

Example:
    python bench/bench_ssim.py --dir ../shared/data/dogfacenet --photos 500
"""

import argparse
import logging
import os
import random
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from skimage.metrics import structural_similarity

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import cli, dedup  # noqa: E402
from utils.dedup_search import default_workers, find_similar_pairs, scan_photos  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.images import load_rgb  # noqa: E402

ORIGINAL_SIZE = 224


def original_pair_ssim(pair: tuple[str, str]) -> float:
    """Compute one pair's SSIM by the original method: read, convert and resize both photos, then compare."""
    images = []
    for path in pair:
        image = cv2.imread(path, cv2.IMREAD_COLOR)  # rotated by its EXIF orientation unless IMREAD_IGNORE_ORIENTATION
        if image is None:
            raise UserError(f"OpenCV cannot read {path}; pass a folder of photos it can decode")
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        images.append(cv2.resize(gray, (ORIGINAL_SIZE, ORIGINAL_SIZE)))
    return float(structural_similarity(images[0], images[1]))


def _single_thread() -> None:
    cv2.setNumThreads(1)


def time_original(pairs: list[tuple[str, str]], workers: int) -> tuple[float, np.ndarray]:
    """Return the seconds the original method takes on ``pairs`` and its SSIM values."""
    started = time.perf_counter()
    with get_context().Pool(workers, initializer=_single_thread) as pool:
        scores = pool.map(original_pair_ssim, pairs, chunksize=max(1, len(pairs) // (workers * 8)))
    return time.perf_counter() - started, np.array(scores)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("../shared/data/dogfacenet"), metavar="DIR",
                        help="photo folder; photos are taken evenly spaced in path order")
    parser.add_argument("--photos", type=cli.positive_int, default=500, metavar="N",
                        help="number of photos; ours compares all their pairs")
    parser.add_argument("--sample-pairs", type=cli.positive_int, default=400, metavar="N",
                        help="number of random pairs of those photos timed with the original method")
    parser.add_argument("--exact-photos", type=cli.positive_int, default=100, metavar="N",
                        help="number of photos whose pairs are timed with the bound turned off")
    parser.add_argument("--threshold", type=cli.unit_interval, default=0.95, metavar="T",
                        help="SSIM threshold of the search")
    parser.add_argument("--workers", type=cli.positive_int, default=default_workers(), metavar="N",
                        help="worker processes for both methods")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair sample")
    cli.add_debug_flag(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.debug)
    logging.getLogger("utils").setLevel(logging.WARNING)  # the search's stage timings would interleave

    if not args.dir.is_dir():
        raise UserError(f"--dir {args.dir}: folder not found; pass a folder of photos")
    everything = scan_photos(args.dir).photos
    if len(everything) < 2:
        raise UserError(f"--dir {args.dir} contains {len(everything)} photos; pass a folder with at least 2")
    count = min(args.photos, len(everything))
    picks = np.linspace(0, len(everything) - 1, count).round().astype(int)
    photos = [everything[i] for i in np.unique(picks)]
    total = len(photos) * (len(photos) - 1) // 2
    print(f"photos: {len(photos)} of {len(everything)} under {args.dir}, evenly spaced in path order; "
          f"pairs: {total}; workers: {args.workers}; CPU cores here: {default_workers()}")
    if hasattr(os, "getloadavg"):
        # Other processes on the machine slow both methods; the load average shows how busy it was.
        print(f"load average over the last minute: {os.getloadavg()[0]:.1f}")

    rng = random.Random(args.seed)
    all_pairs = [(i, j) for i in range(len(photos)) for j in range(i + 1, len(photos))]
    sample = rng.sample(all_pairs, min(args.sample_pairs, total))
    seconds, original_scores = time_original([(str(photos[i]), str(photos[j])) for i, j in sample], args.workers)
    original_rate = len(sample) / seconds
    print(f"original: {len(sample)} sampled pairs in {seconds:.2f} s = {original_rate:,.0f} pairs/s")

    started = time.perf_counter()
    result = find_similar_pairs(photos, args.threshold, workers=args.workers)
    seconds = time.perf_counter() - started
    ours_rate = total / seconds
    print(f"ours: {total} pairs in {seconds:.2f} s = {ours_rate:,.0f} pairs/s "
          f"({result.pairs_skipped} skipped by the bound, {result.pairs_compared} computed, "
          f"{len(result.pairs)} above {args.threshold})")
    print(f"ratio: {ours_rate / original_rate:,.0f}x")

    exact_photos = photos[: args.exact_photos]
    exact_total = len(exact_photos) * (len(exact_photos) - 1) // 2
    started = time.perf_counter()
    find_similar_pairs(exact_photos, args.threshold, workers=args.workers, use_bound=False)
    seconds = time.perf_counter() - started
    exact_rate = exact_total / seconds
    print(f"ours without the bound: {exact_total} pairs of {len(exact_photos)} photos in {seconds:.2f} s "
          f"= {exact_rate:,.0f} pairs/s, ratio {exact_rate / original_rate:,.1f}x")

    grays = [dedup.to_gray(load_rgb(path)) for path in photos]
    stats = [dedup.window_stats(g) for g in grays]
    ours_scores = dedup.ssim_pairs(grays, stats, np.array(sample))
    difference = float(np.max(np.abs(ours_scores - original_scores)))
    agree = bool(np.all((ours_scores > args.threshold) == (original_scores > args.threshold)))
    print(f"largest SSIM difference on the sampled pairs: {difference:.1e}; "
          f"decisions at {args.threshold} agree: {'yes' if agree else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
