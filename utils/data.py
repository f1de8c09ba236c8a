"""A granja's photos: listing the class folders, decoding every photo once, and splitting.

A granja is ``<dataset-dir>/<granja>/<class>/<photo>``. When the granja folder holds exactly the
folders ``train``, ``val`` and ``test``, each of them is a set of class folders and that split is
used as given.
"""

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.images import UnreadableImageError, is_junk_name, is_photo_name, load_photo, walk_folder

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")

# A class needs one photo in each of train, validation and test.
MIN_PHOTOS_TO_SPLIT = 3


@dataclass
class GranjaScan:
    """The photo files found under a granja folder, before any decoding.

    Attributes:
        root: the granja folder.
        photos: class name -> photo paths, sorted by path.
        preset: for a granja with train/val/test folders, split name -> class name -> paths.
        junk: hidden files and folders and tool leftovers that were ignored.
        other_files: files with a suffix that is not a photo format, also ignored.
    """

    root: Path
    photos: dict[str, list[Path]]
    preset: dict[str, dict[str, list[Path]]] | None = None
    junk: list[Path] = field(default_factory=list)
    other_files: list[Path] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        """Class names in index order (sorted, as Keras's directory loaders sort them)."""
        return sorted(self.photos)


def _walk_photos(folder: Path, junk: list[Path], other: list[Path]) -> list[Path]:
    """List the photos under ``folder`` recursively, recording what was skipped."""
    found = []
    for dirpath, dirnames, filenames in walk_folder(folder):
        kept_dirs = []
        for name in sorted(dirnames):
            if is_junk_name(name):
                junk.append(Path(dirpath) / name)
            else:
                kept_dirs.append(name)
        dirnames[:] = kept_dirs
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if is_photo_name(name):
                found.append(path)
            elif is_junk_name(name):
                junk.append(path)
            else:
                other.append(path)
    return sorted(found)


def _class_folders(folder: Path, junk: list[Path], other: list[Path]) -> dict[str, list[Path]]:
    """Map each visible sub-folder of ``folder`` to its photos; reject photos lying loose in it."""
    classes: dict[str, list[Path]] = {}
    loose = []
    for entry in sorted(folder.iterdir()):
        if is_junk_name(entry.name):
            junk.append(entry)
        elif entry.is_dir():
            classes[entry.name] = _walk_photos(entry, junk, other)
        elif is_photo_name(entry.name):
            loose.append(entry)
        else:
            other.append(entry)
    if loose:
        raise UserError(
            f"{len(loose)} photos lie directly in {folder} (for example {loose[0].name!r}); "
            f"move each animal's photos into its own class folder such as {folder / '<class>'}"
        )
    return classes


def scan_granja(root: Path) -> GranjaScan:
    """List a granja's class folders and photo files.

    Raises:
        UserError: the folder is missing, holds no class folder, or has photos outside class folders.
    """
    if not root.exists():
        raise UserError(f"granja folder not found: {root}; create it with one sub-folder of photos per "
                        "animal, or point --dataset-dir at the folder that contains it")
    if not root.is_dir():
        raise UserError(f"expected a granja folder but {root} is a file")

    junk: list[Path] = []
    other: list[Path] = []
    visible = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not is_junk_name(entry.name))
    preset = None
    if sorted(visible) == sorted(SPLIT_NAMES):
        preset = {name: _class_folders(root / name, junk, other) for name in SPLIT_NAMES}
        photos: dict[str, list[Path]] = {}
        for split in preset.values():
            for name, paths in split.items():
                photos.setdefault(name, []).extend(paths)
        photos = {name: sorted(paths) for name, paths in photos.items()}
    else:
        photos = _class_folders(root, junk, other)

    if not photos:
        raise UserError(f"no class folders in {root}; put each animal's photos in its own sub-folder "
                        f"such as {root / '<class>'}")
    return GranjaScan(root=root, photos=photos, preset=preset, junk=junk, other_files=other)


def decode_photos(paths: Sequence[Path], size: int, *, workers: int | None = None
                  ) -> tuple[np.ndarray, list[int], list[tuple[Path, str]]]:
    """Decode and resize every photo once, in parallel threads (Pillow releases the GIL).

    Returns:
        ``(images, kept, failed)``: a uint8 array of shape (len(kept), size, size, 3) holding the
        photos that decoded, the indices into ``paths`` of those photos, and (path, reason) for
        each photo that did not decode.
    """
    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    failed: list[tuple[Path, str]] = []

    def decode(index: int) -> tuple[int, str | None]:
        try:
            images[index] = load_photo(paths[index], size)
        except UnreadableImageError as err:
            return index, str(err)
        return index, None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, error in pool.map(decode, range(len(paths))):
            if error is None:
                ok[index] = True
            else:
                failed.append((paths[index], error))
    kept = np.flatnonzero(ok).tolist()
    return images[ok], kept, failed


def check_class_sizes(photos: dict[str, list[Path]], min_images: int | None) -> dict[str, list[Path]]:
    """Drop classes below ``--min-images`` and reject classes too small to split.

    Raises:
        UserError: a class has fewer than three photos, or no class is left.
    """
    kept = dict(photos)
    if min_images is not None:
        dropped = {name: len(paths) for name, paths in photos.items() if len(paths) < min_images}
        for name, count in dropped.items():
            logger.warning("dropping class %r: %d photo%s, fewer than --min-images %d", name, count,
                           "" if count == 1 else "s", min_images)
            del kept[name]

    too_small = {name: len(paths) for name, paths in kept.items() if len(paths) < MIN_PHOTOS_TO_SPLIT}
    if too_small:
        listed = ", ".join(f"{name!r} ({count})" for name, count in sorted(too_small.items()))
        raise UserError(
            f"classes with fewer than {MIN_PHOTOS_TO_SPLIT} photos cannot be split into train, validation "
            f"and test: {listed}; add photos or pass --min-images {MIN_PHOTOS_TO_SPLIT} to drop them"
        )
    if len(kept) < 2:
        names = ", ".join(repr(name) for name in kept) or "none"
        raise UserError(f"a recogniser needs at least 2 classes with photos (found {names}); "
                        "add a folder of photos for each animal")
    return kept


def split_indices(labels: Sequence[int], fractions: tuple[float, float], seed: int,
                  groups: Sequence[int] | None = None,
                  class_names: Sequence[str] | None = None) -> dict[str, list[int]]:
    """Split photo indices into train, validation and test, stratified by class and seeded.

    Each class puts ``round(n * fraction)`` photos, and at least one, into validation and into
    test, and the rest into train. With ``groups``, photos sharing a group id (near-duplicates)
    move together, so that a group never straddles two splits.

    Args:
        labels: class index per photo.
        fractions: (validation, test) fractions of each class.
        seed: seed of the shuffle, so the same data and seed give the same split.
        groups: group id per photo, or None for one group per photo.
        class_names: names of the class indices, for the error message.

    Raises:
        UserError: a class has fewer than three groups of photos.
    """
    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    too_few = []

    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        order = np.unique(groups[members])
        if len(order) < MIN_PHOTOS_TO_SPLIT:
            too_few.append(class_names[label] if class_names is not None else str(label))
            continue
        rng.shuffle(order)
        target_val, target_test = (max(1, round(len(members) * fraction)) for fraction in fractions)
        group_members = [members[groups[members] == group].tolist() for group in order]

        # Test takes groups until it reaches its share, leaving one group each for validation and
        # train; validation then does the same, leaving one for train; train takes the rest.
        test: list[int] = []
        val: list[int] = []
        position = 0
        while position < len(order) - 2 and (not test or len(test) < target_test):
            test.extend(group_members[position])
            position += 1
        while position < len(order) - 1 and (not val or len(val) < target_val):
            val.extend(group_members[position])
            position += 1
        splits["test"].extend(test)
        splits["val"].extend(val)
        for member_list in group_members[position:]:
            splits["train"].extend(member_list)

    if too_few:
        raise UserError(
            f"classes with fewer than {MIN_PHOTOS_TO_SPLIT} distinct photos after grouping near-duplicates: "
            f"{', '.join(repr(name) for name in too_few)}; raise --dedup-threshold, add photos, or pass "
            "--min-images to drop small classes"
        )
    return {name: sorted(indices) for name, indices in splits.items()}
