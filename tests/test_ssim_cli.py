"""ssim.py as a user runs it: moves, reports, restore, delete, dry run and one-line errors."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import REPO

SCRIPT = REPO / "ssim.py"


def run_ssim(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True, text=True, cwd=REPO, timeout=timeout,
    )


def texture(seed: int, size: int = 64) -> np.ndarray:
    """Return smooth random RGB blobs: distinct seeds give SSIM far below 0.95."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def save(rgb: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Map every file under ``folder`` to the SHA-256 of its bytes."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


JUNK = ["Thumbs.db", ".DS_Store", "._a.png", "notes.txt"]


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Two classes with one exact copy and one brighter copy, junk files and a broken photo."""
    root = tmp_path / "granja"
    save(texture(1), root / "rex" / "a.png")
    save(texture(2), root / "rex" / "b.png")
    save(texture(1), root / "rex" / "c_copy.png")
    save(texture(3), root / "max" / "d.png")
    save(np.clip(texture(3).astype(int) * 103 // 100, 0, 255).astype(np.uint8), root / "max" / "e_bright.png")
    save(texture(4), root / "max" / "f.png")
    for name in JUNK:
        (root / "rex" / name).write_bytes(b"not a photo " + name.encode())
    (root / "max" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    return root


FLAGGED = {"rex/c_copy.png", "max/e_bright.png"}


def test_default_run_moves_flagged_photos(dataset):
    before = snapshot(dataset)
    quarantine = dataset.parent / "granja_duplicates"

    done = run_ssim("--dir", dataset, "--threshold", "0.95", "--workers", "1")

    assert done.returncode == 0, done.stderr
    after = snapshot(dataset)
    assert set(before) - set(after) == FLAGGED
    assert {k: v for k, v in before.items() if k not in FLAGGED} == after
    quarantined = snapshot(quarantine)
    for photo in FLAGGED:
        assert quarantined[photo] == before[photo]
    assert "photos flagged: 2" in done.stdout
    assert "max/broken.jpg" in done.stdout
    for name in JUNK:
        assert f"rex/{name}" in done.stdout


def test_reports_list_each_flagged_photo(dataset):
    run_ssim("--dir", dataset, "--threshold", "0.95", "--workers", "1")
    quarantine = dataset.parent / "granja_duplicates"

    text = (quarantine / "ssim_report.json").read_text()
    report = json.loads(text)
    rows = (quarantine / "ssim_report.csv").read_text().splitlines()

    assert text == json.dumps(report, indent=2, sort_keys=True) + "\n"
    assert {(r["photo"], r["kept"]) for r in report["flagged"]} == {
        ("rex/c_copy.png", "rex/a.png"), ("max/e_bright.png", "max/d.png")}
    assert all(r["ssim"] > 0.95 and r["ssim"] == round(r["ssim"], 6) for r in report["flagged"])
    assert report["dir"] == str(dataset.resolve())
    assert report["threshold"] == 0.95
    assert report["scope"] == "folder"
    assert report["size"] == 224
    assert report["photos_scanned"] == 7
    assert report["photos_flagged"] == 2
    assert report["pairs_compared"] + report["pairs_skipped"] == 3 + 3  # broken.jpg is in no pair
    assert rows[0] == "photo,kept,ssim"
    assert sorted(row.split(",")[0] for row in rows[1:]) == sorted(FLAGGED)


def test_restore_brings_back_every_file(dataset):
    before = snapshot(dataset)
    quarantine = dataset.parent / "granja_duplicates"
    run_ssim("--dir", dataset, "--threshold", "0.95", "--workers", "1")

    done = run_ssim("--restore", quarantine)

    assert done.returncode == 0, done.stderr
    assert snapshot(dataset) == before
    assert "photos restored: 2" in done.stdout
    assert sorted(p.name for p in quarantine.iterdir()) == ["ssim_report.csv", "ssim_report.json"]


def test_restore_into_given_dir(dataset, tmp_path):
    quarantine = tmp_path / "held"
    run_ssim("--dir", dataset, "--threshold", "0.95", "--workers", "1", "--quarantine", quarantine)
    (quarantine / "ssim_report.json").unlink()

    missing = run_ssim("--restore", quarantine)
    done = run_ssim("--restore", quarantine, "--dir", dataset)

    assert missing.returncode == 2
    assert "--dir" in missing.stderr
    assert done.returncode == 0, done.stderr
    assert (dataset / "rex" / "c_copy.png").is_file()


def test_dry_run_changes_nothing(dataset):
    before = snapshot(dataset.parent)

    done = run_ssim("--dir", dataset, "--threshold", "0.95", "--workers", "1", "--dry-run")

    assert done.returncode == 0, done.stderr
    assert snapshot(dataset.parent) == before
    assert not (dataset.parent / "granja_duplicates").exists()
    assert "rex/c_copy.png\tduplicate of\trex/a.png" in done.stdout


def test_delete_removes_only_flagged(dataset):
    before = snapshot(dataset)

    done = run_ssim("--dir", dataset, "--threshold", "0.95", "--workers", "1", "--delete")

    assert done.returncode == 0, done.stderr
    after = snapshot(dataset)
    assert set(before) - set(after) == FLAGGED
    assert {k: v for k, v in before.items() if k not in FLAGGED} == after
    quarantine = dataset.parent / "granja_duplicates"
    assert sorted(p.name for p in quarantine.iterdir()) == ["ssim_report.csv", "ssim_report.json"]


def test_scope_tree_compares_across_folders(dataset):
    save(texture(2), dataset / "max" / "b_again.png")

    folder = run_ssim("--dir", dataset, "--threshold", "0.95", "--workers", "1", "--dry-run")
    tree = run_ssim("--dir", dataset, "--threshold", "0.95", "--workers", "1", "--dry-run", "--scope", "tree")

    assert "b_again" not in folder.stdout
    assert "rex/b.png\tduplicate of\tmax/b_again.png" in tree.stdout  # "max" comes first in path order
    assert "photos flagged: 3" in tree.stdout


def test_several_workers_give_the_same_report(dataset):
    for k in range(40):  # enough photos for the search to start worker processes
        save(texture(100 + k, size=32), dataset / "extra" / f"{k:02d}.png")
    save(texture(100, size=32), dataset / "extra" / "zz_copy.png")

    serial = run_ssim("--dir", dataset, "--threshold", "0.95", "--workers", "1", "--dry-run", "--scope", "tree")
    parallel = run_ssim("--dir", dataset, "--threshold", "0.95", "--workers", "2", "--dry-run", "--scope", "tree")

    assert serial.returncode == 0, serial.stderr
    assert parallel.returncode == 0, parallel.stderr
    flagged_serial = [line for line in serial.stdout.splitlines() if "duplicate of" in line]
    assert flagged_serial == [line for line in parallel.stdout.splitlines() if "duplicate of" in line]
    assert "extra/zz_copy.png\tduplicate of\textra/00.png" in serial.stdout


def test_move_never_overwrites(dataset):
    quarantine = dataset.parent / "granja_duplicates"
    occupied = save(texture(9), quarantine / "rex" / "c_copy.png")
    occupied_bytes = occupied.read_bytes()
    before = snapshot(dataset)

    done = run_ssim("--dir", dataset, "--threshold", "0.95", "--workers", "1")

    assert done.returncode == 2
    assert "already exists" in done.stderr
    assert occupied.read_bytes() == occupied_bytes
    assert snapshot(dataset) == before
    assert not (quarantine / "ssim_report.json").exists()


def test_restore_never_overwrites(dataset):
    quarantine = dataset.parent / "granja_duplicates"
    run_ssim("--dir", dataset, "--threshold", "0.95", "--workers", "1")
    save(texture(9), dataset / "rex" / "c_copy.png")
    replaced = (dataset / "rex" / "c_copy.png").read_bytes()

    done = run_ssim("--restore", quarantine)

    assert done.returncode == 2
    assert "already exists" in done.stderr
    assert (dataset / "rex" / "c_copy.png").read_bytes() == replaced
    assert (quarantine / "max" / "e_bright.png").is_file()


def test_quarantine_from_another_dir_is_rejected(dataset, tmp_path):
    other = tmp_path / "other"
    save(texture(5), other / "x" / "p.png")
    save(texture(5), other / "x" / "q.png")
    quarantine = tmp_path / "shared_quarantine"
    run_ssim("--dir", other, "--threshold", "0.95", "--workers", "1", "--quarantine", quarantine)

    done = run_ssim("--dir", dataset, "--threshold", "0.95", "--workers", "1", "--quarantine", quarantine)

    assert done.returncode == 2
    assert "another --quarantine" in done.stderr


def error_cases(dataset: Path) -> dict[str, list[str | Path]]:
    empty = dataset.parent / "empty"
    empty.mkdir()
    junk_only = dataset.parent / "junk_only"
    junk_only.mkdir()
    (junk_only / "Thumbs.db").write_bytes(b"x")
    return {
        "threshold above 1": ["--dir", dataset, "--threshold", "1.5"],
        "threshold below 0": ["--dir", dataset, "--threshold", "-0.1"],
        "threshold not a number": ["--dir", dataset, "--threshold", "high"],
        "threshold missing": ["--dir", dataset],
        "dir missing": ["--dir", dataset.parent / "nowhere", "--threshold", "0.9"],
        "dir is a file": ["--dir", dataset / "rex" / "a.png", "--threshold", "0.9"],
        "dir empty": ["--dir", empty, "--threshold", "0.9"],
        "dir holds only junk": ["--dir", junk_only, "--threshold", "0.9"],
        "dir inside quarantine": ["--dir", dataset / "rex", "--threshold", "0.9", "--quarantine", dataset],
        "quarantine inside dir": ["--dir", dataset, "--threshold", "0.9", "--quarantine", dataset / "dups"],
        "size below window": ["--dir", dataset, "--threshold", "0.9", "--size", "5"],
        "delete with dry run": ["--dir", dataset, "--threshold", "0.9", "--delete", "--dry-run"],
        "restore missing": ["--restore", dataset.parent / "nowhere"],
    }


@pytest.mark.parametrize("case", [
    "threshold above 1", "threshold below 0", "threshold not a number", "threshold missing", "dir missing",
    "dir is a file", "dir empty", "dir holds only junk", "dir inside quarantine", "quarantine inside dir",
    "size below window", "delete with dry run", "restore missing",
])
def test_bad_input_gives_one_line_error(dataset, case):
    args = error_cases(dataset)[case]
    before = snapshot(dataset.parent)

    done = run_ssim(*args)

    assert done.returncode == 2
    assert done.stderr.startswith("error: ")
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == ""
    assert snapshot(dataset.parent) == before
    assert not (dataset.parent / "granja_duplicates").exists()


def test_help_shows_every_flag():
    done = run_ssim("--help")

    assert done.returncode == 0
    for flag in ("--dir", "--threshold", "--size", "--scope", "--quarantine", "--dry-run", "--delete",
                 "--restore", "--workers", "--debug"):
        assert flag in done.stdout


def test_accented_names_move_and_restore(tmp_path):
    root = tmp_path / "granja"
    save(texture(7), root / "Peluchín" / "ñandú.jpg")
    save(texture(7), root / "Peluchín" / "ñandú copia.jpg")
    save(texture(8), root / "Perrete 2" / "otro.jpg")
    before = snapshot(root)

    result = run_ssim("--dir", root, "--threshold", "0.95", "--workers", "1")

    assert result.returncode == 0, result.stderr
    quarantine = tmp_path / "granja_duplicates"
    # "ñandú copia.jpg" sorts before "ñandú.jpg" (a space before a dot), so it is the one kept.
    assert (quarantine / "Peluchín" / "ñandú.jpg").is_file()
    assert (root / "Peluchín" / "ñandú copia.jpg").is_file()
    report = json.loads(next(quarantine.glob("*.json")).read_text(encoding="utf-8"))
    assert "Peluchín/ñandú.jpg" in json.dumps(report, ensure_ascii=False)

    restored = run_ssim("--restore", quarantine)
    assert restored.returncode == 0, restored.stderr
    assert snapshot(root) == before
