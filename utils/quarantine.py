"""The quarantine folder of ssim.py: moving flagged photos there and back, and its reports.

A quarantine mirrors the relative paths of the photos moved into it from one source folder, so
that ``restore`` can put each one back where it was. Its report, ``ssim_report.json``, records
that source folder. Moves never overwrite a file: a clash stops the command before anything
moves.
"""

import csv
import errno
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from utils.errors import UserError
from utils.images import is_junk_name, is_photo_name

logger = logging.getLogger(__name__)

REPORT_JSON = "ssim_report.json"
REPORT_CSV = "ssim_report.csv"
REPORT_VERSION = 1
CSV_COLUMNS = ("photo", "kept", "ssim")

# os.link fails with these when the quarantine is on another file system or the file system
# has no hard links. The move then copies the file and deletes the original.
_NO_LINK_ERRORS = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}


def default_quarantine(root: Path) -> Path:
    """Return the default quarantine of ``root``: the sibling folder ``<root>_duplicates``."""
    root = root.resolve()
    return root.parent / f"{root.name}_duplicates"


def check_locations(root: Path, quarantine: Path) -> None:
    """Raise UserError if the photo folder and the quarantine overlap."""
    root, quarantine = root.resolve(), quarantine.resolve()
    if root == quarantine or root.is_relative_to(quarantine):
        raise UserError(
            f"--dir {root} is inside the quarantine {quarantine}; "
            "point --dir at the photo folder, or restore the quarantine with --restore first"
        )
    if quarantine.is_relative_to(root):
        raise UserError(
            f"the quarantine {quarantine} is inside --dir {root}, where it would be scanned as photos; "
            "pass a --quarantine folder outside it"
        )


def read_report(quarantine: Path) -> dict | None:
    """Return the JSON report in ``quarantine``, or None when there is none."""
    path = quarantine / REPORT_JSON
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"cannot read {path} ({err}); fix or remove it") from err
    if not isinstance(report, dict):
        raise UserError(f"{path} is not an ssim.py report (expected a JSON object); fix or remove it")
    return report


def check_source(root: Path, quarantine: Path) -> None:
    """Raise UserError if ``quarantine`` already contains photos moved from another folder."""
    report = read_report(quarantine)
    if report is None or "dir" not in report:
        return
    source = Path(report["dir"])
    if source.resolve() != root.resolve():
        raise UserError(
            f"the quarantine {quarantine} contains photos moved from {source}, not from {root}; "
            "pass another --quarantine, or restore that one with --restore first"
        )


def move_file(source: Path, target: Path) -> None:
    """Move one file, creating the target's folder; never replace an existing target.

    Raises:
        FileExistsError: ``target`` exists, even if it appeared after a check.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # A hard link fails if the target exists, unlike rename, which would replace it.
        os.link(source, target, follow_symlinks=False)
    except OSError as err:
        if err.errno not in _NO_LINK_ERRORS:
            raise
        _copy_exclusive(source, target)
    os.unlink(source)


def _copy_exclusive(source: Path, target: Path) -> None:
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
        return
    with open(source, "rb") as reader, open(target, "xb") as writer:
        shutil.copyfileobj(reader, writer)
    shutil.copystat(source, target)


def _check_free(targets: Sequence[Path], hint: str) -> None:
    clashes = [target for target in targets if target.exists() or target.is_symlink()]
    if clashes:
        more = f" and {len(clashes) - 1} more" if len(clashes) > 1 else ""
        raise UserError(f"{clashes[0]}{more} already exists and would be overwritten; {hint}")


def check_targets_free(quarantine: Path, photos: Sequence[Path]) -> None:
    """Raise UserError if a file already exists where one of ``photos`` would be moved to."""
    _check_free([quarantine / photo for photo in photos],
                f"restore {quarantine} with --restore or pass another --quarantine")


def quarantine_photos(root: Path, quarantine: Path, photos: Sequence[Path]) -> list[Path]:
    """Move photos from ``root`` into ``quarantine`` under the same relative paths.

    Every target is checked first, so a clash moves nothing.

    Args:
        root: the folder the photos are in.
        quarantine: the folder they go to.
        photos: paths relative to ``root``.

    Returns:
        The relative paths moved.
    """
    check_targets_free(quarantine, photos)
    moves = [(root / photo, quarantine / photo) for photo in photos]
    moved = []
    for (source, target), photo in zip(moves, photos):
        try:
            move_file(source, target)
        except OSError as err:
            raise UserError(
                f"cannot move {source} to {target} ({err.strerror or err}); "
                f"{len(moved)} photos were moved before it and --restore {quarantine} puts them back"
            ) from err
        moved.append(photo)
    logger.info("moved %d photos to %s", len(moved), quarantine)
    return moved


def delete_photos(root: Path, photos: Sequence[Path]) -> list[Path]:
    """Delete photos for good; ``photos`` are relative to ``root``. Returns those deleted."""
    deleted = []
    for photo in photos:
        path = root / photo
        try:
            path.unlink()
        except OSError as err:
            raise UserError(f"cannot delete {path} ({err.strerror or err}); {len(deleted)} photos were deleted before it") from err
        deleted.append(photo)
    logger.info("deleted %d photos from %s", len(deleted), root)
    return deleted


def quarantined_photos(quarantine: Path) -> list[Path]:
    """List the photo files in ``quarantine``, relative to it, sorted; reports and junk are left out."""
    photos = []
    for folder, subfolders, files in os.walk(quarantine):
        subfolders[:] = sorted(name for name in subfolders if not is_junk_name(name))
        for name in files:
            if is_photo_name(name):
                photos.append((Path(folder) / name).relative_to(quarantine))
    return sorted(photos, key=lambda path: path.parts)


def restore(quarantine: Path, root: Path | None = None) -> tuple[Path, list[Path]]:
    """Move every photo in ``quarantine`` back to the folder it came from.

    Every target is checked first, so a clash moves nothing. Folders of the quarantine that end
    up empty are removed; the reports and any other files stay.

    Args:
        quarantine: a folder written by ``quarantine_photos``.
        root: where to move the photos; None reads it from the quarantine's report.

    Returns:
        The folder restored to, and the relative paths moved back.
    """
    if not quarantine.is_dir():
        raise UserError(f"--restore {quarantine}: folder not found; pass the quarantine folder that ssim.py wrote")
    if root is None:
        report = read_report(quarantine)
        if report is None or not isinstance(report.get("dir"), str):
            raise UserError(
                f"{quarantine / REPORT_JSON} is missing or names no source folder; "
                "pass --dir with the folder the photos came from"
            )
        root = Path(report["dir"])
    check_locations(root, quarantine)

    photos = quarantined_photos(quarantine)
    moves = [(quarantine / photo, root / photo) for photo in photos]
    _check_free([target for _, target in moves], "move that file away first, then run --restore again")
    for (source, target), photo in zip(moves, photos):
        try:
            move_file(source, target)
        except OSError as err:
            raise UserError(f"cannot move {source} back to {target} ({err.strerror or err}); fix that and run --restore again") from err

    _remove_empty_folders(quarantine)
    logger.info("moved %d photos from %s back to %s", len(photos), quarantine, root)
    return root, photos


def _remove_empty_folders(top: Path) -> None:
    for folder, _, _ in sorted(os.walk(top), key=lambda item: -len(Path(item[0]).parts)):
        path = Path(folder)
        if path != top and not any(path.iterdir()):
            path.rmdir()


def write_atomic(path: Path, text: str) -> None:
    """Write text to ``path`` through a temporary file in the same folder, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as writer:
            writer.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_reports(quarantine: Path, report: dict, rows: Sequence[dict]) -> tuple[Path, Path]:
    """Write the run's report as JSON (sorted keys) and its flagged photos as CSV.

    Args:
        quarantine: the folder to write into.
        report: JSON-ready summary of the run; ``version`` is added.
        rows: one dict per flagged photo with the keys of ``CSV_COLUMNS``.

    Returns:
        The paths of the JSON and the CSV report.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    json_path, csv_path = quarantine / REPORT_JSON, quarantine / REPORT_CSV
    try:
        write_atomic(csv_path, buffer.getvalue())
        write_atomic(json_path, json.dumps({**report, "version": REPORT_VERSION}, indent=2, sort_keys=True) + "\n")
    except OSError as err:
        raise UserError(
            f"cannot write the report to {quarantine} ({err.strerror or err}); "
            "pass a --quarantine folder you can write to, or --dry-run"
        ) from err
    return json_path, csv_path
