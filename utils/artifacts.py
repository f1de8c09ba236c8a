"""The files a trained granja keeps in ``models/<granja>/``, written atomically and read back checked.

- ``model.keras``: the full network, RGB photo in, class probabilities out.
- ``labels.json``: class name -> index, as the original project wrote it.
- ``training.json``: backbone, weights, input size, preprocessing, pooling, class names in index
  order, split sizes, hyper-parameters, metrics and library versions, with a format version.
- ``split.json``: which photo went to train, validation and test.
- ``inference.pb``: the same network frozen into a TensorFlow graph, which loads faster than
  ``model.keras``; ``training.json`` records the SHA-256 of both files, and ``load_scorer``
  falls back to ``model.keras`` when they no longer match.
- ``open_set.npz``: the class means and covariances that unknown-animal detection compares photos
  with, and the identity projection when training had a background set; its score and
  thresholds are in ``training.json`` under ``open_set``.
- ``gallery.json``: animals enrolled with ``testing.py --enroll``, kept when the granja is retrained.

A training run writes all but the gallery into a staging folder and then swaps whole folders, so a crash
leaves either the previous set or the new one, never a mix.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.errors import UserError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
LABELS_FILE = "labels.json"
TRAINING_FILE = "training.json"
SPLIT_FILE = "split.json"
INFERENCE_FILE = "inference.pb"
OPEN_SET_FILE = "open_set.npz"
GALLERY_FILE = "gallery.json"
CACHE_FOLDER = "cache"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp creates the file readable by its owner only; give it the permissions open() would.
    os.chmod(temp, 0o666 & ~_umask())
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any, *, sort_keys: bool = True) -> None:
    """Write indented UTF-8 JSON atomically; names with accents stay readable (no ASCII escapes)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def save_model_atomic(model, path: Path) -> None:
    """Save a Keras model to a temporary ``.keras`` file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".keras", dir=path.parent)
    os.close(handle)
    os.chmod(temp, 0o666 & ~_umask())
    try:
        model.save(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def granja_folder(models_dir: Path, granja: str) -> Path:
    """Return ``models/<granja>/``, restoring the previous set if a swap was cut short."""
    folder = models_dir / granja
    previous = _previous_folder(folder)
    if not folder.exists() and previous.exists():
        logger.warning("restoring %s from %s, left by an interrupted save", folder, previous)
        os.replace(previous, folder)
    return folder


def _previous_folder(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.previous")


def staging_folder(models_dir: Path, granja: str) -> Path:
    """Create an empty staging folder for a new set of files, beside ``models/<granja>/``."""
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = models_dir / f".{granja}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def publish(staging: Path, folder: Path) -> None:
    """Replace ``folder`` by ``staging`` with two renames; the feature cache and gallery move along.

    A crash between the two renames leaves only ``.<granja>.previous``, which ``granja_folder``
    renames back, so readers always find a complete set.
    """
    if not folder.exists():
        os.replace(staging, folder)
        return
    for kept in (CACHE_FOLDER, GALLERY_FILE):
        if (folder / kept).exists() and not (staging / kept).exists():
            os.replace(folder / kept, staging / kept)
    previous = _previous_folder(folder)
    if previous.exists():
        shutil.rmtree(previous)
    os.replace(folder, previous)
    os.replace(staging, folder)
    shutil.rmtree(previous)


@contextmanager
def granja_lock(models_dir: Path, granja: str):
    """Hold an exclusive lock on a granja's model folder for the duration of a training run.

    Raises:
        UserError: another process holds the lock.
    """
    from filelock import FileLock, Timeout

    models_dir.mkdir(parents=True, exist_ok=True)
    lock_path = models_dir / f".{granja}.lock"
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"another training of granja {granja!r} is running (lock {lock_path} is held); "
                        "wait for it to finish") from None
    try:
        yield
    finally:
        lock.release()


@dataclass
class TrainedGranja:
    """A trained granja read back from ``models/<granja>/``."""

    folder: Path
    metadata: dict
    class_names: list[str]
    model: Any = None
    _model_sha256: str | None = field(default=None, init=False, repr=False)

    @property
    def input_size(self) -> int:
        return int(self.metadata["input_size"])

    def model_sha256(self) -> str:
        """Return the SHA-256 of ``model.keras``, read once for the graph and calibration checks."""
        if self._model_sha256 is None:
            from utils.inference import file_sha256

            self._model_sha256 = file_sha256(self.folder / MODEL_FILE)
        return self._model_sha256


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file, raising UserError naming it when it is missing or broken."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}; train the granja first with training.py") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{what} {path} is not valid JSON ({err}); retrain the granja") from err


def load_trained(models_dir: Path, granja: str, *, load_model: bool = True) -> TrainedGranja:
    """Read a trained granja and check that its files agree with each other.

    Raises:
        UserError: a file is missing or broken, or the files disagree (class count, format version).
    """
    folder = granja_folder(models_dir, granja)
    if not folder.is_dir():
        raise UserError(f"no trained model for granja {granja!r}: {folder} not found; train it with "
                        f"'python training.py -ng {granja}' or pass --models-dir")
    metadata = read_json(folder / TRAINING_FILE, "training record")
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{folder / TRAINING_FILE} has format version {version!r}, but this version of the "
                        f"suite reads version {FORMAT_VERSION}; retrain the granja")
    class_names = list(metadata["class_names"])
    labels = read_json(folder / LABELS_FILE, "labels file")
    if sorted(labels, key=labels.get) != class_names:
        raise UserError(f"{folder / LABELS_FILE} lists {len(labels)} classes but {folder / TRAINING_FILE} "
                        f"lists {len(class_names)} in another order or with other names; retrain the granja")
    trained = TrainedGranja(folder=folder, metadata=metadata, class_names=class_names)

    if load_model:
        trained.model = load_checked_model(trained)
    return trained


def load_checked_model(trained: TrainedGranja):
    """Load ``model.keras`` and check it against ``training.json`` and ``labels.json``."""
    folder, metadata, class_names = trained.folder, trained.metadata, trained.class_names
    model = load_keras_model(folder / MODEL_FILE)
    layer_names = [layer.name for layer in model.layers]
    expected = metadata.get("backbone_layer")
    if expected not in layer_names:
        nested = [layer.name for layer in model.layers if hasattr(layer, "layers")]
        raise UserError(f"{folder / TRAINING_FILE} names backbone {metadata.get('backbone')!r} (layer "
                        f"{expected!r}) but {folder / MODEL_FILE} holds {', '.join(nested) or 'another network'}; "
                        "retrain the granja or restore its files together")
    outputs = model.output_shape[-1]
    if outputs != len(class_names):
        raise UserError(f"{folder / MODEL_FILE} scores {outputs} classes but {folder / LABELS_FILE} "
                        f"lists {len(class_names)}; retrain the granja or restore its files together")
    return model


def write_inference_graph(model, folder: Path, backbone_layer: str) -> dict:
    """Freeze ``model`` (already saved as ``folder/model.keras``) into ``folder/inference.pb``.

    Returns the record that ``training.json`` keeps under ``inference_graph``.
    """
    from utils.inference import file_sha256, freeze_graph

    graph_bytes, signature = freeze_graph(model)
    atomic_write_bytes(folder / INFERENCE_FILE, graph_bytes)
    return {"file": INFERENCE_FILE, "sha256": hashlib.sha256(graph_bytes).hexdigest(),
            "model_sha256": file_sha256(folder / MODEL_FILE), "classes": int(model.output_shape[-1]),
            "backbone_layer": backbone_layer, **signature}


def load_scorer(trained: TrainedGranja, batch_size: int = 32):
    """Return a callable that scores photos: the frozen graph when it matches ``model.keras``.

    Without a matching graph (a model trained before graphs were written, or a ``model.keras``
    replaced by hand) the scorer loads ``model.keras`` itself, with a warning when a graph exists.
    """
    from utils.inference import OUTPUT_NAMES, GraphScorer, KerasScorer

    folder = trained.folder
    record = trained.metadata.get("inference_graph")
    graph_path = folder / INFERENCE_FILE
    model_path = folder / MODEL_FILE
    if record and graph_path.is_file() and model_path.is_file():
        graph_bytes = graph_path.read_bytes()
        same_files = (hashlib.sha256(graph_bytes).hexdigest() == record.get("sha256")
                      and trained.model_sha256() == record.get("model_sha256"))
        # When training.json or labels.json disagree with the frozen network, loading model.keras
        # below raises the error that names both sides.
        if (same_files and record.get("classes") == len(trained.class_names)
                and set(OUTPUT_NAMES) <= set(record.get("outputs", {}))
                and record.get("backbone_layer") == trained.metadata.get("backbone_layer")):
            return GraphScorer(graph_bytes, record, batch_size=batch_size)
        if not same_files:
            logger.warning("%s does not match %s (one of them changed after training); scoring with %s, "
                           "which loads more slowly", graph_path, model_path, model_path.name)
    trained.model = trained.model or load_checked_model(trained)
    return KerasScorer(trained.model, batch_size=batch_size)


def load_keras_model(path: Path):
    """Load a saved ``.keras`` model without compiling it (inference needs no optimizer)."""
    import keras

    # Importing this registers the Preprocess layer that every saved model starts with.
    import utils.preprocessing  # noqa: F401

    if not path.is_file():
        raise UserError(f"model file not found: {path}; train the granja first with training.py")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a .keras model file (damaged or cut short); retrain the granja or restore "
                        "the file")
    try:
        return keras.models.load_model(path, compile=False)
    except (ValueError, OSError, KeyError, TypeError) as err:
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"cannot load the model {path} ({reason}); retrain the granja") from err


def write_open_set_arrays(folder: Path, class_model) -> None:
    """Write the class means, covariances and identity projection of unknown-animal detection to ``open_set.npz``."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **{name: array.astype(np.float32) for name, array in class_model.arrays().items()})
    atomic_write_bytes(folder / OPEN_SET_FILE, buffer.getvalue())


@dataclass
class OpenSet:
    """Data of a trained granja for unknown-animal detection and enrolment."""

    class_model: Any
    calibration: Any
    embedding_key: str
    enrolled: dict  # name -> mean embedding, only those enrolled under this embedding_key
    stale: list[str]  # enrolled names whose embeddings came from another backbone or weights


def load_open_set(trained: TrainedGranja) -> OpenSet | None:
    """Read the calibration, class model and gallery; None for a granja trained without them."""
    import numpy as np

    from utils.open_set import Calibration, ClassModel

    record = trained.metadata.get("open_set")
    path = trained.folder / OPEN_SET_FILE
    if not record or not path.is_file():
        logger.warning("%s has no unknown-animal calibration (trained by an older version); every photo is named "
                       "as its best class; retrain the granja to calibrate one", trained.folder)
        return None
    calibrated_for = trained.metadata.get("inference_graph", {}).get("model_sha256")
    if calibrated_for != trained.model_sha256():
        logger.warning("%s was calibrated for another %s (the model file changed after training); every photo is "
                       "named as its best class; retrain the granja to calibrate again", path, MODEL_FILE)
        return None
    try:
        with np.load(path) as arrays:
            class_model = ClassModel.from_arrays(arrays)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read {path} ({err}); retrain the granja") from err
    calibration = Calibration.from_dict(record)
    if calibration.score.startswith("identity") and not class_model.has_identity:
        raise UserError(f"{path} lacks the identity projection that training.json's {calibration.score} score "
                        "needs; retrain the granja or restore its files together")
    if len(class_model.embedding_means) != len(trained.class_names):
        raise UserError(f"{path} contains {len(class_model.embedding_means)} class means but {trained.folder / LABELS_FILE} "
                        f"lists {len(trained.class_names)} classes; retrain the granja or restore its files together")
    gallery = read_gallery(trained.folder)
    key = record["embedding_key"]
    enrolled = {name: np.asarray(entry["mean"], dtype=np.float64) for name, entry in gallery.items()
                if entry.get("embedding_key") == key}
    stale = sorted(name for name, entry in gallery.items() if entry.get("embedding_key") != key)
    return OpenSet(class_model=class_model, calibration=calibration, embedding_key=key,
                   enrolled=enrolled, stale=stale)


def read_gallery(folder: Path) -> dict:
    """Read the enrolled animals of ``folder/gallery.json`` as name -> entry (empty without a gallery)."""
    path = folder / GALLERY_FILE
    if not path.is_file():
        return {}
    return read_json(path, "gallery of enrolled animals").get("animals", {})


def write_gallery(folder: Path, animals: dict) -> None:
    """Write the enrolled animals atomically."""
    atomic_write_json(folder / GALLERY_FILE, {"format_version": 1, "animals": animals})
