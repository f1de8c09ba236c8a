"""Photo files: which names are photos, and decoding any of them to one RGB array."""

import logging
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from utils.errors import UserError

logger = logging.getLogger(__name__)

# Lower-case suffixes read as photos; the letter case of a file name does not matter.
PHOTO_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

# Names that operating systems and tools drop beside photos. Names starting with "." (".DS_Store",
# "._photo.jpg" resource forks, ".ipynb_checkpoints") are hidden and skipped by that rule.
JUNK_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini", "__pycache__"})

# Errors Pillow raises for a file that is not a photo or is cut short. Truncated JPEGs raise
# OSError on load() because ImageFile.LOAD_TRUNCATED_IMAGES stays False; broken PNG chunks
# raise SyntaxError or struct.error.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class UnreadableImageError(UserError):
    """A file with a photo suffix that does not decode to a complete image."""


def is_junk_name(name: str) -> bool:
    """Return True for hidden files and folders and for names that tools leave beside photos."""
    return name.startswith(".") or name.lower() in JUNK_NAMES


def is_photo_name(name: str) -> bool:
    """Return True for a visible file whose suffix is a supported photo format."""
    return not is_junk_name(name) and Path(name).suffix.lower() in PHOTO_EXTENSIONS


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent pixels are composited over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: Pillow's own conversion clips at 255, so scale to 8 bits first.
        values = np.asarray(image, dtype=np.uint32)
        scale = 257 if values.max(initial=0) > 255 else 1
        image = Image.fromarray((values // scale).clip(0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode a photo fully, apply its EXIF orientation and return it as RGB.

    Returns:
        uint8 array of shape (height, width, 3).

    Raises:
        UnreadableImageError: the file is missing, empty, cut short or not an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = to_rgb(image)
    except FileNotFoundError:
        raise UnreadableImageError(f"photo not found: {path}") from None
    except IsADirectoryError:
        raise UnreadableImageError(f"expected a photo file but got a folder: {path}") from None
    except _DECODE_ERRORS as err:
        reason = str(err).strip() or type(err).__name__
        raise UnreadableImageError(
            f"cannot decode {path} as a photo ({reason}); replace or remove the file"
        ) from err
    return np.asarray(rgb, dtype=np.uint8)


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB array to size x size with bilinear interpolation (antialiased when shrinking).

    The aspect ratio is not kept: aligned face photos are close to square.
    """
    if image.shape[0] == size and image.shape[1] == size:
        return image
    resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def load_photo(path: str | Path, size: int) -> np.ndarray:
    """Load a photo as a size x size x 3 uint8 RGB array, the form every model takes."""
    return resize_rgb(load_rgb(path), size)


def walk_folder(folder: Path):
    """Walk ``folder`` like ``os.walk``, also into linked folders, entering each real folder once.

    Folders of symbolic links to photo folders are common when photos are shared between sets, and
    a link back to a parent folder would otherwise loop forever.
    """
    seen = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        yield dirpath, dirnames, filenames


def expand_photos(paths: Sequence[Path]) -> list[Path]:
    """Expand folders into their photos (recursively, sorted) and check that every path exists."""
    photos = []
    for path in paths:
        if path.is_dir():
            found = []
            for dirpath, dirnames, filenames in walk_folder(path):
                dirnames[:] = [name for name in dirnames if not is_junk_name(name)]
                found.extend(Path(dirpath) / name for name in filenames
                             if is_photo_name(name) and os.path.isfile(os.path.join(dirpath, name)))
            found.sort()
            if not found:
                raise UserError(f"no photos in folder {path}; photos are jpg, jpeg, png, bmp or webp files")
            photos.extend(found)
        elif path.exists():
            photos.append(path)
        else:
            raise UserError(f"--img not found: {path}; give a photo file or a folder of photos")
    return photos


def load_given_photos(paths: Sequence[Path], loader: Callable[[Path], object]) -> tuple[list[Path], list]:
    """Expand ``--img`` paths like ``expand_photos`` and decode each photo with ``loader``.

    A file named on the command line that does not decode stops the run. A photo found inside a
    folder that does not decode is skipped with a warning naming it, so one broken file does not
    block a folder of good ones.

    Returns:
        ``(photos, loaded)``: the photos that decoded and what ``loader`` returned for each.
    """
    photos, loaded = [], []
    for path in paths:
        if not path.is_dir():
            photos.extend(expand_photos([path]))
            loaded.append(loader(path))
            continue
        found = expand_photos([path])
        skipped = 0
        for photo in found:
            try:
                loaded.append(loader(photo))
            except UnreadableImageError as err:
                logger.warning("skipping a photo: %s", err)
                skipped += 1
                continue
            photos.append(photo)
        if skipped == len(found):
            raise UserError(f"none of the {len(found)} photos in folder {path} decodes; replace or remove them")
    return photos, loaded
