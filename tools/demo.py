#!/usr/bin/env python3
"""Train a demo granja of real dog faces, print its report and score one photo.

Data, in order of preference: --data (a granja folder, one sub-folder of photos per dog), a
demo granja prepared by an earlier run, or the public DogFaceNet aligned face set (CC BY 4.0),
downloaded once and checked. Weights: --weights (a local MobileNetV2 weights file) or Keras's
ImageNet download. Offline with neither, it stops and says which flag to pass.
"""

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils import cli  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.images import UnreadableImageError, is_photo_name, load_rgb  # noqa: E402

logger = logging.getLogger("demo")

DOGFACENET_URL = "https://github.com/GuillaumeMougeot/DogFaceNet/releases/download/dataset/DogFaceNet_Dataset_224_1.zip"
DEMO_GRANJA = "dogs_demo"
# The demo keeps the first dogs (by folder name) with at least this many photos.
DEMO_DOGS = 42
DEMO_MIN_PHOTOS = 8


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="", help="a granja folder to train on (default: download the demo set)")
    parser.add_argument("--weights", default="", help="a local MobileNetV2 weights file (default: ImageNet download)")
    parser.add_argument("--epochs", type=cli.positive_int, default=20, help="maximum number of epochs")
    parser.add_argument("--work-dir", type=Path, default=REPO / ".demo",
                        help="folder for the downloaded set, the models and the logs")
    cli.add_debug_flag(parser)
    return parser


def download(url: str, target: Path) -> None:
    """Download ``url`` to ``target`` through a temporary file, renamed only when complete."""
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=30) as response:
            expected = int(response.headers.get("Content-Length") or 0)
            with tqdm(total=expected or None, unit="B", unit_scale=True, desc=target.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        size = Path(temp).stat().st_size
        if expected and size != expected:
            raise UserError(f"download of {url} stopped at {size} of {expected} bytes; run the demo again")
        os.replace(temp, target)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        raise UserError(
            f"cannot download the demo photos from {url} ({err}); offline, pass a granja folder and a weights "
            "file, for example: make demo DATA=../shared/data/granjas/dogs42 "
            "WEIGHTS=../shared/weights/mobilenet_v2_dogbreeds_notop.weights.h5"
        ) from err
    finally:
        Path(temp).unlink(missing_ok=True)


def prepare_demo_granja(work_dir: Path) -> Path:
    """Download, check and unpack DogFaceNet, then copy a subset of dogs into a demo granja."""
    granja = work_dir / "dataset" / DEMO_GRANJA
    if granja.is_dir() and any(granja.iterdir()):
        logger.info("using the demo granja prepared earlier: %s", granja)
        return granja

    archive = work_dir / Path(DOGFACENET_URL).name
    if not archive.exists():
        logger.info("downloading the DogFaceNet aligned face set (CC BY 4.0)")
        download(DOGFACENET_URL, archive)
    try:
        with zipfile.ZipFile(archive) as bundle:
            broken = bundle.testzip()
            if broken is not None:
                raise UserError(f"{archive} is damaged at {broken}; delete it and run the demo again")
            unpacked = work_dir / "dogfacenet"
            if not unpacked.exists():
                bundle.extractall(unpacked)
    except zipfile.BadZipFile as err:
        raise UserError(f"{archive} is not a complete zip file; delete it and run the demo again") from err

    # One folder per dog, wherever the archive nests them.
    dogs: dict[str, list[Path]] = {}
    for path in sorted(unpacked.rglob("*")):
        if path.is_file() and is_photo_name(path.name):
            dogs.setdefault(path.parent.name, []).append(path)
    chosen = [name for name in sorted(dogs) if len(dogs[name]) >= DEMO_MIN_PHOTOS][:DEMO_DOGS]
    if len(chosen) < 2:
        raise UserError(f"{archive} contains no dog folders with {DEMO_MIN_PHOTOS} photos; delete it and retry")

    staging = granja.with_name(granja.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for name in chosen:
        for photo in dogs[name]:
            try:
                load_rgb(photo)
            except UnreadableImageError as err:
                raise UserError(f"the downloaded set has a photo that does not decode ({err}); "
                                f"delete {archive} and run the demo again") from err
            (staging / f"dog_{name}").mkdir(parents=True, exist_ok=True)
            shutil.copy2(photo, staging / f"dog_{name}" / photo.name)
    os.replace(staging, granja)
    logger.info("demo granja ready: %d dogs in %s", len(chosen), granja)
    return granja


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.debug)

    if args.data:
        granja = Path(args.data).resolve()
        if not granja.is_dir():
            raise UserError(f"DATA folder not found: {args.data}; give a granja folder with one sub-folder per animal")
        logger.info("training on the local granja %s", granja)
    else:
        granja = prepare_demo_granja(args.work_dir)

    if args.weights:
        weights = str(Path(args.weights).resolve())
        if not Path(weights).is_file():
            raise UserError(f"WEIGHTS file not found: {args.weights}; give a MobileNetV2 .weights.h5 file")
    else:
        weights = "imagenet"
        logger.info("no WEIGHTS given: using Keras's ImageNet MobileNetV2 weights (downloaded once)")

    models_dir = args.work_dir / "models"
    logs_dir = args.work_dir / "logs"
    python = sys.executable
    command = [python, str(REPO / "training.py"), "-ng", granja.name, "--dataset-dir", str(granja.parent),
               "-m", "mobilenetv2", "--weights", weights, "-e", str(args.epochs), "--models-dir", str(models_dir),
               "--logs-dir", str(logs_dir), "--quiet"]
    logger.info("running: %s", " ".join(command))
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        return result.returncode

    photo = next(path for path in sorted(granja.rglob("*")) if path.is_file() and is_photo_name(path.name))
    command = [python, str(REPO / "testing.py"), "-ng", granja.name, "--models-dir", str(models_dir),
               "--img", str(photo), "--top-k", "5"]
    logger.info("scoring %s (true class %s): %s", photo.name, photo.parent.name, " ".join(command))
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(cli.run(main))
