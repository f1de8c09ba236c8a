"""Downloading one file into a cache folder, so that a partial download never takes the final name."""

import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60


class DownloadError(OSError):
    """The download failed, stopped early or gave a file that the check rejected."""


def download_file(
    url: str,
    destination: Path,
    *,
    expected_size: int | None = None,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Download ``url`` to a temporary file beside ``destination``, check it, then rename it.

    The file takes its final name only after every byte arrived and the checks passed, so an
    interrupted or rejected download leaves nothing behind. A progress bar goes to stderr when
    it is a terminal.

    Args:
        url: any URL that ``urllib.request.urlopen`` accepts (https, http, file).
        destination: the final path. Its folder must exist.
        expected_size: the file size in bytes, if known.
        check: called with the temporary path once the size is right; it raises to reject the file.

    Raises:
        DownloadError: the server could not be reached or returned an error, the transfer
            stopped early, or the size is wrong. The message is one line.
        Exception: whatever ``check`` raises, unchanged.
    """
    handle, temporary_name = tempfile.mkstemp(dir=destination.parent, prefix=f"{destination.name}.", suffix=".part")
    temporary = Path(temporary_name)
    try:
        with os.fdopen(handle, "wb") as output:
            received, announced = _copy_url(url, output, label=destination.name)

        # A dropped connection can look like a normal end of the response, so count the bytes.
        if announced is not None and received != announced:
            raise DownloadError(f"the transfer stopped after {received:,} of {announced:,} bytes")
        if expected_size is not None and received != expected_size:
            raise DownloadError(f"the file has {received:,} bytes, expected {expected_size:,}")
        if check is not None:
            check(temporary)
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)
    logger.info("saved %s (%s bytes)", destination, f"{received:,}")


def _copy_url(url: str, output, label: str) -> tuple[int, int | None]:
    """Stream ``url`` into ``output``; return the bytes received and the Content-Length, if any."""
    logger.info("downloading %s", url)
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            announced = int(length) if length and length.isdigit() else None
            with tqdm(total=announced, unit="B", unit_scale=True, unit_divisor=1024, desc=label, disable=None) as bar:
                while chunk := response.read(_CHUNK_BYTES):
                    output.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise DownloadError(f"the server returned HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise DownloadError(f"cannot reach the server: {_one_line(err.reason)}") from err
    except (OSError, http.client.HTTPException) as err:
        raise DownloadError(f"the transfer failed after {received:,} bytes: {_one_line(err) or type(err).__name__}") from err
    return received, announced


def _one_line(value: object) -> str:
    return " ".join(str(value).split())
