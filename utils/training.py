"""One training run: photos to split, backbone and head, fit, test reports and saved files."""

import csv
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import keras
import numpy as np

from utils import artifacts, reports
from utils.augment import AugmentConfig
from utils.data import SPLIT_NAMES, GranjaScan, check_class_sizes, decode_photos, scan_granja, split_indices
from utils.errors import UserError

logger = logging.getLogger(__name__)

# Views of each training photo on the cached-feature path (the photo itself and two augmented
# copies); one is drawn per photo and epoch. Chosen by bench/bench_train.py on dogs42: see
# docs/benchmarks.md for the speed and accuracy of 2, 3 and 4 views.
DEFAULT_VIEWS = 3

# Background animals needed for the identity space: a fifth of them are held out, so five leave
# one held out and four to learn from.
MIN_BACKGROUND_ANIMALS = 5
# Held-out background photos below which the score choice and enrolment threshold are called rough.
STEADY_HELD_OUT_PHOTOS = 100

# Background photos decoded and embedded at a time (about 150 MB of 224x224 pixels).
BACKGROUND_CHUNK = 1024


@dataclass
class TrainOptions:
    """Every setting of a training run; ``training.json`` records all of them."""

    granja: str
    model: str
    dataset_dir: Path = Path("dataset")
    models_dir: Path = Path("models")
    logs_dir: Path = Path("logs")
    weights: str | None = None
    include_top: bool = False
    input_size: int = 224
    pooling: str | None = None
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    patience: int = 5
    hidden: tuple[int, ...] = (512, 256, 128)
    dropout: float = 0.0
    freeze: int | None = -4
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 42
    min_images: int | None = None
    dedup_threshold: float | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache: bool = True
    cache_dir: Path | None = None  # None: models/<granja>/cache/
    strategy: str = "none"
    resume: bool = False
    views: int = DEFAULT_VIEWS
    accept_rate: float = 0.95
    unknown_dir: Path | None = None
    background_dir: Path | None = None
    verbose: int = 1


@dataclass
class PreparedData:
    """Decoded photos of the kept classes, with their split."""

    images: np.ndarray
    labels: np.ndarray
    paths: list[Path]
    class_names: list[str]
    split: dict[str, list[int]]
    skipped: list[tuple[Path, str]]
    ignored: int
    dedup_groups: int | None = None


def prepare_data(options: TrainOptions, scan: GranjaScan | None = None,
                 fixed_split: dict | None = None) -> PreparedData:
    """List, decode and split the granja's photos; every check here runs before the first epoch.

    ``fixed_split`` (a ``split.json`` record, relative paths per split) replaces the computed split,
    so a resumed run trains and tests on exactly the photos it started with.
    """
    root = options.dataset_dir / options.granja
    scan = scan or scan_granja(root)
    ignored = len(scan.junk) + len(scan.other_files)
    if ignored:
        examples = ", ".join(str(path.relative_to(root)) for path in [*scan.junk, *scan.other_files][:3])
        logger.info("ignored %d files and folders that are not photos (for example %s)", ignored, examples)

    all_paths = [path for name in scan.classes for path in scan.photos[name]]
    logger.info("decoding %d photos from %d class folders in %s", len(all_paths), len(scan.classes), root)
    images, kept, failed = decode_photos(all_paths, options.input_size)
    for path, reason in failed:
        logger.warning("skipping a photo that does not decode: %s", reason)
    if failed:
        logger.warning("skipped %d photos that do not decode", len(failed))

    # Class sizes are checked on photos that decoded, so broken files cannot hide a too-small class.
    decoded_paths = [all_paths[index] for index in kept]
    by_class: dict[str, list[Path]] = {name: [] for name in scan.classes}
    class_of = {path: name for name in scan.classes for path in scan.photos[name]}
    for path in decoded_paths:
        by_class[class_of[path]].append(path)
    kept_classes = check_class_sizes(by_class, options.min_images)
    class_names = sorted(kept_classes)
    index_of_class = {name: index for index, name in enumerate(class_names)}
    selected = [position for position, path in enumerate(decoded_paths) if class_of[path] in index_of_class]
    paths = [decoded_paths[position] for position in selected]
    labels = np.array([index_of_class[class_of[path]] for path in paths], dtype=np.int64)
    images = images[selected]

    groups = None
    dedup_groups = None
    if fixed_split is not None:
        split = _fixed_split(fixed_split, paths, root)
    elif scan.preset is not None:
        split = _preset_split(scan.preset, paths, class_names)
        if options.dedup_threshold is not None:
            logger.warning("--dedup-threshold is ignored: %s has its own train/val/test folders", root)
    else:
        if options.dedup_threshold is not None:
            groups = _near_duplicate_groups(paths, labels, options.dedup_threshold)
            dedup_groups = int(len(np.unique(groups)))
            logger.info("grouped %d photos into %d groups of near-duplicates (SSIM > %s)",
                        len(paths), dedup_groups, options.dedup_threshold)
        split = split_indices(labels, (options.val_fraction, options.test_fraction), options.seed,
                              groups=groups, class_names=class_names)
    sizes = ", ".join(f"{name} {len(split[name])}" for name in SPLIT_NAMES)
    logger.info("%d classes, %d photos: %s", len(class_names), len(paths), sizes)
    return PreparedData(images=images, labels=labels, paths=paths, class_names=class_names, split=split,
                        skipped=failed, ignored=ignored, dedup_groups=dedup_groups)


def _fixed_split(record: dict, paths: list[Path], root: Path) -> dict[str, list[int]]:
    """Map a saved split's relative paths to photo indices; every photo must still be there."""
    position = {path.relative_to(root).as_posix(): index for index, path in enumerate(paths)}
    split = {}
    for name in SPLIT_NAMES:
        missing = [relative for relative in record[name] if relative not in position]
        if missing:
            raise UserError(f"{len(missing)} photos of the interrupted run's {name} split are gone or no longer "
                            f"decode (for example {missing[0]!r}); start a new run without --resume")
        split[name] = sorted(position[relative] for relative in record[name])
    return split


def _preset_split(preset: dict[str, dict[str, list[Path]]], paths: list[Path],
                  class_names: list[str]) -> dict[str, list[int]]:
    """Map the photos of given train/val/test folders to indices, checking each split has every class."""
    position = {path: index for index, path in enumerate(paths)}
    split = {}
    for name in SPLIT_NAMES:
        split[name] = sorted(position[path] for photos in preset[name].values() for path in photos
                             if path in position)
        missing = [cls for cls in class_names if not any(path in position for path in preset[name].get(cls, []))]
        if missing:
            raise UserError(f"the {name} folder has no photos of {len(missing)} classes "
                            f"({', '.join(repr(cls) for cls in missing[:5])}); every class needs photos in "
                            "train, val and test, or remove those folders to let training.py split")
    return split


def _near_duplicate_groups(paths: list[Path], labels: np.ndarray, threshold: float) -> np.ndarray:
    """Group near-duplicate photos within each class by SSIM; returns one group id per photo."""
    from utils.dedup import group_near_duplicates

    groups = np.empty(len(paths), dtype=np.int64)
    offset = 0
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        local = np.asarray(group_near_duplicates([paths[index] for index in members], threshold))
        groups[members] = local + offset
        offset += int(local.max()) + 1
    return groups


def make_run_folder(options: TrainOptions) -> Path:
    """Create ``logs/<granja>/<YYYYmmdd-HHMMSS>/``, adding a suffix if that second is taken."""
    base = options.logs_dir / options.granja
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = base / stamp
    suffix = 1
    while folder.exists():
        folder = base / f"{stamp}-{suffix}"
        suffix += 1
    folder.mkdir(parents=True)
    return folder


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape a trained model."""
    import keras
    import sklearn
    import tensorflow as tf

    return {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__}


def options_record(options: TrainOptions) -> dict:
    """Return the options as plain JSON types."""
    record = asdict(options)
    for key, value in record.items():
        if isinstance(value, Path):
            record[key] = str(value)
        elif isinstance(value, tuple):
            record[key] = list(value)
    record["augment"] = options.augment.to_dict()
    return record


class SaveBestModel(keras.callbacks.Callback):
    """Save a given model atomically whenever val_loss reaches a new minimum.

    Keras's ModelCheckpoint saves the model being fitted; on the cached-feature path that is only
    the head, while the checkpoint must hold the full network.
    """

    def __init__(self, model_to_save: keras.Model, path: Path):
        super().__init__()
        self.model_to_save = model_to_save
        self.path = path
        self.best = float("inf")

    def on_train_begin(self, logs=None):
        self.best = float("inf")

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("val_loss")
        if loss is not None and loss < self.best:
            self.best = loss
            artifacts.save_model_atomic(self.model_to_save, self.path)


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that writes its files under temporary names and renames them.

    Keras writes the backup weights in place, so Ctrl-C during that write left a file that
    ``--resume`` could not load.
    """

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        temporary = f"{self._weights_path}.partial.weights.h5"
        self.model.save_weights(temporary, overwrite=True)
        os.replace(temporary, self._weights_path)
        artifacts.atomic_write_json(Path(self._training_metadata_path),
                                    {"epoch": self._current_epoch, "batch": self._last_batch_seen})

    def on_train_begin(self, logs=None):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                super().on_train_begin(logs)
        except (OSError, ValueError) as err:
            reason = " ".join(str(err).split())[:160]
            raise UserError(f"the backup in {self.backup_dir} cannot be loaded ({reason}); start a new run "
                            "without --resume") from err


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose progress (best loss, epochs without improvement, best weights) survives
    an interruption: it is written to ``folder`` after every epoch and read back on ``--resume``."""

    def __init__(self, folder: Path, resume: bool, **kwargs):
        super().__init__(**kwargs)
        self.state_path = folder / "early_stopping.json"
        self.weights_path = folder / "early_stopping_best.npz"
        self.resume = resume

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if not (self.resume and self.state_path.is_file()):
            return
        state = json.loads(self.state_path.read_text(encoding="utf-8"))
        self.wait, self.best, self.best_epoch = state["wait"], state["best"], state["best_epoch"]
        if self.restore_best_weights and self.weights_path.is_file():
            with np.load(self.weights_path) as saved:
                self.best_weights = [saved[f"w{index}"] for index in range(len(saved.files))]
        logger.info("early stopping resumes at best val_loss %.4f (epoch %d), %d epochs without improvement",
                    self.best, self.best_epoch + 1, self.wait)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.best is None:
            return
        if self.best_weights is not None and self.best_epoch == epoch:
            buffer = io.BytesIO()
            np.savez(buffer, **{f"w{index}": array for index, array in enumerate(self.best_weights)})
            artifacts.atomic_write_bytes(self.weights_path, buffer.getvalue())
        artifacts.atomic_write_json(self.state_path, {"wait": self.wait, "best": float(self.best),
                                                      "best_epoch": self.best_epoch})


def _callbacks(options: TrainOptions, model, run_folder: Path, checkpoint: Path) -> list:
    # BackupAndRestore stores the fitted model and optimizer after every epoch, so --resume restarts
    # from the last completed one; it deletes its backup when fit() completes.
    backup = resume_folder(options) / "backup"
    return [
        AtomicBackupAndRestore(str(backup)),
        ResumableEarlyStopping(resume_folder(options), options.resume, monitor="val_loss",
                               patience=options.patience, restore_best_weights=True, verbose=1),
        SaveBestModel(model, checkpoint),
        keras.callbacks.TensorBoard(log_dir=str(run_folder), update_freq="batch", write_graph=True),
        keras.callbacks.CSVLogger(str(run_folder / "epochs.csv"), append=options.resume),
        keras.callbacks.TerminateOnNaN(),
    ]


def _compile(model, options: TrainOptions) -> None:
    model.compile(optimizer=keras.optimizers.Adam(options.lr), loss="categorical_crossentropy",
                  metrics=["accuracy"])


def _run_fit(model, train_data, val_data, options: TrainOptions, callbacks: list):
    """Run Keras's fit(), or under MultiWorkerMirroredStrategy the loop that replaces it."""
    if options.strategy == "multiworker":
        from utils.distributed import fit_multiworker

        return fit_multiworker(model, train_data, val_data, epochs=options.epochs, callbacks=callbacks,
                               verbose=options.verbose)
    return model.fit(train_data, validation_data=val_data, epochs=options.epochs, shuffle=False,
                     callbacks=callbacks, verbose=options.verbose)


def _fit_plain(model, data: PreparedData, options: TrainOptions, weights: str, run_folder: Path,
               checkpoint: Path, cache_key: dict):
    """Fit the whole model on augmented photos.

    Returns the history, the test probabilities, extra counts and the embeddings of every photo.
    """
    from utils.features import compute_features, split_at_head
    from utils.pipeline import make_dataset, pad_for_replicas, replica_count, training_batch

    num_classes = len(data.class_names)
    replicas = replica_count()
    train_split, val_split, test_split = (data.split[name] for name in SPLIT_NAMES)
    train_batch, drop_remainder = training_batch(len(train_split), options.batch_size, replicas)
    train_data = make_dataset(data.images[train_split], data.labels[train_split], num_classes, train_batch,
                              shuffle=True, augment=options.augment, seed=options.seed, drop_remainder=drop_remainder)
    val_split = np.asarray(val_split)[pad_for_replicas(len(val_split), replicas)]
    val_data = make_dataset(data.images[val_split], data.labels[val_split], num_classes, options.batch_size)
    _compile(model, options)
    history = _run_fit(model, train_data, val_data, options, _callbacks(options, model, run_folder, checkpoint))

    # EarlyStopping restored the best epoch's weights. One pass of the fine-tuned backbone gives the
    # embeddings of every photo (for unknown-animal detection) and, through the head, the test scores.
    extractor, head = split_at_head(model)
    embeddings = compute_features(extractor, data.images, options.batch_size)
    return history, _batched(head, embeddings[np.asarray(test_split)]), {}, embeddings


def _fit_on_features(model, data: PreparedData, options: TrainOptions, weights: str, run_folder: Path,
                     checkpoint: Path, cache_key: dict):
    """Fit only the head on cached backbone features; returns what ``_fit_plain`` returns."""
    from utils.features import (FeatureCache, cached_features, feature_dataset, photo_digest, split_at_head,
                                view_dataset, weights_identity)
    from utils.pipeline import pad_for_replicas, replica_count, training_batch

    extractor, head = split_at_head(model)
    cache_root = options.cache_dir or options.models_dir / options.granja / artifacts.CACHE_FOLDER
    cache = FeatureCache(cache_root, {**cache_key, "weights": weights_identity(weights)})
    digests = [photo_digest(path) for path in data.paths]

    num_classes = len(data.class_names)
    train_split, val_split, test_split = (data.split[name] for name in SPLIT_NAMES)
    started = time.monotonic()
    augment = options.augment if options.augment.enabled else None
    views = options.views if augment is not None else 1

    def features(indices, **kwargs):
        return cached_features(cache, [digests[index] for index in indices], extractor, data.images[indices],
                               options.batch_size, **kwargs)

    # Clean features of every photo come from one pass. The unaugmented photo is also a training
    # view, because test photos are scored unaugmented and it costs no more than an augmented view.
    every_photo = np.arange(len(data.paths))
    clean = features(every_photo)
    train_features = clean[train_split][:, None, :]
    if augment is not None and views > 1:
        augmented = features(train_split, augment=augment, views=views - 1, seed=options.seed)
        train_features = np.concatenate([train_features, augmented], axis=1)
    val_features = clean[val_split]
    test_features = clean[test_split]
    logger.info("backbone features: %d entries read from the cache, %d computed, in %.1f s (%s)",
                cache.hits, cache.misses, time.monotonic() - started, cache.folder)

    replicas = replica_count()
    train_batch, drop_remainder = training_batch(len(train_split), options.batch_size, replicas)
    train_data = view_dataset(train_features, data.labels[train_split], num_classes, train_batch,
                              seed=options.seed, drop_remainder=drop_remainder)
    val_padding = pad_for_replicas(len(val_split), replicas)
    val_data = feature_dataset(val_features[val_padding], data.labels[val_split][val_padding], num_classes,
                               options.batch_size)
    _compile(head, options)
    history = _run_fit(head, train_data, val_data, options, _callbacks(options, model, run_folder, checkpoint))
    counts = {"features_read": cache.hits, "features_computed": cache.misses}
    return history, _batched(head, test_features), counts, clean


def distribution_scope(name: str, batch_size: int):
    """Return the scope that variables are created in: a tf.distribute strategy's, or a no-op.

    ``mirrored`` replicates the model on every visible GPU, or on every logical CPU device when
    there is no GPU (tests configure several). ``multiworker`` reads the cluster from the standard
    ``TF_CONFIG`` environment variable. Every batch is split evenly across the replicas, so
    ``batch_size`` must be a multiple of their number.
    """
    import contextlib

    import tensorflow as tf

    if name == "none":
        return contextlib.nullcontext()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy = tf.distribute.MirroredStrategy(devices=[device.name for device in devices])
    elif name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise UserError("--strategy multiworker needs the TF_CONFIG environment variable describing the "
                            "cluster and this worker's task; see the README section on several machines")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        raise UserError(f"--strategy must be one of none, mirrored, multiworker (got {name!r})")
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise UserError(f"--batch-size {batch_size} does not split evenly across the {replicas} replicas of "
                        f"--strategy {name}; pass a multiple of {replicas}, for example "
                        f"{max(replicas, batch_size // replicas * replicas)}")
    logger.info("training with %s on %d replicas", type(strategy).__name__, replicas)
    return strategy.scope()


def is_chief() -> bool:
    """Return True unless TF_CONFIG names this process as a non-chief worker of a cluster."""
    try:
        config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    except json.JSONDecodeError as err:
        raise UserError(f"TF_CONFIG is not valid JSON ({err}); fix the environment variable") from err
    task = config.get("task", {})
    cluster = config.get("cluster", {})
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    return "chief" not in cluster and task.get("type") == "worker" and int(task.get("index", 0)) == 0


def worker_task() -> str:
    """This process's task in TF_CONFIG, as ``type-index`` (for example ``worker-1``)."""
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    return f"{task.get('type', 'worker')}-{int(task.get('index', 0))}"


def resume_folder(options: TrainOptions) -> Path:
    """Folder of an unfinished run's backup: options, split, and the model and optimizer state."""
    return options.models_dir / f".{options.granja}.resume"


def options_from_record(record: dict) -> TrainOptions:
    """Rebuild TrainOptions from ``options_record`` output, as saved for ``--resume``."""
    values = dict(record)
    for key in ("dataset_dir", "models_dir", "logs_dir", "cache_dir", "unknown_dir", "background_dir"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    values["hidden"] = tuple(values["hidden"])
    augment = dict(values["augment"])
    augment["zoom"] = tuple(augment["zoom"])
    augment["brightness"] = tuple(augment["brightness"])
    values["augment"] = AugmentConfig(**augment)
    return TrainOptions(**values)


def _start_or_resume(options: TrainOptions) -> tuple[TrainOptions, dict | None, Path]:
    """Return the options, the fixed split (when resuming) and the run folder of this run."""
    backup = resume_folder(options)
    if not options.resume:
        if backup.exists():
            logger.info("discarding the backup of an interrupted run in %s; pass --resume to continue one", backup)
            shutil.rmtree(backup)
        return options, None, make_run_folder(options)

    if not (backup / "options.json").is_file():
        raise UserError(f"nothing to resume for granja {options.granja!r}: {backup} not found; "
                        "start a new run without --resume")
    saved = artifacts.read_json(backup / "options.json", "resume record")
    resumed = options_from_record(saved["options"])
    resumed = replace(resumed, resume=True, models_dir=options.models_dir, verbose=options.verbose)
    logger.info("resuming the interrupted run of %s with its own flags and split (%s)", options.granja,
                saved["run_folder"])
    return resumed, artifacts.read_json(backup / "split.json", "resume split"), Path(saved["run_folder"])


def train(options: TrainOptions) -> dict:
    """Train a granja's recogniser and save its files; returns the test metrics.

    Raises:
        UserError: bad data, flags or weights, found before the first epoch.
    """
    from utils.backbones import get_spec, resolve_weights

    scratch = None
    if options.strategy == "multiworker" and not is_chief():
        # Every worker runs the same program; only the chief writes the granja's files and logs.
        # The others write theirs (and their --resume backups) to a folder of their own, removed
        # when training ends.
        scratch = options.models_dir / f".{options.granja}.{worker_task()}"
        logger.info("non-chief worker: writing models and logs under %s", scratch)
        options = replace(options, models_dir=scratch / "models", logs_dir=scratch / "logs")

    with artifacts.granja_lock(options.models_dir, options.granja):
        artifacts.granja_folder(options.models_dir, options.granja)
        options, fixed_split, run_folder = _start_or_resume(options)
        spec = get_spec(options.model)
        weights = resolve_weights(spec, options.weights)
        if options.input_size < spec.min_input_size:
            raise UserError(f"--input-size {options.input_size} is too small for {spec.name}; "
                            f"use at least {spec.min_input_size}")
        result = _train_locked(options, spec, weights, fixed_split, run_folder)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def _train_locked(options: TrainOptions, spec, weights: str, fixed_split: dict | None, run_folder: Path) -> dict:
    from utils.backbones import build_backbone
    from utils.features import head_is_only_trainable
    from utils.head import apply_freeze, build_classifier

    pooling = options.pooling or spec.default_pooling
    # Cheap checks first: the folder layout, then the weights file, then decoding every photo.
    scan = scan_granja(options.dataset_dir / options.granja)
    keras.utils.set_random_seed(options.seed)
    with distribution_scope(options.strategy, options.batch_size):
        backbone = build_backbone(spec, options.input_size, weights, include_top=options.include_top)
        data = prepare_data(options, scan, fixed_split)
        model = build_classifier(backbone, input_size=options.input_size, preprocessing=spec.preprocessing,
                                 pooling=pooling, hidden=options.hidden, dropout=options.dropout,
                                 num_classes=len(data.class_names))
        freeze = apply_freeze(model, options.freeze)
        logger.info("%d layers with weights: %d trainable, %d frozen; first trainable layer: %s",
                    freeze.trainable + freeze.frozen, freeze.trainable, freeze.frozen, freeze.first_trainable)
        staging = artifacts.staging_folder(options.models_dir, options.granja)
        record = options_record(options)
        artifacts.atomic_write_json(run_folder / "args.json", record)
        root = options.dataset_dir / options.granja
        split_record = {
            "seed": options.seed,
            "root": str(root),
            **{name: [data.paths[index].relative_to(root).as_posix() for index in data.split[name]]
               for name in SPLIT_NAMES},
        }
        backup = resume_folder(options)
        artifacts.atomic_write_json(backup / "split.json", split_record)
        artifacts.atomic_write_json(backup / "options.json", {"options": record, "run_folder": str(run_folder)})

        use_cache = options.cache and head_is_only_trainable(model)
        logger.info("training path: %s", "head on cached backbone features" if use_cache else
                    "full forward pass every epoch")
        fit = _fit_on_features if use_cache else _fit_plain
        # Everything that changes a clean photo's features; the weights file is hashed by the cache.
        cache_key = {"backbone": spec.name, "input_size": options.input_size, "include_top": options.include_top,
                     "preprocessing": spec.preprocessing, "pooling": pooling}
        started = time.monotonic()
        try:
            history, probabilities, fit_counts, embeddings = fit(model, data, options, weights, run_folder,
                                                                 staging / artifacts.MODEL_FILE, cache_key)
        except KeyboardInterrupt:
            folder = options.models_dir / options.granja
            kept = (f"the previous model in {folder} is kept" if (folder / artifacts.MODEL_FILE).exists()
                    else "no model was saved")
            models_flag = "" if options.models_dir == Path("models") else f" --models-dir {options.models_dir}"
            logger.error("training interrupted: %s; continue this run after its last completed epoch with "
                         "'python training.py -ng %s%s --resume'", kept, options.granja, models_flag)
            raise
        seconds = time.monotonic() - started

    test_split = data.split["test"]
    if not np.all(np.isfinite(probabilities)):
        raise UserError(f"training diverged: the model's scores are not finite (NaN); the previous model in "
                        f"{options.models_dir / options.granja} is kept; lower --lr (now {options.lr}) or "
                        "check the weights file")
    background = _background_embeddings(model, options, weights, cache_key if use_cache else None)
    open_set, class_model = calibrate_open_set(model, data, embeddings, probabilities, options,
                                               None if background is None else background[:2])
    if background is not None:
        open_set["background"]["skipped_photos"] = background[2]
    elif options.background_dir is not None:
        open_set["background"] = {"dir": str(options.background_dir),
                                  "ignored": "too few animals with photos that decode"}

    y_true = data.labels[test_split]
    y_pred = probabilities.argmax(axis=1)
    report = reports.classification_report(y_true, y_pred, data.class_names)
    reports.write_classification_report(report, run_folder)
    reports.write_confusion_matrix(reports.confusion_matrix(y_true, y_pred, len(data.class_names)),
                                   data.class_names, run_folder)
    epochs = _whole_run_history(history.history, run_folder, options.resume)
    reports.write_learning_curves(epochs, run_folder)

    val_losses = epochs.get("val_loss", [])
    metrics = {
        "test_accuracy": round(float(report["accuracy"]), 6),
        "test_loss": round(_cross_entropy(y_true, probabilities), 6),
        "best_epoch": int(np.argmin(val_losses)) + 1 if val_losses else None,
        "epochs_run": len(epochs.get("loss", [])),
        "best_val_loss": round(float(min(val_losses)), 6) if val_losses else None,
        "train_seconds": round(seconds, 1),
        "training_path": "cached_features" if use_cache else "plain",
        **fit_counts,
    }
    if "unknown_test" in open_set:
        metrics["open_set"] = open_set["unknown_test"]
    metadata = {
        "format_version": artifacts.FORMAT_VERSION,
        "granja": options.granja,
        "backbone": spec.name,
        "backbone_layer": backbone.name,
        "weights": weights,
        "include_top": options.include_top,
        "input_size": options.input_size,
        "preprocessing": spec.preprocessing,
        "pooling": pooling,
        "gradcam_layer": spec.gradcam_layer,
        "open_set": open_set,
        "class_names": data.class_names,
        "split_sizes": {name: len(data.split[name]) for name in SPLIT_NAMES},
        "skipped_photos": [str(path) for path, _ in data.skipped],
        "ignored_files": data.ignored,
        "dedup_threshold": options.dedup_threshold,
        "dedup_groups": data.dedup_groups,
        "hyperparameters": record,
        "freeze": {"trainable_layers": freeze.trainable, "frozen_layers": freeze.frozen,
                   "first_trainable": freeze.first_trainable},
        "metrics": metrics,
        "run": str(run_folder),
        "trained_at": datetime.now().isoformat(timespec="seconds"),
        "versions": library_versions(),
    }
    artifacts.save_model_atomic(model, staging / artifacts.MODEL_FILE)
    metadata["inference_graph"] = artifacts.write_inference_graph(model, staging, backbone.name)
    metadata["open_set"]["embedding_key"] = embedding_key(cache_key, weights, frozen=head_is_only_trainable(model),
                                                          model_sha256=metadata["inference_graph"]["model_sha256"])
    artifacts.write_open_set_arrays(staging, class_model)
    reports.write_open_set_report(metadata["open_set"], run_folder)
    artifacts.atomic_write_json(staging / artifacts.LABELS_FILE,
                                {name: index for index, name in enumerate(data.class_names)}, sort_keys=False)
    artifacts.atomic_write_json(staging / artifacts.TRAINING_FILE, metadata)
    artifacts.atomic_write_json(staging / artifacts.SPLIT_FILE, split_record)
    artifacts.atomic_write_json(run_folder / "training.json", metadata)
    artifacts.publish(staging, options.models_dir / options.granja)
    shutil.rmtree(resume_folder(options), ignore_errors=True)

    print(reports.classification_report(y_true, y_pred, data.class_names, as_text=True))
    print(f"test accuracy: {metrics['test_accuracy']:.4f} on {len(test_split)} photos "
          f"({len(data.skipped)} photos skipped, {data.ignored} other files ignored); "
          f"model saved to {options.models_dir / options.granja / artifacts.MODEL_FILE}; reports in {run_folder}")
    return {**metrics, "run_folder": str(run_folder), "metadata": metadata}


def _background_embeddings(model, options: TrainOptions, weights: str,
                           cache_key: dict | None) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Embeddings of the --background-dir photos, their animal indices and the count of photos skipped.

    Returns None without the flag, or with a warning when too few animals have photos that decode.

    With ``cache_key`` they are read from and added to the granja's feature cache, so a second
    run with the same backbone reuses them.
    """
    if options.background_dir is None:
        return None
    from utils.features import FeatureCache, cached_features, photo_digest, split_at_head, weights_identity

    scan = scan_granja(options.background_dir)
    paths = [path for photos in scan.photos.values() for path in photos]
    animals = np.asarray([index for index, photos in enumerate(scan.photos.values()) for _ in photos])
    cache = None
    if cache_key is not None:
        cache_root = options.cache_dir or options.models_dir / options.granja / artifacts.CACHE_FOLDER
        cache = FeatureCache(cache_root, {**cache_key, "weights": weights_identity(weights)})
    extractor, _ = split_at_head(model)

    # Chunks keep memory bounded: a background set can be far larger than the granja.
    started = time.monotonic()
    embeddings, kept = [], []
    for start in range(0, len(paths), BACKGROUND_CHUNK):
        chunk = paths[start:start + BACKGROUND_CHUNK]
        images, decoded, failed = decode_photos(chunk, options.input_size)
        for _, reason in failed:
            logger.warning("skipping a background photo: %s", reason)
        if decoded:
            digests = [photo_digest(chunk[index]) for index in decoded]
            embeddings.append(cached_features(cache, digests, extractor, images, options.batch_size))
            kept.extend(start + index for index in decoded)
    decoded_animals = len(np.unique(animals[kept]))
    if decoded_animals < MIN_BACKGROUND_ANIMALS:
        logger.warning("only %d of the animals in --background-dir %s have photos that decode, fewer than %d; "
                       "calibrating without the background set: replace the broken photos and train again to use "
                       "it", decoded_animals, options.background_dir, MIN_BACKGROUND_ANIMALS)
        return None
    from_cache = f", {cache.hits} read from the cache" if cache is not None else ""
    logger.info("background: %d photos of %d animals embedded in %.1f s%s", len(kept), decoded_animals,
                time.monotonic() - started, from_cache)
    return np.concatenate(embeddings), animals[kept], len(paths) - len(kept)


def calibrate_open_set(model, data: PreparedData, embeddings: np.ndarray, test_probabilities: np.ndarray,
                       options: TrainOptions, background: tuple[np.ndarray, np.ndarray] | None = None):
    """Calibrate unknown-animal detection on the validation split; score --unknown-dir if given.

    With ``background`` (embeddings and animal indices of animals outside the granja), a seeded
    fifth of those animals are held out as validation unknowns, and identity projections are
    learned from the granja's training photos and the other background animals.

    Returns the record kept in ``training.json`` and the fitted ``ClassModel``.
    """
    from utils.features import compute_features, penultimate_model, split_at_head
    from utils.open_set import (ClassModel, calibrate, enrolment_threshold, fit_identity_projections, known_scores,
                                open_set_metrics)

    extractor, head = split_at_head(model)
    penultimate = penultimate_model(model)
    train_split, val_split, test_split = (np.asarray(data.split[name]) for name in SPLIT_NAMES)
    projection = held_out = None
    if background is not None:
        background_embeddings, animals = background
        order = np.random.default_rng(options.seed).permutation(np.unique(animals))
        held_out = np.isin(animals, order[:max(1, len(order) // 5)])
        started = time.monotonic()
        projection = fit_identity_projections(
            np.concatenate([embeddings[train_split], background_embeddings[~held_out]]),
            np.concatenate([data.labels[train_split], len(data.class_names) + animals[~held_out]]),
            seed=options.seed)
        logger.info("identity projections learned from %d granja animals and %d background animals in %.1f s",
                    len(data.class_names), len(order) - len(np.unique(animals[held_out])), time.monotonic() - started)
    class_model = ClassModel.fit(embeddings[train_split], _batched(penultimate, embeddings[train_split]),
                                 data.labels[train_split], len(data.class_names), projection)

    def per_class(photo_embeddings, probabilities=None):
        if probabilities is None:
            probabilities = _batched(head, photo_embeddings)
        return class_model.per_class(probabilities, photo_embeddings, _batched(penultimate, photo_embeddings))

    validation_unknowns = None if background is None else per_class(background[0][held_out])
    calibration = calibrate(per_class(embeddings[val_split]), data.labels[val_split], options.accept_rate,
                            validation_unknowns)
    if background is not None:
        calibration.enrolment_threshold = enrolment_threshold(class_model, background[0][held_out],
                                                              background[1][held_out], options.accept_rate)
    record = calibration.to_dict()
    if background is not None:
        held_out_animals = len(np.unique(background[1][held_out]))
        record["background"] = {"dir": str(options.background_dir), "animals": len(order),
                                "photos": len(background[1]), "held_out_animals": held_out_animals,
                                "held_out_photos": int(held_out.sum())}
        if held_out.sum() < STEADY_HELD_OUT_PHOTOS:
            logger.warning("only %d held-out background photos (of %d %s) choose the unknown-animal score and "
                           "set the enrolment threshold, so both are rough; give --background-dir hundreds of "
                           "animals for steady figures", held_out.sum(), held_out_animals,
                           "animal" if held_out_animals == 1 else "animals")
    against = ("held-out-class AUROC" if background is None
               else f"AUROC against {int(held_out.sum())} photos of held-out background animals")
    logger.info("unknown animals: %s score, threshold %.4f (accepts %.0f%% of validation photos; %s: %s)",
                calibration.score, calibration.threshold, 100 * options.accept_rate, against,
                ", ".join(f"{name} {value:.3f}" for name, value in calibration.validation_auroc.items()))
    if calibration.enrolment_threshold is not None:
        logger.info("enrolled animals: identity cosine threshold %.4f (accepts %.0f%% of held-out background "
                    "animals' photos against the mean of up to 5 of their other photos)",
                    calibration.enrolment_threshold, 100 * options.accept_rate)
    elif background is not None:
        logger.info("enrolled animals: the trained classes' identity cosine threshold %.4f, because no held-out "
                    "background animal has the 3 photos that simulating enrolment needs",
                    calibration.thresholds["identity_cosine"])

    if options.unknown_dir is not None:
        from utils.images import load_given_photos, load_photo

        paths, images = load_given_photos([options.unknown_dir], lambda path: load_photo(path, options.input_size))
        unknown = known_scores(per_class(compute_features(extractor, np.stack(images), options.batch_size)))
        known = known_scores(per_class(embeddings[test_split], test_probabilities))
        by_score = {name: open_set_metrics(known[name], unknown[name], calibration.thresholds[name])
                    for name in known}
        record["unknown_test"] = {**by_score[calibration.score], "score": calibration.score,
                                  "unknown_dir": str(options.unknown_dir), "by_score": by_score}
        logger.info("open set on %d test photos and %d unknown photos: AUROC %.3f, unknown flagged %.1f%%, "
                    "known flagged %.1f%%", len(test_split), len(paths), by_score[calibration.score]["auroc"],
                    100 * by_score[calibration.score]["unknown_flagged"],
                    100 * by_score[calibration.score]["known_flagged"])
    return record, class_model


def _batched(layers, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run small dense layers (the head, or part of it) over feature vectors, in batches."""
    if len(inputs) == 0:
        return np.zeros((0, layers.output_shape[-1]), dtype=np.float32)
    return np.concatenate([np.asarray(layers(inputs[start:start + batch_size], training=False))
                           for start in range(0, len(inputs), batch_size)])


def embedding_key(cache_key: dict, weights: str, *, frozen: bool, model_sha256: str) -> str:
    """Identify the embedding function: photos embedded under one key are comparable.

    With a frozen backbone the embedding depends only on the backbone, its weights and the input
    settings, so it survives retraining the head. A fine-tuned backbone is tied to its model file.
    """
    from utils.features import weights_identity

    record = {**cache_key, "weights": weights_identity(weights), "fine_tuned_model": None if frozen else model_sha256}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _whole_run_history(history: dict, run_folder: Path, resumed: bool) -> dict[str, list[float]]:
    """Return the per-epoch metrics of the whole run.

    After ``--resume``, fit()'s history covers only the epochs since the resume, while ``epochs.csv``
    (appended to) contains them all.
    """
    log = run_folder / "epochs.csv"
    if not resumed or not log.is_file():
        return history
    with open(log, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    return {key: [float(row[key]) for row in rows] for key in (rows[0] if rows else {}) if key != "epoch"}


def _cross_entropy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean categorical cross-entropy of predicted probabilities, clipped as Keras clips them."""
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-7, 1.0)).mean()) if len(labels) else 0.0
