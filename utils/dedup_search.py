"""Find photo pairs above an SSIM threshold, decoding each photo once, across worker processes.

The search runs in four stages, each spread over ``workers`` processes:

1. Decode every photo, convert it to the compared grayscale array and compute its bound vector
   (``utils.dedup.to_gray``, ``utils.dedup.bound_features``).
2. Bound every pair within a scope from one matrix product per tile of photos and drop the
   pairs whose bound is at most the threshold (``utils.dedup.ssim_upper_bounds``).
3. Compute the window statistics of the photos that remain in some pair.
4. Compute the exact SSIM of the remaining pairs (``utils.dedup.ssim_pairs``).

The bound is never below the exact SSIM, so the pairs above the threshold are exactly those a
brute-force comparison of every pair finds.
"""

import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from utils import dedup
from utils.images import UnreadableImageError, is_junk_name, is_photo_name, load_rgb

try:
    import threadpoolctl

    has_threadpoolctl = True
except ImportError:  # installed with scikit-learn; without it BLAS keeps its default threads
    has_threadpoolctl = False

logger = logging.getLogger(__name__)

# Photos per side of one tile of the bound matrix. At a threshold of 0.85 or more, a 512 x 512
# tile of 224-pixel photos is a product of two 512 x 17,496 float32 matrices, roughly 0.2 s on
# one core. Below 0.85 the vectors, and the time, are four times larger.
TILE_PHOTOS = 512
# Pairs per task of the exact stage: enough to amortise the task overhead (about 0.3 ms per
# pair at 224 pixels).
EXACT_TASK_PAIRS = 256
# Below these amounts of work a stage runs in the calling process, because starting a pool of
# workers takes roughly 0.1 s. That is about the time to decode 30 photos, compute 300 exact
# pairs or bound 100,000 pairs on one core.
MIN_PARALLEL_PHOTOS = 32
MIN_PARALLEL_PAIRS = 256
MIN_PARALLEL_BOUNDS = 100_000


class SearchProgress(Protocol):
    """Receives progress of ``find_similar_pairs``, for example to drive progress bars."""

    def photos_decoded(self, count: int) -> None:
        """Called with the number of photos decoded or found unreadable since the last call."""

    def pairs_started(self, total: int) -> None:
        """Called once decoding ends, with the number of pairs that will be decided."""

    def pairs_decided(self, count: int) -> None:
        """Called with the number of pairs skipped or computed since the last call."""


@dataclass
class SearchResult:
    """Pairs above the threshold, and what the search did to find them.

    Indices refer to positions in the ``paths`` given to ``find_similar_pairs``.
    """

    pairs: np.ndarray
    """int64 array (k, 2) of pairs (i, j) with i < j whose SSIM is above the threshold."""
    scores: np.ndarray
    """float64 array (k,), the SSIM of each pair in ``pairs``."""
    unreadable: dict[int, str] = field(default_factory=dict)
    """Photos that failed to decode: index -> reason. They are in no pair."""
    pairs_compared: int = 0
    """Pairs whose exact SSIM was computed."""
    pairs_skipped: int = 0
    """Pairs whose upper bound was at most the threshold, so never computed."""


def default_workers() -> int:
    """Return the number of CPU cores this process may run on."""
    if hasattr(os, "process_cpu_count"):
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def count_pairs(scope_keys: Sequence[Hashable]) -> int:
    """Return the number of pairs of photos that share a scope key."""
    sizes: dict[Hashable, int] = {}
    for key in scope_keys:
        sizes[key] = sizes.get(key, 0) + 1
    return sum(n * (n - 1) // 2 for n in sizes.values())


def scope_keys_for(paths: Iterable[Path], root: Path, scope: str) -> list[Hashable]:
    """Return scope keys for ``find_similar_pairs``: the folder of each photo, or one key for all.

    Args:
        paths: photo files under ``root``.
        root: the folder that was searched.
        scope: "folder" compares photos of the same folder only; "tree" compares all.
    """
    if scope == "tree":
        return [None for _ in paths]
    if scope == "folder":
        return [path.relative_to(root).parent.as_posix() for path in paths]
    raise ValueError(f"scope must be 'folder' or 'tree' (got {scope!r})")


@dataclass
class FolderScan:
    """The files found under a folder: photos in visiting order, and everything skipped."""

    photos: list[Path]
    """Photo files, sorted by their path relative to the folder, compared part by part."""
    skipped: list[tuple[Path, str]]
    """Files and folders that are not photos, with the reason, sorted the same way."""


def scan_photos(root: Path) -> FolderScan:
    """List the photo files under ``root``, recursively, and the files skipped as not photos.

    Hidden files and folders (".DS_Store", "._photo.jpg" resource forks) and names that tools
    leave beside photos ("Thumbs.db", "__MACOSX") are skipped, as are files whose suffix is not
    a photo format. Symbolic links to folders are not followed.
    """
    photos: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for folder, subfolders, files in os.walk(root):
        folder_path = Path(folder)
        for name in list(subfolders):
            path = folder_path / name
            if is_junk_name(name):
                subfolders.remove(name)
                skipped.append((path, "hidden or system folder"))
        for name in files:
            path = folder_path / name
            if is_photo_name(name):
                photos.append(path)
            elif is_junk_name(name):
                skipped.append((path, "hidden or system file"))
            else:
                skipped.append((path, f"not a photo (suffix {Path(name).suffix or 'none'!r})"))

    def order(path: Path) -> tuple[str, ...]:
        return path.relative_to(root).parts

    photos.sort(key=order)
    skipped.sort(key=lambda item: order(item[0]))
    return FolderScan(photos, skipped)


def find_similar_pairs(
    paths: Sequence[Path],
    threshold: float,
    *,
    scope_keys: Sequence[Hashable] | None = None,
    size: int = dedup.DEFAULT_SIZE,
    workers: int | None = None,
    use_bound: bool = True,
    progress: SearchProgress | None = None,
) -> SearchResult:
    """Find every pair of photos in the same scope whose SSIM is above ``threshold``.

    Args:
        paths: photo files. Photos that fail to decode are reported in ``unreadable`` and left
            out of every pair.
        threshold: a pair is returned when its SSIM is strictly above this, in [0, 1].
        scope_keys: one key per path; only photos with equal keys are compared. None compares
            every pair.
        size: side of the square grayscale images compared, at least 7.
        workers: number of processes; None uses every core. With 1 everything runs in this
            process.
        use_bound: skip pairs whose upper bound is at most the threshold. Turning it off
            computes every pair and gives the same pairs, more slowly.
        progress: receives the number of photos decoded and of pairs decided as the search runs.

    Returns:
        The pairs above the threshold, sorted, with their SSIM and the counts of pairs computed
        and skipped.

    Notes:
        Memory at 224 pixels: 50 KB per photo for its grayscale array, 70 KB for its bound
        vector at a threshold of 0.85 or more (280 KB below), and 570 KB of window statistics
        for each photo left in some pair after the bound. At low thresholds nearly every photo
        is left in some pair.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1] (got {threshold})")
    size = dedup.check_size(size)
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1 (got {workers})")
    if scope_keys is not None and len(scope_keys) != len(paths):
        raise ValueError(f"scope_keys must have one key per path ({len(scope_keys)} keys for {len(paths)} paths)")

    started = time.perf_counter()
    block = dedup.bound_block(threshold) if use_bound else 0
    grays, features, unreadable = _decode_all(paths, size, workers, progress, bound_block=block)
    logger.info("decoded %d of %d photos in %.1f s", len(grays), len(paths), time.perf_counter() - started)

    groups = _scope_groups(paths, scope_keys, set(grays))
    total = sum(len(g) * (len(g) - 1) // 2 for g in groups)
    if progress is not None:
        progress.pairs_started(total)

    if use_bound:
        started = time.perf_counter()
        candidates = _bound_pairs(groups, features, size, threshold, workers, progress)
        logger.info("the upper bound ruled out %d of %d pairs in %.1f s",
                    total - len(candidates), total, time.perf_counter() - started)
    else:
        candidates = _all_pairs(groups)

    started = time.perf_counter()
    scores = _exact_scores(candidates, grays, workers, progress)
    logger.info("computed the SSIM of %d pairs in %.1f s", len(candidates), time.perf_counter() - started)

    above = scores > threshold
    return SearchResult(
        pairs=candidates[above],
        scores=scores[above],
        unreadable=unreadable,
        pairs_compared=len(candidates),
        pairs_skipped=total - len(candidates),
    )


def _scope_groups(
    paths: Sequence[Path], scope_keys: Sequence[Hashable] | None, decoded: set[int]
) -> list[np.ndarray]:
    """Group the indices of decoded photos by scope key, each group in increasing order."""
    keys = scope_keys if scope_keys is not None else [None] * len(paths)
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        if index in decoded:
            groups.setdefault(key, []).append(index)
    return [np.array(members, dtype=np.int64) for members in groups.values() if len(members) > 1]


def _all_pairs(groups: Sequence[np.ndarray]) -> np.ndarray:
    """List every pair (i, j), i < j, within each group, sorted."""
    blocks = []
    for members in groups:
        rows, columns = np.triu_indices(len(members), k=1)
        blocks.append(np.stack([members[rows], members[columns]], axis=1))
    return _sorted_pairs(blocks)


def _sorted_pairs(blocks: Sequence[np.ndarray]) -> np.ndarray:
    if not blocks:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(blocks).astype(np.int64, copy=False)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


# --- Worker processes ---------------------------------------------------------------------------
# Each stage starts its own pool with the platform's default start method and hands the workers
# what they need through the pool initializer. Workers keep it in the module-level dict _state.
# Under "fork" (the Linux default up to Python 3.13) the initializer's arguments are inherited
# without copying. "spawn" and "forkserver" pickle them once per worker and also re-run the
# calling script's imports in each worker, which is slow for a script that imports TensorFlow.

_state: dict[str, object] = {}


def _init_worker(state: dict[str, object]) -> None:
    _state.clear()
    _state.update(state)
    # Parallelism comes from the processes, so more threads per process would compete for cores.
    cv2.setNumThreads(1)
    if has_threadpoolctl:
        threadpoolctl.threadpool_limits(1)


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Limit OpenCV and BLAS to one thread in this process while the block runs."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        if has_threadpoolctl:
            with threadpoolctl.threadpool_limits(1):
                yield
        else:
            yield
    finally:
        cv2.setNumThreads(threads)


def _run_stage(
    function: Callable, tasks: Sequence, workers: int, state: dict[str, object], *, worth_processes: bool = True
) -> Iterator:
    """Yield ``function(task)`` for every task, in any order, from ``workers`` processes.

    With one worker, a single task, or ``worth_processes`` False (too little work to repay
    starting processes, about 0.1 s), everything runs in this process.
    """
    if not tasks:
        return
    if workers == 1 or len(tasks) == 1 or not worth_processes:
        saved = dict(_state)
        _state.clear()
        _state.update(state)
        try:
            with _single_threaded():
                for task in tasks:
                    yield function(task)
        finally:
            _state.clear()
            _state.update(saved)
        return

    processes = min(workers, len(tasks))
    chunks = max(1, min(16, len(tasks) // (processes * 4)))
    with multiprocessing.get_context().Pool(processes, initializer=_init_worker, initargs=(state,)) as pool:
        yield from pool.imap_unordered(function, tasks, chunksize=chunks)


def _decode_task(task: tuple[int, str]) -> tuple[int, np.ndarray | None, np.ndarray | None, str]:
    index, path = task
    try:
        gray = dedup.to_gray(load_rgb(path), _state["size"])
    except UnreadableImageError as err:
        return index, None, None, str(err)
    block = _state["bound_block"]
    features = dedup.bound_features(gray, block) if block else None
    return index, gray, features, ""


def _decode_all(
    paths: Sequence[Path], size: int, workers: int, progress: SearchProgress | None, *, bound_block: int
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict[int, str]]:
    """Decode every photo to its grayscale array, and its bound vector unless ``bound_block`` is 0."""
    grays: dict[int, np.ndarray] = {}
    features: dict[int, np.ndarray] = {}
    unreadable: dict[int, str] = {}
    tasks = [(index, str(path)) for index, path in enumerate(paths)]
    state = {"size": size, "bound_block": bound_block}
    stage = _run_stage(_decode_task, tasks, workers, state, worth_processes=len(tasks) >= MIN_PARALLEL_PHOTOS)
    for index, gray, vector, reason in stage:
        if gray is None:
            logger.warning("skipping a photo that does not decode: %s", reason)
            unreadable[index] = reason
        else:
            grays[index] = gray
            features[index] = vector
        if progress is not None:
            progress.photos_decoded(1)
    return grays, features, unreadable


def _bound_task(tiles: list[tuple[np.ndarray, np.ndarray, bool]]) -> tuple[np.ndarray, int]:
    """Return the pairs of some tiles whose bound exceeds the threshold, and the pairs decided."""
    matrix = _state["matrix"]
    norms = _state["norms"]
    position = _state["position"]
    threshold = _state["threshold"]
    windows = _state["windows"]
    found = []
    decided = 0
    for rows, columns, diagonal in tiles:
        row_at, column_at = position[rows], position[columns]
        bounds = dedup.ssim_upper_bounds(matrix[row_at], matrix[column_at], norms[row_at], norms[column_at], windows)
        keep = bounds > threshold
        if diagonal:
            keep &= np.triu(np.ones(keep.shape, dtype=bool), k=1)
            decided += len(rows) * (len(rows) - 1) // 2
        else:
            decided += len(rows) * len(columns)
        r, c = np.nonzero(keep)
        found.append(np.stack([rows[r], columns[c]], axis=1))
    return np.concatenate(found), decided


def _tile_tasks(groups: Sequence[np.ndarray], workers: int) -> list[list[tuple[np.ndarray, np.ndarray, bool]]]:
    """Cut the upper triangle of each group's pair matrix into tiles and bundle small tiles."""
    tiles = []
    for members in groups:
        blocks = [members[start:start + TILE_PHOTOS] for start in range(0, len(members), TILE_PHOTOS)]
        for a, rows in enumerate(blocks):
            for b in range(a, len(blocks)):
                tiles.append((rows, blocks[b], a == b))

    # Bundle tiles into tasks of roughly equal work, at least a few per worker.
    work = [len(rows) * len(columns) for rows, columns, _ in tiles]
    target = max(TILE_PHOTOS * TILE_PHOTOS // 4, sum(work) // (workers * 8) + 1)
    target = min(target, TILE_PHOTOS * TILE_PHOTOS)
    tasks: list[list[tuple[np.ndarray, np.ndarray, bool]]] = []
    current: list[tuple[np.ndarray, np.ndarray, bool]] = []
    current_work = 0
    for tile, amount in zip(tiles, work):
        current.append(tile)
        current_work += amount
        if current_work >= target:
            tasks.append(current)
            current, current_work = [], 0
    if current:
        tasks.append(current)
    return tasks


def _bound_pairs(
    groups: Sequence[np.ndarray],
    features: dict[int, np.ndarray],
    size: int,
    threshold: float,
    workers: int,
    progress: SearchProgress | None,
) -> np.ndarray:
    """Return the pairs within groups whose upper bound is above the threshold, sorted."""
    indices = np.array(sorted(features), dtype=np.int64)
    if len(indices) == 0 or not groups:
        return np.zeros((0, 2), dtype=np.int64)
    matrix = np.stack([features[int(i)] for i in indices])
    norms = np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64)
    position = np.full(int(indices.max()) + 1, -1, dtype=np.int64)
    position[indices] = np.arange(len(indices))

    state = {
        "matrix": matrix,
        "norms": norms,
        "position": position,
        "threshold": threshold,
        "windows": (size - 2 * (dedup.WINDOW_SIZE // 2)) ** 2,
    }
    found = []
    tasks = _tile_tasks(groups, workers)
    work = sum(len(g) * len(g) for g in groups) // 2
    for pairs, decided in _run_stage(_bound_task, tasks, workers, state, worth_processes=work >= MIN_PARALLEL_BOUNDS):
        found.append(pairs)
        if progress is not None:
            progress.pairs_decided(decided - len(pairs))
    return _sorted_pairs(found)


def _stats_task(indices: list[int]) -> list[tuple[int, dedup.WindowStats]]:
    grays = _state["grays"]
    return [(i, dedup.window_stats(grays[i])) for i in indices]


def _exact_task(task: tuple[int, np.ndarray]) -> tuple[int, np.ndarray]:
    start, pairs = task
    return start, dedup.ssim_pairs(_state["grays"], _state["stats"], pairs)


def _chunks(items: Sequence, count: int) -> list:
    return [items[start:start + count] for start in range(0, len(items), count)]


def _exact_scores(
    pairs: np.ndarray,
    grays: dict[int, np.ndarray],
    workers: int,
    progress: SearchProgress | None,
) -> np.ndarray:
    """Compute the SSIM of ``pairs`` (sorted), computing each photo's window statistics once."""
    if len(pairs) == 0:
        return np.zeros(0, dtype=np.float64)
    involved = np.unique(pairs).tolist()
    needed = {i: grays[i] for i in involved}

    per_task = max(1, min(64, len(involved) // (workers * 4) + 1))
    stats: dict[int, dedup.WindowStats] = {}
    stage = _run_stage(_stats_task, _chunks(involved, per_task), workers, {"grays": needed},
                       worth_processes=len(involved) >= MIN_PARALLEL_PHOTOS)
    for computed in stage:
        stats.update(computed)

    per_task = max(1, min(EXACT_TASK_PAIRS, len(pairs) // (workers * 4) + 1))
    tasks = [(start, pairs[start:start + per_task]) for start in range(0, len(pairs), per_task)]
    scores = np.empty(len(pairs), dtype=np.float64)
    stage = _run_stage(_exact_task, tasks, workers, {"grays": needed, "stats": stats},
                       worth_processes=len(pairs) >= MIN_PARALLEL_PAIRS)
    for start, values in stage:
        scores[start:start + len(values)] = values
        if progress is not None:
            progress.pairs_decided(len(values))
    return scores
