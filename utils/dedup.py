"""Near-duplicate photos by the structural similarity index (SSIM), mostly pure functions on arrays.

The SSIM here is the value of ``skimage.metrics.structural_similarity(a, b)`` with its defaults
(scikit-image 0.26: 7x7 uniform window, K1 = 0.01, K2 = 0.03, data range 255 for uint8, sample
covariance, mean over the windows that lie fully inside the image) on two grayscale uint8 arrays
of equal shape. It is computed from exact integer window sums instead of scikit-image's float
filters, so the two agree to about 1e-12.

The work is split so that a search over many photos does each step once:

* ``to_gray``: a decoded RGB photo to the size x size grayscale array that is compared.
* ``window_stats``: per-photo window sums, computed once per photo.
* ``ssim_pairs``: per pair only the cross term (the window sums of the pixel product).
* ``bound_features`` and ``ssim_upper_bounds``: an upper bound on the SSIM of many pairs at
  once, from one matrix product of per-photo vectors. A pair whose bound is at most the
  threshold cannot pass it, so it is skipped.
* ``flag_duplicates`` and ``connected_components``: the decisions, from the pairs above the
  threshold.
* ``group_near_duplicates``: near-duplicate groups of photo files for leak-free training
  splits, the one function here that reads files; ``utils.data.split_indices`` keeps each group
  on one side of the split.

References:
    Wang, Z., Bovik, A. C., Sheikh, H. R. and Simoncelli, E. P. (2004). Image quality
    assessment: from error visibility to structural similarity. IEEE Transactions on Image
    Processing, 13, 600-612. DOI 10.1109/TIP.2003.819861.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

# SSIM constants as scikit-image's structural_similarity uses them by default for uint8 input.
WINDOW_SIZE = 7
K1 = 0.01
K2 = 0.03
DATA_RANGE = 255
DEFAULT_SIZE = 224

_WINDOW_PIXELS = WINDOW_SIZE * WINDOW_SIZE
_MARGIN = WINDOW_SIZE // 2
_C1 = (K1 * DATA_RANGE) ** 2
_C2 = (K2 * DATA_RANGE) ** 2
# The same constants scaled for window sums instead of window means: with n = 49 pixels, the
# luminance term 2*mu_x*mu_y + C1 is (2*Sx*Sy + n^2*C1) / n^2 and the structure term
# 2*cov + C2 is (2*(n*Sxy - Sx*Sy) + n*(n-1)*C2) / (n*(n-1)), where cov is the sample covariance.
_C1_SUMS = _WINDOW_PIXELS**2 * _C1
_C2_SUMS = _WINDOW_PIXELS * (_WINDOW_PIXELS - 1) * _C2

# Side of the square blocks of windows whose bound coordinates are summed into one (see
# bound_features). Larger blocks give shorter vectors and a looser bound. Measured on 400
# DogFaceNet photos (every 8th in path order), blocks of 4 left the bound of 0.5% of all pairs
# above 0.85 and of 42% above 0.8. Blocks of 2 left 1.8% above 0.8, with vectors 4 times longer.
BOUND_BLOCK = 4
BOUND_BLOCK_LOW_THRESHOLD = 2
LOW_THRESHOLD = 0.85

# Unit roundoff of float32, and a slack for the float64 rounding in bound_features.
_FLOAT32_ROUNDOFF = 2.0**-24
_FEATURE_ROUNDOFF = _FLOAT32_ROUNDOFF + 1e-10
# Slack added to every bound, so that the rounding of ssim_pairs (about 1e-12) cannot lift a
# skipped pair above the threshold.
_SKIP_MARGIN = 1e-9


class WindowStats(NamedTuple):
    """Per-photo sums over every 7x7 window that lies fully inside the image.

    All three are int32 arrays of shape (size - 6, size - 6) and exact, because a window contains
    49 pixels of at most 255 and so every value stays below 2**31.
    """

    sums: np.ndarray
    """Sum of the window's pixels, Sx."""
    squared_sums: np.ndarray
    """Sx * Sx."""
    scaled_variances: np.ndarray
    """49 * (sum of squared pixels) - Sx * Sx, which is 49 * 48 times the sample variance."""


@dataclass(frozen=True)
class Duplicate:
    """A photo flagged as a near-duplicate of an earlier photo that is kept."""

    photo: int
    """Index of the flagged photo."""
    kept_photo: int
    """Index of the kept photo it matched."""
    ssim: float
    """SSIM of the two."""


def check_size(size: int) -> int:
    """Return ``size`` if a size x size image has room for one SSIM window, else raise ValueError."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"size must be an int (got {type(size).__name__})")
    if size < WINDOW_SIZE:
        raise ValueError(f"size must be at least {WINDOW_SIZE}, the SSIM window side (got {size})")
    return int(size)


def to_gray(image: np.ndarray, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Convert a decoded photo to the grayscale array that SSIM compares.

    RGB is converted with OpenCV's luma weights (0.299 R + 0.587 G + 0.114 B in fixed point, as
    ``cv2.COLOR_BGR2GRAY`` on the same pixels in BGR order), then resized with
    ``cv2.resize`` and bilinear interpolation, which does not smooth before shrinking.

    Args:
        image: uint8 array, (height, width, 3) RGB or (height, width) grayscale, of any size.
        size: side of the square result, at least 7.

    Returns:
        C-contiguous uint8 array of shape (size, size).
    """
    size = check_size(size)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8 (got {image.dtype}); decode photos with utils.images.load_rgb")
    if image.ndim == 3 and image.shape[2] == 3:
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    elif image.ndim == 2:
        gray = image
    else:
        raise ValueError(f"image must have shape (height, width, 3) or (height, width) (got {image.shape})")
    if gray.shape != (size, size):
        gray = cv2.resize(gray, (size, size), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(gray)


def _check_gray(gray: np.ndarray) -> np.ndarray:
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 grayscale array from to_gray (got {gray.dtype} {gray.shape})")
    if min(gray.shape) < WINDOW_SIZE:
        raise ValueError(f"image must be at least {WINDOW_SIZE}x{WINDOW_SIZE} for SSIM (got {gray.shape})")
    return gray


def _window_sums(values: np.ndarray) -> np.ndarray:
    """Sum every 7x7 window that lies inside ``values`` (uint8 or uint16), exactly, as int32."""
    sums = cv2.boxFilter(values, cv2.CV_32S, (WINDOW_SIZE, WINDOW_SIZE), normalize=False,
                         borderType=cv2.BORDER_CONSTANT)
    return sums[_MARGIN:-_MARGIN, _MARGIN:-_MARGIN]


def window_stats(gray: np.ndarray) -> WindowStats:
    """Compute the per-photo window sums that every pair with this photo reuses."""
    gray = _check_gray(gray)
    sums = _window_sums(gray).copy()
    squared_sums = sums * sums
    scaled_variances = _window_sums(cv2.multiply(gray, gray, dtype=cv2.CV_16U)) * np.int32(_WINDOW_PIXELS)
    scaled_variances -= squared_sums
    return WindowStats(sums, squared_sums, scaled_variances)


def ssim_pairs(
    pixels: Sequence[np.ndarray] | dict[int, np.ndarray],
    stats: Sequence[WindowStats] | dict[int, WindowStats],
    pairs: np.ndarray,
) -> np.ndarray:
    """Compute the SSIM of many pairs of photos from their pixels and window statistics.

    Per pair, only the window sums of the pixel product are new work; everything else comes from
    ``stats``. Pairs that share their first photo in a row reuse it from the CPU cache, so sort
    ``pairs`` by the first column for speed.

    Args:
        pixels: grayscale uint8 arrays from ``to_gray``, all of one shape, indexed by photo.
        stats: ``window_stats`` of the same photos, indexed the same way.
        pairs: int array of shape (k, 2), photo indices.

    Returns:
        float64 array of shape (k,), each equal to scikit-image's structural_similarity with
        its defaults on the two arrays, to about 1e-12.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    scores = np.empty(len(pairs), dtype=np.float64)
    if len(pairs) == 0:
        return scores

    shape = pixels[int(pairs[0, 0])].shape
    windows = stats[int(pairs[0, 0])].sums.shape
    # Work buffers, allocated once per call: fresh arrays per pair would cost page faults.
    product = np.empty(shape, dtype=np.uint16)
    cross_full = np.empty(shape, dtype=np.int32)
    cross = cross_full[_MARGIN:-_MARGIN, _MARGIN:-_MARGIN]
    means_product = np.empty(windows, dtype=np.int32)
    luminance = np.empty(windows, dtype=np.float64)
    structure = np.empty(windows, dtype=np.float64)
    luminance_norm = np.empty(windows, dtype=np.float64)
    structure_norm = np.empty(windows, dtype=np.float64)

    for k, (i, j) in enumerate(pairs.tolist()):
        x, y = pixels[i], pixels[j]
        if x.shape != shape or y.shape != shape:
            raise ValueError(f"photos {i} and {j} differ in shape ({x.shape} and {y.shape}); use one size")
        sx, sy = stats[i], stats[j]

        # Sxy: window sums of the pixel product, exact (49 * 255 * 255 < 2**31).
        cv2.multiply(x, y, dst=product, dtype=cv2.CV_16U)
        cv2.boxFilter(product, cv2.CV_32S, (WINDOW_SIZE, WINDOW_SIZE), dst=cross_full, normalize=False,
                      borderType=cv2.BORDER_CONSTANT)
        np.multiply(sx.sums, sy.sums, out=means_product)

        # cv2.addWeighted computes a * src1 + b * src2 + c in float64 for a CV_64F result, which
        # is exact here, and fuses the conversion from int32 with the arithmetic.
        # Halved numerator terms: Sx*Sy + n^2*C1/2 and (n*Sxy - Sx*Sy) + n*(n-1)*C2/2.
        cv2.addWeighted(means_product, 1.0, means_product, 0.0, _C1_SUMS / 2, dst=luminance, dtype=cv2.CV_64F)
        cv2.addWeighted(cross, float(_WINDOW_PIXELS), means_product, -1.0, _C2_SUMS / 2, dst=structure,
                        dtype=cv2.CV_64F)
        # Denominator terms: Sx^2 + Sy^2 + n^2*C1 and the two scaled variances + n*(n-1)*C2.
        cv2.addWeighted(sx.squared_sums, 1.0, sy.squared_sums, 1.0, _C1_SUMS, dst=luminance_norm, dtype=cv2.CV_64F)
        cv2.addWeighted(sx.scaled_variances, 1.0, sy.scaled_variances, 1.0, _C2_SUMS, dst=structure_norm,
                        dtype=cv2.CV_64F)

        cv2.multiply(luminance, structure, dst=luminance)
        cv2.multiply(luminance_norm, structure_norm, dst=luminance_norm)
        cv2.divide(luminance, luminance_norm, dst=luminance)
        scores[k] = 4.0 * cv2.sumElems(luminance)[0] / luminance.size
    return scores


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Compute the SSIM of two grayscale uint8 arrays of equal shape, as scikit-image does by default."""
    a, b = _check_gray(np.asarray(a)), _check_gray(np.asarray(b))
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape (got {a.shape} and {b.shape}); resize both with to_gray")
    pixels = [np.ascontiguousarray(a), np.ascontiguousarray(b)]
    stats = [window_stats(pixels[0]), window_stats(pixels[1])]
    return float(ssim_pairs(pixels, stats, np.array([[0, 1]]))[0])


def bound_block(threshold: float) -> int:
    """Return the block side for ``bound_features`` that suits a search at ``threshold``."""
    return BOUND_BLOCK if threshold >= LOW_THRESHOLD else BOUND_BLOCK_LOW_THRESHOLD


def bound_features(gray: np.ndarray, block: int = BOUND_BLOCK) -> np.ndarray:
    """Compute the per-photo vector whose distances bound the SSIM from above.

    Each 7x7 window w of photo x is mapped to a unit vector Fx(w) of 50 numbers: the 49 pixels
    minus their mean, divided by sqrt(48) * s, then sqrt(C2 / 2) / s. Here s^2 = var + C2 / 2 and
    var is the window's sample variance. For photos x and y, the dot product
    rho = <Fx(w), Fy(w)> equals (cov + C2 / 2) / (sx * sy). Where SSIM's structure term
    (2 cov + C2) / (varx + vary + C2) is positive it is at most rho, because
    sx^2 + sy^2 >= 2 sx sy, and the luminance term lies in [0, 1]. So each window's SSIM is at
    most max(rho, 0) <= (1 + rho) / 2 = 1 - |Fx(w) - Fy(w)|^2 / 4. The mean over N windows is
    then at most 1 - (sum over w of |Fx(w) - Fy(w)|^2) / (4 N).

    The vector keeps six coordinates of each Fx(w): the C2 coordinate and the projections on
    five orthonormal 7x7 patterns that sum to zero. The patterns are the horizontal and vertical
    ramps (offset from the centre, -3 to 3), their squares minus 4, and the product of the two
    ramps. Keeping coordinates is an orthogonal projection, which can only shrink distances. The coordinates of each
    ``block`` x ``block`` square of windows are then summed and divided by ``block``. By the
    Cauchy-Schwarz inequality, the squared distance of b^2 vectors' sums is at most b^2 times the
    sum of their squared distances, so this too can only shrink the total. Windows that do not
    fill a whole block are left out, which shrinks it as well. ``ssim_upper_bounds`` turns the
    distances into bounds.

    Args:
        gray: uint8 array from ``to_gray``.
        block: side of the squares of windows summed; larger gives a shorter vector and a
            looser bound.

    Returns:
        float32 vector of length 6 * ((size - 6) // block) ** 2, with squared norm at most the
        number of windows, (size - 6) ** 2. Empty when size - 6 is below ``block``.
    """
    gray = _check_gray(gray)
    if block < 1:
        raise ValueError(f"block must be at least 1 (got {block})")
    scaled_variances = window_stats(gray).scaled_variances
    side = scaled_variances.shape[0] // block
    if side == 0:
        return np.zeros(0, dtype=np.float32)

    # 1 / s per window. The scaled variances are exact integers, so never negative.
    inverse_spread = scaled_variances.astype(np.float64)
    inverse_spread *= 1.0 / (_WINDOW_PIXELS * (_WINDOW_PIXELS - 1))
    inverse_spread += _C2 / 2
    np.sqrt(inverse_spread, out=inverse_spread)
    np.reciprocal(inverse_spread, out=inverse_spread)

    pooled = [_pool_blocks(inverse_spread, side, block) * math.sqrt(_C2 / 2)]
    # Buffers reused for every pattern: each fresh array this size costs page faults.
    response = np.empty(gray.shape, dtype=np.float64)
    coordinate = np.empty_like(inverse_spread)
    for kernel_x, kernel_y in _PATTERNS:
        # Each pattern sums to zero, so its dot product with a window equals that with the
        # window minus its mean.
        cv2.sepFilter2D(gray, cv2.CV_64F, kernel_x, kernel_y, dst=response, borderType=cv2.BORDER_CONSTANT)
        np.multiply(response[_MARGIN:-_MARGIN, _MARGIN:-_MARGIN], inverse_spread, out=coordinate)
        pooled.append(_pool_blocks(coordinate, side, block) / math.sqrt(_WINDOW_PIXELS - 1))
    return np.concatenate([values.ravel() for values in pooled]).astype(np.float32)


def _unit(values: np.ndarray) -> np.ndarray:
    return values / math.sqrt(float(values @ values))


_RAMP = np.arange(WINDOW_SIZE, dtype=np.float64) - _MARGIN
_FLAT = np.ones(WINDOW_SIZE, dtype=np.float64)
# Separable 7x7 patterns as (horizontal, vertical) factors, each of unit norm as a 7x7 kernel.
# The ramp and its square minus its mean (4) are orthogonal and both sum to zero, so the five
# outer products are orthonormal and orthogonal to a constant window.
_PATTERNS = [
    (_unit(_RAMP), _unit(_FLAT)),
    (_unit(_FLAT), _unit(_RAMP)),
    (_unit(_RAMP * _RAMP - 4), _unit(_FLAT)),
    (_unit(_FLAT), _unit(_RAMP * _RAMP - 4)),
    (_unit(_RAMP), _unit(_RAMP)),
]


def _pool_blocks(values: np.ndarray, side: int, block: int) -> np.ndarray:
    """Sum each ``block`` x ``block`` square of ``values`` and divide by ``block``."""
    length = side * block
    columns = values[:length, :length].reshape(side, block, length).sum(axis=1)
    return columns.reshape(side, side, block).sum(axis=2) / block


def ssim_upper_bounds(
    rows: np.ndarray,
    columns: np.ndarray,
    row_norms: np.ndarray,
    column_norms: np.ndarray,
    windows: int,
) -> np.ndarray:
    """Bound the SSIM of every (row, column) pair of photos from above.

    The squared distances come from one float32 matrix product. For vectors of length d, its
    rounding error is at most d * 2**-24 times the product of the norms, in any summation order.
    The bound allows for that error and for the float32 rounding of the vectors, so it is never
    below the exact SSIM.

    Args:
        rows: float32 array (r, d) of ``bound_features``.
        columns: float32 array (c, d) of ``bound_features`` of photos of the same size.
        row_norms: float64 array (r,), the squared norms of ``rows`` summed in float64.
        column_norms: float64 array (c,), the same for ``columns``.
        windows: number of SSIM windows per photo, (size - 6) ** 2.

    Returns:
        float64 array (r, c) of bounds. Each exceeds its pair's SSIM by at least 1e-9, which
        covers the rounding of ``ssim_pairs``, and is at most 1 + 1e-9.
    """
    dimension = rows.shape[1]
    if dimension == 0:
        return np.full((rows.shape[0], columns.shape[0]), 1.0 + _SKIP_MARGIN)
    gram = (rows @ columns.T).astype(np.float64)
    roundoff = dimension * _FLOAT32_ROUNDOFF
    gemm_error = roundoff / (1.0 - roundoff)

    row_lengths = np.sqrt(row_norms)[:, None]
    column_lengths = np.sqrt(column_norms)[None, :]
    squared = row_norms[:, None] + column_norms[None, :] - 2.0 * gram
    squared -= 2.0 * gemm_error * row_lengths * column_lengths
    distance = np.sqrt(np.maximum(squared, 0.0))
    # The exact vectors differ from the float32 ones by at most this much each.
    distance -= _FEATURE_ROUNDOFF / (1.0 - _FEATURE_ROUNDOFF) * (row_lengths + column_lengths)
    distance = np.maximum(distance, 0.0)
    return 1.0 - distance * distance / (4.0 * windows) + _SKIP_MARGIN


def flag_duplicates(count: int, pairs: np.ndarray, scores: np.ndarray, threshold: float) -> list[Duplicate]:
    """Choose which photos to flag, visiting photos 0 to count - 1 in order.

    A photo is flagged when its SSIM with a photo visited before it and kept is above
    ``threshold``. Otherwise it is kept. Of a chain A~B~C where A and C differ, only B is
    flagged. When several kept photos match, the one with the highest SSIM is reported (the
    earliest on a tie).

    Args:
        count: number of photos.
        pairs: int array (k, 2) of photo indices; the order within a pair does not matter.
        scores: SSIM of each pair. Pairs at or below ``threshold`` are ignored, so pairs that
            were never compared may simply be left out.
        threshold: a pair matches when its SSIM is strictly above this.

    Returns:
        The flagged photos in visiting order.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(pairs) != len(scores):
        raise ValueError(f"pairs and scores differ in length ({len(pairs)} and {len(scores)})")
    above = scores > threshold
    earlier = np.minimum(pairs[above, 0], pairs[above, 1])
    later = np.maximum(pairs[above, 0], pairs[above, 1])
    values = scores[above]

    matches: dict[int, list[tuple[float, int]]] = {}
    for i, j, value in zip(earlier.tolist(), later.tolist(), values.tolist()):
        if i != j:
            matches.setdefault(j, []).append((value, i))

    kept = np.ones(count, dtype=bool)
    flagged = []
    for j in sorted(matches):
        candidates = [(value, i) for value, i in matches[j] if kept[i]]
        if candidates:
            value, i = max(candidates, key=lambda item: (item[0], -item[1]))
            kept[j] = False
            flagged.append(Duplicate(photo=j, kept_photo=i, ssim=value))
    return flagged


def connected_components(count: int, pairs: np.ndarray) -> list[int]:
    """Label photos so that photos joined by a chain of pairs share a label.

    Labels are 0, 1, 2, ... in the order in which each group's first photo appears.
    """
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in np.asarray(pairs, dtype=np.int64).reshape(-1, 2).tolist():
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    labels: dict[int, int] = {}
    return [labels.setdefault(root(i), len(labels)) for i in range(count)]


def group_near_duplicates(
    paths: Sequence[Path],
    threshold: float,
    *,
    size: int = DEFAULT_SIZE,
    workers: int | None = None,
) -> list[int]:
    """Label photos so that photos joined by a chain of pairs with SSIM above ``threshold`` share a label.

    Meant for splitting one class into training, validation and test sets: keeping each label on
    one side means no near-copy of a test photo is trained on. Labels are 0, 1, 2, ... in the
    order of each group's first photo. Unlike the rest of this module it reads files, through
    ``utils.dedup_search.find_similar_pairs``.

    Args:
        paths: photo files of one class; every pair among them is compared.
        threshold: SSIM above which two photos are joined, in [0, 1].
        size: side of the square grayscale images compared, at least 7.
        workers: number of processes; None uses every core. Small classes run in the calling
            process whatever this is.

    Returns:
        One label per path.

    Raises:
        UnreadableImageError: a photo does not decode; the message names the first one.
    """
    # Imported here because utils.dedup_search imports this module.
    from utils.dedup_search import find_similar_pairs
    from utils.images import UnreadableImageError

    result = find_similar_pairs(paths, threshold, size=size, workers=workers)
    if result.unreadable:
        raise UnreadableImageError(result.unreadable[min(result.unreadable)])
    return connected_components(len(paths), result.pairs)
