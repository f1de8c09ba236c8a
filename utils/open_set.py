"""Saying "unknown" for animals that are not in the granja, and enrolling new ones without retraining.

A softmax always names a known class. Three scores tell how much a photo looks like a known animal:

- ``max_probability``: the head's highest class probability.
- ``cosine``: the highest cosine similarity between the photo's embedding (the pooled backbone
  features that feed the head) and the mean embedding of each class's training photos.
- ``mahalanobis``: minus the smallest Mahalanobis distance from the photo's penultimate features
  (the input of the head's last layer, scaled to unit length) to a class mean. All classes share
  one covariance, shrunk with scikit-learn's Ledoit-Wolf estimator.

Training calibrates them on the validation split only. Validation photos all show known animals,
so to compare the scores without unknown photos each validation photo is also scored as if its own
class did not exist (probabilities renormalised over the other classes, similarity or distance to
the other class means only), as an animal the model never saw would be. The score whose known and held-out values
separate better (higher AUROC) is used, with the threshold that accepts ``accept_rate`` of the
known validation photos.

Enrolled animals are mean embeddings of a few photos, recognised by cosine similarity alongside
the trained head.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

SCORES = ("max_probability", "cosine", "mahalanobis")
DEFAULT_ACCEPT_RATE = 0.95
UNKNOWN = "unknown"


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Scale rows to unit length (rows of zeros stay zero)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def class_means(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean feature vector of each class, shape (classes, features)."""
    features = np.asarray(features, dtype=np.float64)
    return np.stack([features[labels == index].mean(axis=0) for index in range(num_classes)])


def cosine_similarities(embeddings: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Cosine similarity of each embedding to each mean, shape (photos, means)."""
    if len(means) == 0:
        return np.zeros((len(embeddings), 0))
    return normalize(embeddings) @ normalize(means).T


@dataclass
class ClassModel:
    """Class statistics that the scores compare photos with: embedding means and penultimate Gaussians."""

    embedding_means: np.ndarray  # (classes, embedding size)
    penultimate_means: np.ndarray  # (classes, penultimate size), of unit-length features
    precision: np.ndarray  # (penultimate size, penultimate size), shared inverse covariance

    @classmethod
    def fit(cls, embeddings: np.ndarray, penultimate: np.ndarray, labels: np.ndarray,
            num_classes: int) -> "ClassModel":
        """Fit on the training photos' embeddings and penultimate features."""
        unit = normalize(penultimate)
        means = class_means(unit, labels, num_classes)
        precision = LedoitWolf().fit(unit - means[labels]).precision_
        return cls(class_means(embeddings, labels, num_classes), means, precision)

    def cosine(self, embeddings: np.ndarray) -> np.ndarray:
        return cosine_similarities(embeddings, self.embedding_means)

    def mahalanobis(self, penultimate: np.ndarray) -> np.ndarray:
        """Minus the squared Mahalanobis distance of each photo to each class mean, shape (photos, classes)."""
        unit = normalize(penultimate)
        distances = [np.einsum("ij,jk,ik->i", unit - mean, self.precision, unit - mean)
                     for mean in self.penultimate_means]
        return -np.stack(distances, axis=1)

    def per_class(self, probabilities: np.ndarray, embeddings: np.ndarray,
                  penultimate: np.ndarray) -> dict[str, np.ndarray]:
        """Compute every score of each photo for each class, shape (photos, classes) per score."""
        return {"max_probability": np.asarray(probabilities, dtype=np.float64),
                "cosine": self.cosine(embeddings), "mahalanobis": self.mahalanobis(penultimate)}


def known_scores(per_class: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return each score of each photo as a known animal, that is for its best class."""
    return {name: values.max(axis=1) for name, values in per_class.items()}


def held_out_scores(per_class: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
    """Return each score of each photo with its own class removed, as for an animal the model never saw."""
    rows = np.arange(len(labels))
    scores = {}
    for name, values in per_class.items():
        others = values.copy()
        if name == "max_probability":
            own = others[rows, labels].copy()
            others[rows, labels] = 0.0
            scores[name] = np.clip(others.max(axis=1) / np.clip(1.0 - own, 1e-12, None), 0.0, 1.0)
        else:
            others[rows, labels] = -np.inf
            scores[name] = others.max(axis=1)
    return scores


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Area under the ROC curve of telling known (higher score) from unknown photos."""
    labels = np.concatenate([np.ones(len(known)), np.zeros(len(unknown))])
    return float(roc_auc_score(labels, np.concatenate([known, unknown])))


@dataclass
class Calibration:
    """The score used to flag unknown animals and the thresholds found on the validation split."""

    score: str
    thresholds: dict[str, float]
    accept_rate: float
    validation_auroc: dict[str, float]

    @property
    def threshold(self) -> float:
        return self.thresholds[self.score]

    def to_dict(self) -> dict:
        return {"score": self.score, "threshold": round(self.threshold, 6),
                "thresholds": {name: round(value, 6) for name, value in self.thresholds.items()},
                "accept_rate": self.accept_rate,
                "validation_auroc": {name: round(value, 6) for name, value in self.validation_auroc.items()}}

    @classmethod
    def from_dict(cls, record: dict) -> "Calibration":
        return cls(score=record["score"], thresholds=dict(record["thresholds"]), accept_rate=record["accept_rate"],
                   validation_auroc=dict(record["validation_auroc"]))


# NOTE: on dogs42 against 100 DogFaceNet dogs it never saw, the best score reaches an AUROC of
# 0.91 and flags 71% of unknown photos, short of 0.93 and 80%; docs/benchmarks.md lists what was tried.
def calibrate(per_class: dict[str, np.ndarray], labels: np.ndarray,
              accept_rate: float = DEFAULT_ACCEPT_RATE) -> Calibration:
    """Choose the score and thresholds from validation photos of known animals.

    Each threshold is the score that ``accept_rate`` of the validation photos reach or exceed.
    """
    known = known_scores(per_class)
    held_out = held_out_scores(per_class, labels)
    separation = {name: auroc(known[name], held_out[name]) for name in per_class}
    thresholds = {name: float(np.quantile(known[name], 1.0 - accept_rate, method="lower")) for name in per_class}
    best = max(separation, key=lambda name: separation[name])
    return Calibration(score=best, thresholds=thresholds, accept_rate=accept_rate, validation_auroc=separation)


def open_set_metrics(known: np.ndarray, unknown: np.ndarray, threshold: float) -> dict[str, float]:
    """AUROC, and the shares of unknown photos flagged and of known photos wrongly flagged."""
    return {"auroc": round(auroc(known, unknown), 6),
            "unknown_flagged": round(float(np.mean(unknown < threshold)), 6),
            "known_flagged": round(float(np.mean(known < threshold)), 6),
            "known_photos": int(len(known)), "unknown_photos": int(len(unknown))}


@dataclass
class Decision:
    """The decision testing.py prints for one photo."""

    prediction: str  # a class name, an enrolled animal's name, or "unknown"
    score: float
    threshold: float
    score_name: str
    enrolled: bool = False


def decide(probabilities: np.ndarray, embeddings: np.ndarray, penultimate: np.ndarray, class_names: Sequence[str],
           class_model: ClassModel, calibration: Calibration, enrolled: dict[str, np.ndarray],
           threshold: float | None = None) -> list[Decision]:
    """Name each photo's animal, or mark it unknown.

    An enrolled animal is named when the photo's cosine similarity to its mean embedding reaches
    the cosine threshold and beats the similarity to every trained class's mean. Otherwise the
    trained head names its best class when the chosen score reaches the threshold (``threshold``
    overrides the calibrated one).
    """
    threshold = calibration.threshold if threshold is None else threshold
    trained_cosine = class_model.cosine(embeddings)
    names = list(enrolled)
    enrolled_cosine = cosine_similarities(embeddings, np.stack([enrolled[name] for name in names])) if names else None
    if calibration.score == "max_probability":
        scores = np.asarray(probabilities).max(axis=1)
    elif calibration.score == "cosine":
        scores = trained_cosine.max(axis=1)
    else:
        scores = class_model.mahalanobis(penultimate).max(axis=1)
    cosine_threshold = threshold if calibration.score == "cosine" else calibration.thresholds["cosine"]
    decisions = []
    for row in range(len(probabilities)):
        if enrolled_cosine is not None:
            best = int(enrolled_cosine[row].argmax())
            similarity = float(enrolled_cosine[row, best])
            if similarity >= cosine_threshold and similarity > float(trained_cosine[row].max()):
                decisions.append(Decision(names[best], similarity, cosine_threshold, "cosine", enrolled=True))
                continue
        score = float(scores[row])
        name = class_names[int(np.argmax(probabilities[row]))] if score >= threshold else UNKNOWN
        decisions.append(Decision(name, score, threshold, calibration.score))
    return decisions
