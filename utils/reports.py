"""Test-split reports: classification report, confusion matrix and learning curves, written atomically."""

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from utils.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text

REPORT_COLUMNS = ("precision", "recall", "f1-score", "support")


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str],
                          *, as_text: bool = False) -> dict | str:
    """Per-class precision, recall, f1-score and support, plus accuracy, macro avg and weighted avg.

    The layout is scikit-learn's ``classification_report``: a dict, or with ``as_text`` the
    fixed-width table it prints. Classes that never occur in ``y_pred`` score 0 without a warning.
    """
    from sklearn.metrics import classification_report as sklearn_report

    return sklearn_report(
        y_true, y_pred, labels=list(range(len(class_names))), target_names=list(class_names),
        output_dict=not as_text, zero_division=0, digits=3,
    )


def write_classification_report(report: dict, folder: Path) -> None:
    """Write ``classification_report.json`` and ``.csv`` (one row per class, then the summary rows)."""
    rounded = {
        name: round(value, 6) if isinstance(value, float) else
        {key: round(number, 6) for key, number in value.items()}
        for name, value in report.items()
    }
    atomic_write_json(folder / "classification_report.json", rounded, sort_keys=False)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["", *REPORT_COLUMNS])
    support_total = report["macro avg"]["support"]
    for name, value in report.items():
        if name == "accuracy":
            writer.writerow(["accuracy", "", "", f"{value:.6f}", f"{support_total:.0f}"])
        else:
            writer.writerow([name, *(f"{value[column]:.6f}" if column != "support" else f"{value[column]:.0f}"
                                     for column in REPORT_COLUMNS)])
    atomic_write_text(folder / "classification_report.csv", buffer.getvalue())


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class), shape (num_classes, num_classes), int64."""
    from sklearn.metrics import confusion_matrix as sklearn_confusion

    return sklearn_confusion(y_true, y_pred, labels=list(range(num_classes)))


def write_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], folder: Path) -> None:
    """Write ``confusion_matrix.csv`` (rows: true class, columns: predicted) and ``confusion_matrix.png``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true \\ predicted", *class_names])
    for name, row in zip(class_names, matrix):
        writer.writerow([name, *row.tolist()])
    atomic_write_text(folder / "confusion_matrix.csv", buffer.getvalue())

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    side = max(5.0, 0.25 * len(class_names) + 2.0)
    figure, axes = plt.subplots(figsize=(side, side))
    image = axes.imshow(matrix, cmap="Blues", interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    ticks = np.arange(len(class_names))
    font = 8 if len(class_names) <= 20 else 5
    axes.set_xticks(ticks, labels=class_names, rotation=90, fontsize=font)
    axes.set_yticks(ticks, labels=class_names, fontsize=font)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title("Confusion matrix (test split)")
    if len(class_names) <= 20:
        for (row, column), count in np.ndenumerate(matrix):
            if count:
                axes.text(column, row, str(count), ha="center", va="center", fontsize=font,
                          color="white" if count > matrix.max() / 2 else "black")
    _save_figure(figure, folder / "confusion_matrix.png")


def write_learning_curves(history: dict[str, list[float]], folder: Path) -> None:
    """Plot loss and accuracy per epoch, training and validation, into ``learning_curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        for key, label in ((metric, "training"), (f"val_{metric}", "validation")):
            values = history.get(key, [])
            if values:
                axis.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.set_title(metric.capitalize())
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    _save_figure(figure, folder / "learning_curves.png")


def _save_figure(figure, path: Path) -> None:
    from matplotlib import pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def write_open_set_report(record: dict, run_folder: Path) -> None:
    """Write the unknown-animal calibration and, with --unknown-dir, its test metrics."""
    atomic_write_json(run_folder / "open_set.json", record)
