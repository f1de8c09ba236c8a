"""One training run: photos to split, backbone and head, fit, test reports and saved files."""

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from utils import artifacts, reports
from utils.augment import AugmentConfig
from utils.data import SPLIT_NAMES, check_class_sizes, decode_photos, scan_granja, split_indices
from utils.errors import UserError

logger = logging.getLogger(__name__)


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


def prepare_data(options: TrainOptions) -> PreparedData:
    """List, decode and split the granja's photos; every check here runs before the first epoch."""
    root = options.dataset_dir / options.granja
    scan = scan_granja(root)
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
    if scan.preset is not None:
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
    """The options as plain JSON types."""
    record = asdict(options)
    for key, value in record.items():
        if isinstance(value, Path):
            record[key] = str(value)
        elif isinstance(value, tuple):
            record[key] = list(value)
    record["augment"] = options.augment.to_dict()
    return record


def train(options: TrainOptions) -> dict:
    """Train a granja's recogniser and save its files; returns the test metrics.

    Raises:
        UserError: bad data, flags or weights, found before the first epoch.
    """
    import keras
    import tensorflow as tf

    from utils.backbones import build_backbone, get_spec, resolve_weights
    from utils.head import apply_freeze, build_classifier
    from utils.pipeline import make_dataset

    spec = get_spec(options.model)
    weights = resolve_weights(spec, options.weights)
    pooling = options.pooling or spec.default_pooling
    if options.input_size < spec.min_input_size:
        raise UserError(f"--input-size {options.input_size} is too small for {spec.name}; "
                        f"use at least {spec.min_input_size}")

    with artifacts.granja_lock(options.models_dir, options.granja):
        artifacts.granja_folder(options.models_dir, options.granja)
        data = prepare_data(options)
        keras.utils.set_random_seed(options.seed)

        backbone = build_backbone(spec, options.input_size, weights, include_top=options.include_top)
        model = build_classifier(backbone, input_size=options.input_size, preprocessing=spec.preprocessing,
                                 pooling=pooling, hidden=options.hidden, dropout=options.dropout,
                                 num_classes=len(data.class_names))
        freeze = apply_freeze(model, options.freeze)
        logger.info("%d layers with weights: %d trainable, %d frozen; first trainable layer: %s",
                    freeze.trainable + freeze.frozen, freeze.trainable, freeze.frozen, freeze.first_trainable)
        model.compile(optimizer=keras.optimizers.Adam(options.lr), loss="categorical_crossentropy",
                      metrics=["accuracy"])

        run_folder = make_run_folder(options)
        staging = artifacts.staging_folder(options.models_dir, options.granja)
        record = options_record(options)
        artifacts.atomic_write_json(run_folder / "args.json", record)

        num_classes = len(data.class_names)
        train_split, val_split, test_split = (data.split[name] for name in SPLIT_NAMES)
        train_data = make_dataset(data.images[train_split], data.labels[train_split], num_classes,
                                  options.batch_size, shuffle=True, augment=options.augment, seed=options.seed)
        val_data = make_dataset(data.images[val_split], data.labels[val_split], num_classes, options.batch_size)

        checkpoint = staging / artifacts.MODEL_FILE
        callbacks = [
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=options.patience,
                                          restore_best_weights=True, verbose=1),
            keras.callbacks.ModelCheckpoint(str(checkpoint), monitor="val_loss", save_best_only=True),
            keras.callbacks.TensorBoard(log_dir=str(run_folder), update_freq="batch", write_graph=True),
            keras.callbacks.CSVLogger(str(run_folder / "epochs.csv")),
        ]
        started = time.monotonic()
        try:
            history = model.fit(train_data, validation_data=val_data, epochs=options.epochs,
                                callbacks=callbacks, verbose=options.verbose, shuffle=False)
        except KeyboardInterrupt:
            logger.error("training interrupted: the previous model in %s is kept",
                         options.models_dir / options.granja)
            raise
        seconds = time.monotonic() - started

        # EarlyStopping restored the weights of the best epoch by val_loss; the test split is used
        # only here, after model selection.
        probabilities = model.predict(
            make_dataset(data.images[test_split], data.labels[test_split], num_classes, options.batch_size),
            verbose=0)
        y_true = data.labels[test_split]
        y_pred = probabilities.argmax(axis=1)
        report = reports.classification_report(y_true, y_pred, data.class_names)
        test_accuracy = float(report["accuracy"])
        test_loss = float(keras.losses.categorical_crossentropy(
            tf.one_hot(y_true, num_classes), probabilities).numpy().mean())

        reports.write_classification_report(report, run_folder)
        reports.write_confusion_matrix(reports.confusion_matrix(y_true, y_pred, num_classes),
                                       data.class_names, run_folder)
        reports.write_learning_curves(history.history, run_folder)

        epochs_run = len(history.history.get("loss", []))
        best_epoch = int(np.argmin(history.history["val_loss"])) + 1 if history.history.get("val_loss") else None
        metrics = {
            "test_accuracy": round(test_accuracy, 6),
            "test_loss": round(test_loss, 6),
            "best_epoch": best_epoch,
            "epochs_run": epochs_run,
            "best_val_loss": round(float(min(history.history["val_loss"])), 6),
            "train_seconds": round(seconds, 1),
        }
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
            "class_names": data.class_names,
            "split_sizes": {name: len(data.split[name]) for name in SPLIT_NAMES},
            "skipped_photos": [str(path) for path, _ in data.skipped],
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
        root = options.dataset_dir / options.granja
        split_record = {
            "seed": options.seed,
            "root": str(root),
            **{name: [str(data.paths[index].relative_to(root)) for index in data.split[name]]
               for name in SPLIT_NAMES},
        }
        artifacts.save_model_atomic(model, staging / artifacts.MODEL_FILE)
        artifacts.atomic_write_json(staging / artifacts.LABELS_FILE,
                                    {name: index for index, name in enumerate(data.class_names)},
                                    sort_keys=False)
        artifacts.atomic_write_json(staging / artifacts.TRAINING_FILE, metadata)
        artifacts.atomic_write_json(staging / artifacts.SPLIT_FILE, split_record)
        artifacts.atomic_write_json(run_folder / "training.json", metadata)
        artifacts.publish(staging, options.models_dir / options.granja)

    print(reports.classification_report(y_true, y_pred, data.class_names, as_text=True))
    print(f"test accuracy: {test_accuracy:.4f} on {len(test_split)} photos; "
          f"model saved to {options.models_dir / options.granja / artifacts.MODEL_FILE}; "
          f"reports in {run_folder}")
    logger.debug("metadata: %s", json.dumps(metadata, ensure_ascii=False)[:2000])
    return {**metrics, "run_folder": str(run_folder), "metadata": metadata}
