"""Find near-duplicate photos by SSIM and move them out of a dataset folder.

Photos are visited in path order. A photo whose structural similarity index (SSIM) with a photo
kept before it is above --threshold is flagged, and otherwise kept. Flagged photos are moved to a
quarantine folder that mirrors their relative paths, with a CSV and a JSON report, and --restore
moves them back. Nothing is deleted unless --delete is given.

Example:
    python ssim.py --dir dataset/dogs42 --threshold 0.95
    python ssim.py --restore dataset/dogs42_duplicates
"""

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from utils import cli, dedup, quarantine
from utils.dedup_search import count_pairs, default_workers, find_similar_pairs, scan_photos, scope_keys_for
from utils.errors import UserError
from utils.images import PHOTO_EXTENSIONS

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser of ssim.py."""
    parser = cli.ArgumentParser(description=__doc__)

    search = parser.add_argument_group("search")
    search.add_argument("--dir", type=Path, metavar="DIR",
                        help="photo folder to search, recursively (one sub-folder per class)")
    search.add_argument("--threshold", type=cli.unit_interval, metavar="T",
                        help="flag a photo when its SSIM with a kept photo is above T, in [0, 1]; required")
    search.add_argument("--size", type=cli.positive_int, default=dedup.DEFAULT_SIZE, metavar="N",
                        help="side in pixels of the square grayscale images compared; at least 7")
    search.add_argument("--scope", choices=("folder", "tree"), default="folder",
                        help="compare photos within each folder, or across all folders under DIR")
    search.add_argument("--workers", type=cli.positive_int, default=default_workers(), metavar="N",
                        help="number of worker processes; the default is every core of this machine")

    action = parser.add_argument_group("what to do with flagged photos")
    action.add_argument("--quarantine", type=Path, metavar="DIR",
                        help="folder that receives flagged photos and the reports; <DIR>_duplicates beside DIR when not given")
    exclusive = action.add_mutually_exclusive_group()
    exclusive.add_argument("--dry-run", action="store_true",
                           help="only print the flagged photos and the summary; move and write nothing")
    exclusive.add_argument("--delete", action="store_true",
                           help="delete flagged photos permanently instead of moving them (the report is still written)")
    exclusive.add_argument("--restore", type=Path, metavar="QUARANTINE",
                           help="move every photo in QUARANTINE back to the folder it came from "
                                "(read from its report, or --dir) and exit")

    cli.add_debug_flag(parser)
    return parser


def check_search_args(args: argparse.Namespace) -> None:
    """Raise UserError for a missing threshold or an unusable --dir or --size."""
    if args.threshold is None:
        raise UserError("--threshold is required: pass a number from 0 to 1, for example --threshold 0.95")
    if args.dir is None:
        raise UserError("--dir is required: pass the photo folder, for example --dir dataset/dogs42")
    if not args.dir.exists():
        raise UserError(f"--dir {args.dir}: folder not found; pass an existing photo folder")
    if not args.dir.is_dir():
        raise UserError(f"--dir {args.dir} is not a folder; pass the folder that contains the photos")
    if args.size < dedup.WINDOW_SIZE:
        raise UserError(f"--size must be at least {dedup.WINDOW_SIZE}, the SSIM window side (got {args.size})")


class _ProgressBars:
    """Progress bars on stderr: photos while decoding, then pairs."""

    def __init__(self, photos: int):
        self.photos = tqdm(total=photos, desc="decoding", unit="photo", file=sys.stderr)
        self.pairs: tqdm | None = None

    def photos_decoded(self, count: int) -> None:
        self.photos.update(count)

    def pairs_started(self, total: int) -> None:
        self.photos.close()
        self.pairs = tqdm(total=total, desc="comparing", unit="pair", file=sys.stderr)

    def pairs_decided(self, count: int) -> None:
        if self.pairs is not None:
            self.pairs.update(count)

    def close(self) -> None:
        self.photos.close()
        if self.pairs is not None:
            self.pairs.close()


def relative(path: Path, root: Path) -> str:
    """Return ``path`` relative to ``root`` with forward slashes, as reports show it."""
    return path.relative_to(root).as_posix()


def run_search(args: argparse.Namespace) -> int:
    """Search --dir, write the reports, act on the flagged photos and print the summary."""
    check_search_args(args)
    started = time.perf_counter()
    root = args.dir
    target = args.quarantine if args.quarantine is not None else quarantine.default_quarantine(root)
    quarantine.check_locations(root, target)
    if not args.dry_run and target.exists():
        quarantine.check_source(root, target)

    scan = scan_photos(root)
    if not scan.photos:
        suffixes = ", ".join(sorted(PHOTO_EXTENSIONS))
        raise UserError(f"--dir {root} contains no photos ({suffixes}); pass a folder of photos")
    for path, reason in scan.skipped:
        logger.warning("skipping %s: %s", path, reason)
    keys = scope_keys_for(scan.photos, root, args.scope)
    logger.info("found %d photos and %d pairs to compare in %s (scope: %s)",
                len(scan.photos), count_pairs(keys), root, args.scope)

    bars = _ProgressBars(len(scan.photos))
    try:
        with logging_redirect_tqdm():
            result = find_similar_pairs(scan.photos, args.threshold, scope_keys=keys, size=args.size,
                                        workers=args.workers, progress=bars)
    finally:
        bars.close()
    flagged = dedup.flag_duplicates(len(scan.photos), result.pairs, result.scores, args.threshold)

    rows = [
        {"photo": relative(scan.photos[d.photo], root), "kept": relative(scan.photos[d.kept_photo], root),
         "ssim": round(d.ssim, 6)}
        for d in flagged
    ]
    skipped = [(relative(path, root), reason) for path, reason in scan.skipped]
    skipped += [(relative(scan.photos[i], root), reason) for i, reason in sorted(result.unreadable.items())]
    summary = {
        "photos_scanned": len(scan.photos),
        "pairs_compared": result.pairs_compared,
        "pairs_skipped": result.pairs_skipped,
        "photos_flagged": len(rows),
        "seconds": round(time.perf_counter() - started, 2),
    }

    if args.dry_run:
        for row in rows:
            print(f"{row['photo']}\tduplicate of\t{row['kept']}\tSSIM {row['ssim']:.4f}")
        print_summary(summary, "dry run: nothing moved", skipped, ())
        return 0

    # The report is written before anything moves, so that it records the source folder for
    # --restore even if a move fails halfway.
    flagged_paths = [Path(row["photo"]) for row in rows]
    if not args.delete:
        quarantine.check_targets_free(target, flagged_paths)
    report = {
        **summary,
        "action": "delete" if args.delete else "move",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dir": str(root.resolve()),
        "flagged": rows,
        "quarantine": str(target.resolve()),
        "scope": args.scope,
        "size": args.size,
        "skipped_files": [{"path": path, "reason": reason} for path, reason in skipped],
        "threshold": args.threshold,
    }
    report_paths = quarantine.write_reports(target, report, rows)
    if args.delete:
        quarantine.delete_photos(root, flagged_paths)
        action = "deleted"
    else:
        quarantine.quarantine_photos(root, target, flagged_paths)
        action = f"moved to {target}"
    print_summary(summary, action, skipped, report_paths)
    return 0


def print_summary(summary: dict, action: str, skipped: list[tuple[str, str]], report_paths: Sequence[Path]) -> None:
    """Print the run's counts, the skipped files and the report paths on stdout."""
    print(f"photos scanned: {summary['photos_scanned']}")
    print(f"pairs compared: {summary['pairs_compared']}")
    print(f"pairs skipped by the bound: {summary['pairs_skipped']}")
    print(f"photos flagged: {summary['photos_flagged']} ({action})")
    print(f"files skipped: {len(skipped)}")
    for path, reason in skipped:
        print(f"  {path}: {reason}")
    print(f"seconds: {summary['seconds']:.1f}")
    for path in report_paths:
        print(f"report: {path}")


def run_restore(args: argparse.Namespace) -> int:
    """Move every photo in the quarantine back and print what moved."""
    root, photos = quarantine.restore(args.restore, args.dir)
    print(f"photos restored: {len(photos)} (to {root})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ssim.py with the given command-line arguments."""
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.debug)
    if args.restore is not None:
        return run_restore(args)
    return run_search(args)


if __name__ == "__main__":
    sys.exit(cli.run(main))
