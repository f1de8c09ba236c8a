"""Listing granja folders, decoding photos and splitting them."""

import numpy as np
import pytest
from PIL import Image

from conftest import write_photo
from utils.data import check_class_sizes, decode_photos, scan_granja, split_indices
from utils.errors import UserError
from utils.images import UnreadableImageError, expand_photos, is_photo_name, load_rgb


def make_granja(root, counts):
    for class_index, (name, count) in enumerate(counts.items()):
        for index in range(count):
            write_photo(root / name / f"photo_{index}.jpg", seed=100 * class_index + index)
    return root


def test_scan_lists_classes_and_ignores_junk(tmp_path):
    root = make_granja(tmp_path / "farm", {"Peluchín": 3, "Perrete 2": 4})
    (root / "__MACOSX").mkdir()
    write_photo(root / "__MACOSX" / "Peluchín" / "._photo_0.jpg", seed=1)
    (root / ".ipynb_checkpoints").mkdir()
    (root / "Peluchín" / "Thumbs.db").write_bytes(b"junk")
    (root / "Peluchín" / ".DS_Store").write_bytes(b"junk")
    (root / "Peluchín" / "._photo_0.jpg").write_bytes(b"\x00\x05\x16\x07")
    (root / "Perrete 2" / "notes.txt").write_text("not a photo")

    scan = scan_granja(root)

    assert scan.classes == sorted(["Peluchín", "Perrete 2"])
    assert len(scan.photos["Peluchín"]) == 3
    assert len(scan.photos["Perrete 2"]) == 4
    junk_names = {path.name for path in scan.junk}
    assert {"__MACOSX", ".ipynb_checkpoints", "Thumbs.db", ".DS_Store", "._photo_0.jpg"} <= junk_names
    assert [path.name for path in scan.other_files] == ["notes.txt"]


def test_folders_of_links_are_followed_once(tmp_path):
    photo = write_photo(tmp_path / "photos" / "rex" / "0.jpg", seed=0)
    (tmp_path / "linked" / "dog").mkdir(parents=True)
    (tmp_path / "linked" / "rex").symlink_to(photo.parent, target_is_directory=True)
    (tmp_path / "linked" / "dog" / "1.jpg").symlink_to(photo)
    (tmp_path / "linked" / "dog" / "loop").symlink_to(tmp_path / "linked" / "dog", target_is_directory=True)
    scan = scan_granja(tmp_path / "linked")
    assert scan.photos["rex"] == [tmp_path / "linked" / "rex" / "0.jpg"]
    assert scan.photos["dog"] == [tmp_path / "linked" / "dog" / "1.jpg"]

    (tmp_path / "linked" / "dog" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    assert expand_photos([tmp_path / "linked"]) == [tmp_path / "linked" / "dog" / "1.jpg",
                                                    tmp_path / "linked" / "rex" / "0.jpg"]


def test_scan_photo_suffixes_any_case(tmp_path):
    for suffix in ("JPG", "jpeg", "Png", "bmp", "WEBP"):
        assert is_photo_name(f"photo.{suffix}")
    assert not is_photo_name("._photo.jpg")
    assert not is_photo_name("photo.gif")


def test_scan_missing_folder(tmp_path):
    with pytest.raises(UserError, match="granja folder not found"):
        scan_granja(tmp_path / "nowhere")


def test_scan_loose_photos(tmp_path):
    root = make_granja(tmp_path / "farm", {"a": 3})
    write_photo(root / "loose.jpg", seed=5)
    with pytest.raises(UserError, match="lie directly in"):
        scan_granja(root)


def test_scan_preset_split(tmp_path):
    root = tmp_path / "farm"
    for split in ("train", "val", "test"):
        make_granja(root / split, {"a": 2, "b": 2})
    scan = scan_granja(root)
    assert scan.preset is not None
    assert sorted(scan.preset) == ["test", "train", "val"]
    assert len(scan.photos["a"]) == 6


def test_decode_skips_broken_photos(tmp_path):
    good = write_photo(tmp_path / "good.jpg", seed=1, size=64)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("hello")

    images, kept, failed = decode_photos([good, truncated, empty, text], size=32)

    assert kept == [0]
    assert images.shape == (1, 32, 32, 3)
    assert images.dtype == np.uint8
    assert sorted(path.name for path, _ in failed) == ["empty.jpg", "text.png", "truncated.jpg"]


def test_load_rgb_converts_every_mode(tmp_path):
    base = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    image = Image.fromarray(base)
    cases = {
        "gray.png": image.convert("L"),
        "rgba.png": image.convert("RGBA"),
        "palette.png": image.convert("P"),
        "cmyk.jpg": image.convert("CMYK"),
        "photo.bmp": image,
        "photo.webp": image,
    }
    for name, converted in cases.items():
        converted.save(tmp_path / name)
        array = load_rgb(tmp_path / name)
        assert array.shape == (20, 30, 3), name
        assert array.dtype == np.uint8, name


def test_load_rgb_applies_exif_orientation(tmp_path):
    image = Image.fromarray(np.zeros((10, 30, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").shape == (30, 10, 3)


def test_load_rgb_rejects_truncated_jpeg(tmp_path):
    good = write_photo(tmp_path / "good.jpg", seed=2, size=128)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(UnreadableImageError, match="cut.jpg"):
        load_rgb(cut)


def test_class_sizes_too_small_names_classes(tmp_path):
    photos = {"big": [tmp_path / str(i) for i in range(5)], "tiny": [tmp_path / "x"], "empty": []}
    with pytest.raises(UserError, match="'empty' \\(0\\), 'tiny' \\(1\\).*--min-images"):
        check_class_sizes(photos, None)


def test_class_sizes_min_images_drops(tmp_path):
    photos = {"a": [tmp_path / str(i) for i in range(5)], "b": [tmp_path / str(i) for i in range(4)],
              "tiny": [tmp_path / "x"]}
    assert sorted(check_class_sizes(photos, 3)) == ["a", "b"]


def test_class_sizes_one_class(tmp_path):
    with pytest.raises(UserError, match="at least 2 classes"):
        check_class_sizes({"only": [tmp_path / str(i) for i in range(5)]}, None)


def test_split_stratified_and_seeded():
    labels = np.repeat(np.arange(5), [3, 5, 10, 20, 40])
    split = split_indices(labels, (0.15, 0.15), seed=7)

    everything = sorted(split["train"] + split["val"] + split["test"])
    assert everything == list(range(len(labels)))
    for label in range(5):
        for name in ("train", "val", "test"):
            assert (labels[split[name]] == label).sum() >= 1, (label, name)
    assert (labels[split["test"]] == 4).sum() == 6
    assert split == split_indices(labels, (0.15, 0.15), seed=7)
    assert split != split_indices(labels, (0.15, 0.15), seed=8)


def test_split_keeps_groups_together():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 12)
    groups = rng.integers(0, 6, size=len(labels)) + labels * 100
    split = split_indices(labels, (0.2, 0.2), seed=1, groups=groups)
    side = {}
    for name, indices in split.items():
        for index in indices:
            assert side.setdefault(groups[index], name) == name


def test_split_too_few_groups_names_class():
    labels = np.repeat(np.arange(2), 4)
    groups = np.array([0, 0, 1, 1, 2, 3, 4, 5])
    with pytest.raises(UserError, match="'cat'"):
        split_indices(labels, (0.15, 0.15), seed=0, groups=groups, class_names=["cat", "dog"])
