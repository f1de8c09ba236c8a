"""SSIM near-duplicate engine: equality with scikit-image, the bound, the decisions and grouping."""

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from conftest import shared_path, write_photo
from utils import dedup, dedup_search
from utils.data import split_indices
from utils.dedup import group_near_duplicates
from utils.dedup_search import find_similar_pairs
from utils.images import UnreadableImageError, load_rgb

TOLERANCE = 1e-6
THRESHOLD = 0.95


def dog_photos(count: int, per_dog: int = 1) -> list[Path]:
    """Return ``per_dog`` photos from each of ``count`` dogs of dogs42, in path order."""
    root = shared_path("data", "granjas", "dogs42")
    photos = []
    for folder in sorted(root.iterdir())[:count]:
        photos += sorted(folder.glob("*.jpg"))[:per_dog]
    return photos


def skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity(a, b))


def all_pairs(count: int) -> np.ndarray:
    return np.array([(i, j) for i in range(count) for j in range(i + 1, count)], dtype=np.int64)


def smooth_texture(seed: int, size: int = 96) -> np.ndarray:
    """Return an RGB image of smooth random blobs, which survives JPEG and resizing like a photo."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    noise = rng.integers(-12, 13, size=image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


# --- Near-duplicate copies as the tests inject them -------------------------------------------

def jpeg_copy(rgb: np.ndarray, path: Path) -> None:
    Image.fromarray(rgb).save(path, format="JPEG", quality=70)


def brighter_copy(rgb: np.ndarray, path: Path) -> None:
    Image.fromarray(np.clip(rgb.astype(np.float64) * 1.03, 0, 255).round().astype(np.uint8)).save(path)


def resized_copy(rgb: np.ndarray, path: Path) -> None:
    # Pillow's default bicubic filter; a bilinear round trip scores lower, 0.94 to 0.98 on dogs42.
    height, width = rgb.shape[:2]
    small = Image.fromarray(rgb).resize((200, 200), Image.Resampling.BICUBIC)
    small.resize((width, height), Image.Resampling.BICUBIC).save(path)


def exact_copy(source: Path, path: Path) -> None:
    shutil.copyfile(source, path)


@pytest.fixture
def injected_folder(tmp_path):
    """A folder of eight photos of different dogs plus two injected copies of each kind.

    Returns the folder, the photos in path order, and the set of injected copies.
    """
    originals = dog_photos(8)
    folder = tmp_path / "photos"
    folder.mkdir()
    for source in originals:
        shutil.copyfile(source, folder / source.name)
    copies = set()
    makers = [("q70.jpg", jpeg_copy), ("bright.png", brighter_copy), ("resized.png", resized_copy)]
    for k, source in enumerate(originals):
        if k >= 6:
            target = folder / f"{source.stem}_exact.jpg"
            exact_copy(source, target)
        else:
            suffix, make = makers[k % 3]
            target = folder / f"{source.stem}_{suffix}"
            make(load_rgb(source), target)
        copies.add(target)
    photos = sorted(folder.iterdir())
    return folder, photos, copies


def original_of(copy: Path, photos: list[Path]) -> int:
    """Return the index in ``photos`` of the photo that ``copy`` was made from."""
    return photos.index(copy.parent / (copy.name.split("_")[0] + ".jpg"))


def brute_force_flags(grays: list[np.ndarray], threshold: float) -> dict[int, int]:
    """Flag photos the slow way: scikit-image on every pair, then the greedy visit in order."""
    scores = {(i, j): skimage_ssim(grays[i], grays[j]) for i, j in all_pairs(len(grays)).tolist()}
    kept: list[int] = []
    flagged = {}
    for j in range(len(grays)):
        matches = [(scores[(i, j)], i) for i in kept if scores[(i, j)] > threshold]
        if matches:
            flagged[j] = max(matches, key=lambda m: (m[0], -m[1]))[1]
        else:
            kept.append(j)
    return flagged


# --- SSIM equals scikit-image's ----------------------------------------------------------------

@pytest.mark.parametrize("size", [224, 64])
def test_ssim_matches_skimage_on_real_pairs(size):
    photos = dog_photos(6) + dog_photos(1, per_dog=6)[1:]
    grays = [dedup.to_gray(load_rgb(path), size) for path in photos]
    stats = [dedup.window_stats(gray) for gray in grays]
    pairs = all_pairs(len(grays))

    ours = dedup.ssim_pairs(grays, stats, pairs)

    expected = np.array([skimage_ssim(grays[i], grays[j]) for i, j in pairs])
    assert len(pairs) == 55
    assert np.max(np.abs(ours - expected)) < TOLERANCE


def edge_case_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, size=(32, 32), dtype=np.uint8)
    checker = (np.indices((32, 32)).sum(axis=0) % 2 * 255).astype(np.uint8)
    return {
        "both black": (np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8)),
        "both white": (np.full((32, 32), 255, np.uint8), np.full((32, 32), 255, np.uint8)),
        "black and white": (np.zeros((32, 32), np.uint8), np.full((32, 32), 255, np.uint8)),
        "constant and noise": (np.full((32, 32), 128, np.uint8), noise),
        "noise and its negative": (noise, 255 - noise),
        "identical noise": (noise, noise.copy()),
        "checkerboard and noise": (checker, noise),
        "one window, 7x7": (noise[:7, :7], noise[1:8, 2:9]),
        "odd size 31": (noise[:31, :31], checker[:31, :31]),
        "not square, 9x13": (noise[:9, :13], noise[5:14, 3:16]),
    }


@pytest.mark.parametrize("name", list(edge_case_arrays()))
def test_ssim_matches_skimage_on_edge_cases(name):
    a, b = edge_case_arrays()[name]

    assert abs(dedup.ssim(a, b) - skimage_ssim(a, b)) < TOLERANCE


def test_ssim_identical_photos_is_one():
    gray = dedup.to_gray(smooth_texture(1))

    assert abs(dedup.ssim(gray, gray.copy()) - 1.0) < 1e-12


@pytest.mark.parametrize(
    ("mode", "shape", "suffix"),
    [
        ("RGB", (1, 1), ".png"),
        ("RGB", (2, 3), ".png"),
        ("L", (50, 80), ".png"),
        ("RGBA", (300, 200), ".png"),
        ("P", (64, 64), ".png"),
        ("I;16", (40, 40), ".png"),
        ("CMYK", (120, 90), ".jpg"),
        ("RGB", (224, 224), ".bmp"),
    ],
)
def test_ssim_matches_skimage_across_photo_modes(tmp_path, mode, shape, suffix):
    height, width = shape
    rgb = smooth_texture(3, size=max(height, width))[:height, :width]
    image = Image.fromarray(rgb)
    if mode == "RGBA":
        alpha = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
        image = image.convert("RGBA")
        image.putalpha(Image.fromarray(alpha))
    elif mode == "I;16":
        image = Image.fromarray((np.asarray(image.convert("L"), dtype=np.uint16) * 257))
    else:
        image = image.convert(mode)
    path = tmp_path / f"photo{suffix}"
    image.save(path)
    reference = dedup.to_gray(smooth_texture(4))

    gray = dedup.to_gray(load_rgb(path))

    assert gray.shape == (224, 224)
    assert gray.dtype == np.uint8
    assert abs(dedup.ssim(gray, reference) - skimage_ssim(gray, reference)) < TOLERANCE
    assert abs(dedup.ssim(gray, gray) - 1.0) < TOLERANCE


def test_to_gray_matches_opencv():
    rgb = smooth_texture(5, size=150)
    expected = cv2.resize(cv2.cvtColor(rgb[:, :, ::-1].copy(), cv2.COLOR_BGR2GRAY), (224, 224))

    assert np.array_equal(dedup.to_gray(rgb), expected)
    assert np.array_equal(dedup.to_gray(rgb[:, :, 0], 30), cv2.resize(rgb[:, :, 0], (30, 30)))


def test_to_gray_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 7"):
        dedup.to_gray(smooth_texture(1), 6)
    with pytest.raises(TypeError, match="uint8"):
        dedup.to_gray(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        dedup.to_gray(np.zeros((10, 10, 4), dtype=np.uint8))


def test_ssim_rejects_different_shapes():
    with pytest.raises(ValueError, match="same shape"):
        dedup.ssim(np.zeros((10, 10), np.uint8), np.zeros((10, 12), np.uint8))


# --- The upper bound ---------------------------------------------------------------------------

def bound_matrix(grays: list[np.ndarray], block: int = dedup.BOUND_BLOCK) -> np.ndarray:
    features = np.stack([dedup.bound_features(gray, block) for gray in grays])
    norms = np.einsum("ij,ij->i", features, features, dtype=np.float64)
    windows = (grays[0].shape[0] - dedup.WINDOW_SIZE + 1) ** 2
    return dedup.ssim_upper_bounds(features, features, norms, norms, windows)


@pytest.mark.parametrize("block", [1, 2, 4])
def test_upper_bound_never_below_ssim(injected_folder, block):
    _, photos, _ = injected_folder
    grays = [dedup.to_gray(load_rgb(path)) for path in photos]
    grays += [np.zeros((224, 224), np.uint8), np.full((224, 224), 255, np.uint8), grays[0][:, ::-1].copy()]
    stats = [dedup.window_stats(gray) for gray in grays]
    pairs = all_pairs(len(grays))

    exact = dedup.ssim_pairs(grays, stats, pairs)
    bounds = bound_matrix(grays, block)[pairs[:, 0], pairs[:, 1]]

    assert np.all(bounds >= exact)


@pytest.mark.parametrize("size", [7, 10, 31])
def test_upper_bound_never_below_ssim_at_small_sizes(size):
    grays = [dedup.to_gray(smooth_texture(seed), size) for seed in range(6)]
    stats = [dedup.window_stats(gray) for gray in grays]
    pairs = all_pairs(len(grays))

    exact = dedup.ssim_pairs(grays, stats, pairs)
    bounds = bound_matrix(grays)[pairs[:, 0], pairs[:, 1]]

    assert np.all(bounds >= exact)


@pytest.mark.parametrize("threshold", [0.95, 0.8])
def test_upper_bound_rules_out_different_dogs(threshold):
    grays = [dedup.to_gray(load_rgb(path)) for path in dog_photos(20)]
    pairs = all_pairs(len(grays))

    bounds = bound_matrix(grays, dedup.bound_block(threshold))[pairs[:, 0], pairs[:, 1]]

    assert np.mean(bounds <= threshold) >= 0.9


# --- Decisions ---------------------------------------------------------------------------------

def test_flag_duplicates_chain_flags_only_middle():
    # A~B and B~C are above the threshold, A and C are not: B goes, A and C stay.
    pairs = np.array([[0, 1], [1, 2], [0, 2]])
    scores = np.array([0.97, 0.97, 0.90])

    flagged = dedup.flag_duplicates(3, pairs, scores, THRESHOLD)

    assert flagged == [dedup.Duplicate(photo=1, kept_photo=0, ssim=0.97)]


def test_flag_duplicates_reports_best_kept_match():
    pairs = np.array([[0, 3], [1, 3], [2, 3]])
    scores = np.array([0.96, 0.99, 0.99])

    flagged = dedup.flag_duplicates(4, pairs, scores, THRESHOLD)

    assert flagged == [dedup.Duplicate(photo=3, kept_photo=1, ssim=0.99)]


def test_flag_duplicates_ignores_flagged_and_equal_scores():
    # Photo 2 matches only photo 1, which is itself flagged, so photo 2 is kept. A score equal
    # to the threshold is not above it.
    pairs = np.array([[0, 1], [1, 2], [0, 3]])
    scores = np.array([0.98, 0.98, THRESHOLD])

    flagged = dedup.flag_duplicates(4, pairs, scores, THRESHOLD)

    assert [d.photo for d in flagged] == [1]


def test_connected_components_joins_chains():
    labels = dedup.connected_components(6, np.array([[4, 2], [2, 0], [3, 5]]))

    assert labels == [0, 1, 0, 2, 0, 2]


# --- The search over files ---------------------------------------------------------------------

def test_injected_copies_flagged_as_brute_force(injected_folder):
    _, photos, copies = injected_folder

    result = find_similar_pairs(photos, THRESHOLD, workers=1)
    flagged = dedup.flag_duplicates(len(photos), result.pairs, result.scores, THRESHOLD)

    assert {photos[d.photo] for d in flagged} == copies
    grays = [dedup.to_gray(load_rgb(path)) for path in photos]
    expected = brute_force_flags(grays, THRESHOLD)
    assert {d.photo: d.kept_photo for d in flagged} == expected


def test_injected_copies_score_above_097(injected_folder):
    _, photos, copies = injected_folder

    grays = [dedup.to_gray(load_rgb(path)) for path in photos]

    for copy in copies:
        score = dedup.ssim(grays[photos.index(copy)], grays[original_of(copy, photos)])
        assert score > 0.97, copy.name


def test_search_without_bound_gives_same_pairs(injected_folder):
    _, photos, _ = injected_folder

    with_bound = find_similar_pairs(photos, 0.9, workers=1)
    without = find_similar_pairs(photos, 0.9, workers=1, use_bound=False)

    assert np.array_equal(with_bound.pairs, without.pairs)
    assert np.allclose(with_bound.scores, without.scores, rtol=0, atol=1e-12)
    assert without.pairs_compared == len(photos) * (len(photos) - 1) // 2
    assert with_bound.pairs_skipped > 0


def test_worker_processes_match_one_process(tmp_path, monkeypatch):
    # Force every stage into worker processes and several tiles, which small inputs would skip.
    monkeypatch.setattr(dedup_search, "MIN_PARALLEL_PHOTOS", 0)
    monkeypatch.setattr(dedup_search, "MIN_PARALLEL_PAIRS", 0)
    monkeypatch.setattr(dedup_search, "MIN_PARALLEL_BOUNDS", 0)
    monkeypatch.setattr(dedup_search, "TILE_PHOTOS", 5)
    paths = []
    for k in range(14):
        rgb = smooth_texture(k % 9, size=48)
        path = tmp_path / f"{k:02d}.png"
        Image.fromarray(rgb if k < 9 else np.clip(rgb.astype(int) + 2, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)

    serial = find_similar_pairs(paths, 0.3, size=48, workers=1)
    parallel = find_similar_pairs(paths, 0.3, size=48, workers=2)
    brute = find_similar_pairs(paths, 0.3, size=48, workers=2, use_bound=False)

    assert np.array_equal(serial.pairs, parallel.pairs)
    assert np.array_equal(serial.pairs, brute.pairs)
    assert np.array_equal(serial.scores, parallel.scores)
    assert {(k % 9, k) for k in range(9, 14)} <= {tuple(p) for p in serial.pairs.tolist()}


def test_search_scope_keys_limit_comparisons(tmp_path):
    rgb = smooth_texture(1)
    paths = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    for path in paths:
        Image.fromarray(rgb).save(path)

    result = find_similar_pairs(paths, THRESHOLD, scope_keys=["x", "y", "x"], workers=1)

    assert result.pairs.tolist() == [[0, 2]]
    assert result.pairs_compared + result.pairs_skipped == 1


def test_search_reports_unreadable_photos(tmp_path):
    good = [write_photo(tmp_path / f"{k}.png", seed=k) for k in range(2)]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")

    result = find_similar_pairs([good[0], broken, good[1]], THRESHOLD, workers=1)

    assert list(result.unreadable) == [1]
    assert result.pairs_compared + result.pairs_skipped == 1


def test_shifted_copy_scores_below_threshold():
    # SSIM compares pixels in place: a copy moved by 2 pixels is not found at 0.95.
    rgb = load_rgb(dog_photos(1)[0])
    shifted = np.roll(rgb, 2, axis=1)

    score = dedup.ssim(dedup.to_gray(rgb), dedup.to_gray(shifted))

    assert score < THRESHOLD


# --- Groups for leak-free splits ---------------------------------------------------------------

def test_group_near_duplicates_joins_copies(injected_folder):
    _, photos, copies = injected_folder

    labels = group_near_duplicates(photos, THRESHOLD, workers=1)

    originals = [k for k, path in enumerate(photos) if path not in copies]
    assert len({labels[k] for k in originals}) == len(originals)
    for copy in copies:
        assert labels[photos.index(copy)] == labels[original_of(copy, photos)]


def test_split_by_groups_keeps_copies_together(injected_folder):
    _, photos, copies = injected_folder
    labels = group_near_duplicates(photos, THRESHOLD, workers=1)

    same_class = np.zeros(len(photos), dtype=int)
    for seed in range(10):
        splits = split_indices(same_class, (0.25, 0.25), seed=seed, groups=labels)
        side = {index: name for name, indices in splits.items() for index in indices}

        for group in set(labels):
            assert len({side[k] for k in range(len(photos)) if labels[k] == group}) == 1


def test_group_near_duplicates_raises_for_unreadable(tmp_path):
    good = write_photo(tmp_path / "good.png", seed=1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")

    with pytest.raises(UnreadableImageError, match="broken.png"):
        group_near_duplicates([good, broken], THRESHOLD, workers=1)
