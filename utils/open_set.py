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

With a background set (photos of other animals of the same kind, one folder per animal, none of
them in the granja), training also learns an identity space: a linear projection of the embedding
trained with a large-margin cosine loss (CosFace) to tell apart the granja's animals and the
background animals. Many animals teach the projection what separates individuals in general,
where the head only learns to separate the granja's few. Two more scores use it:

- ``identity_cosine``: the highest cosine similarity, in the identity space, to a class mean.
- ``identity_mahalanobis``: as ``mahalanobis``, in the identity space.

Three such projections from different random starts are joined. A fifth of the background
animals are held out of that training, and the scores are compared on real unknown photos: the
validation photos against those animals' photos.

Enrolled animals are mean embeddings of a few photos, recognised by cosine similarity (in the
identity space when there is one) alongside the trained head. With a background set, their
threshold comes from enrolling held-out background animals from up to 5 photos each and scoring
their other photos.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

SCORES = ("max_probability", "cosine", "mahalanobis", "identity_cosine", "identity_mahalanobis")
IDENTITY_SIZE = 256
IDENTITY_PROJECTIONS = 3
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


def _shared_gaussians(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means of unit-length features and the inverse of their shared Ledoit-Wolf covariance."""
    unit = normalize(features)
    means = class_means(unit, labels, num_classes)
    return means, LedoitWolf().fit(unit - means[labels]).precision_


def _mahalanobis(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Minus the squared Mahalanobis distance of each unit-length row to each mean, shape (photos, means)."""
    unit = normalize(features)
    return -np.stack([np.einsum("ij,jk,ik->i", unit - mean, precision, unit - mean) for mean in means], axis=1)


@dataclass
class ClassModel:
    """Class statistics that the scores compare photos with: embedding means and penultimate Gaussians.

    The identity fields are set when training had a background set, and are None otherwise.
    """

    embedding_means: np.ndarray  # (classes, embedding size)
    penultimate_means: np.ndarray  # (classes, penultimate size), of unit-length features
    precision: np.ndarray  # (penultimate size, penultimate size), shared inverse covariance
    projection_kernel: np.ndarray | None = None  # (embedding size, identity size)
    projection_bias: np.ndarray | None = None  # (identity size,)
    identity_means: np.ndarray | None = None  # (classes, identity size), of unit-length features
    identity_precision: np.ndarray | None = None  # (identity size, identity size)

    @classmethod
    def fit(cls, embeddings: np.ndarray, penultimate: np.ndarray, labels: np.ndarray, num_classes: int,
            projection: tuple[np.ndarray, np.ndarray] | None = None) -> "ClassModel":
        """Fit on the training photos' embeddings and penultimate features (and identity features)."""
        means, precision = _shared_gaussians(penultimate, labels, num_classes)
        model = cls(class_means(embeddings, labels, num_classes), means, precision)
        if projection is not None:
            model.projection_kernel, model.projection_bias = (np.asarray(array, dtype=np.float64)
                                                              for array in projection)
            model.identity_means, model.identity_precision = _shared_gaussians(
                model.identity(embeddings), labels, num_classes)
        return model

    @property
    def has_identity(self) -> bool:
        return self.projection_kernel is not None

    def identity(self, embeddings: np.ndarray) -> np.ndarray:
        """Unit-length identity features of embeddings, shape (photos, identity size).

        The kernel's columns hold several projections side by side, ``IDENTITY_SIZE`` each: each
        projection's output is scaled to unit length before they are joined.
        """
        projected = np.asarray(embeddings, dtype=np.float64) @ self.projection_kernel + self.projection_bias
        blocks = np.split(projected, max(1, projected.shape[1] // IDENTITY_SIZE), axis=1)
        return normalize(np.concatenate([normalize(block) for block in blocks], axis=1))

    def cosine(self, embeddings: np.ndarray) -> np.ndarray:
        return cosine_similarities(embeddings, self.embedding_means)

    def mahalanobis(self, penultimate: np.ndarray) -> np.ndarray:
        """Minus the squared Mahalanobis distance of each photo to each class mean, shape (photos, classes)."""
        return _mahalanobis(penultimate, self.penultimate_means, self.precision)

    def per_class(self, probabilities: np.ndarray, embeddings: np.ndarray,
                  penultimate: np.ndarray) -> dict[str, np.ndarray]:
        """Compute every score of each photo for each class, shape (photos, classes) per score."""
        scores = {"max_probability": np.asarray(probabilities, dtype=np.float64),
                  "cosine": self.cosine(embeddings), "mahalanobis": self.mahalanobis(penultimate)}
        if self.has_identity:
            identity = self.identity(embeddings)
            scores["identity_cosine"] = cosine_similarities(identity, self.identity_means)
            scores["identity_mahalanobis"] = _mahalanobis(identity, self.identity_means, self.identity_precision)
        return scores

    def arrays(self) -> dict[str, np.ndarray]:
        """Collect the arrays to save, by name, in the form ``from_arrays`` reads back."""
        names = ["embedding_means", "penultimate_means", "precision"]
        if self.has_identity:
            names += ["projection_kernel", "projection_bias", "identity_means", "identity_precision"]
        return {name: getattr(self, name) for name in names}

    @classmethod
    def from_arrays(cls, arrays) -> "ClassModel":
        return cls(**{name: np.asarray(arrays[name], dtype=np.float64) for name in arrays})


def fit_identity_projections(embeddings: np.ndarray, labels: np.ndarray, *, count: int = IDENTITY_PROJECTIONS,
                             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learn ``count`` projections from different random starts and join them side by side.

    One projection's scores move by a few points from seed to seed; joining three steadies them.
    """
    fitted = [fit_identity_projection(embeddings, labels, seed=seed + index) for index in range(count)]
    return np.concatenate([kernel for kernel, _ in fitted], axis=1), np.concatenate([bias for _, bias in fitted])


def fit_identity_projection(embeddings: np.ndarray, labels: np.ndarray, *, size: int = IDENTITY_SIZE,
                            epochs: int = 30, batch_size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learn a linear projection of embeddings in which photos of one animal lie close together.

    Trained with the large-margin cosine loss (CosFace: scale 24, margin 0.2) over every animal in
    ``labels``, the granja's and the background's.

    Returns:
        The kernel, shape (embedding size, ``size``), and the bias, shape (``size``,).
    """
    import keras
    import tensorflow as tf

    scale, margin = 24.0, 0.2
    keras.utils.set_random_seed(seed)
    labels = np.unique(np.asarray(labels), return_inverse=True)[1].astype(np.int32)
    classes = int(labels.max()) + 1
    projection = keras.layers.Dense(size, name="identity")
    projection.build((None, embeddings.shape[1]))
    centres = tf.Variable(tf.random.normal((size, classes), stddev=0.05, seed=seed), name="centres")
    optimizer = keras.optimizers.Adam(1e-3)
    variables = [*projection.trainable_variables, centres]
    dataset = tf.data.Dataset.from_tensor_slices((np.asarray(embeddings, dtype=np.float32), labels))
    dataset = dataset.shuffle(len(labels), seed=seed).batch(batch_size)

    @tf.function
    def step(batch, batch_labels):
        with tf.GradientTape() as tape:
            cosine = tf.math.l2_normalize(projection(batch), axis=1) @ tf.math.l2_normalize(centres, axis=0)
            logits = scale * (cosine - margin * tf.one_hot(batch_labels, classes))
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(batch_labels, logits))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))

    for _ in range(epochs):
        for batch, batch_labels in dataset:
            step(batch, batch_labels)
    kernel, bias = (np.asarray(variable) for variable in projection.weights)
    return kernel, bias


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
    validation_unknowns: str = "held_out_classes"  # or "background": what the AUROCs compare with
    enrolment_threshold: float | None = None  # identity cosine that enrolled animals need; None: the cosine's

    @property
    def threshold(self) -> float:
        return self.thresholds[self.score]

    def to_dict(self) -> dict:
        return {"score": self.score, "threshold": round(self.threshold, 6),
                "thresholds": {name: round(value, 6) for name, value in self.thresholds.items()},
                "accept_rate": self.accept_rate,
                "validation_auroc": {name: round(value, 6) for name, value in self.validation_auroc.items()},
                "validation_unknowns": self.validation_unknowns,
                **({} if self.enrolment_threshold is None
                   else {"enrolment_threshold": round(self.enrolment_threshold, 6)})}

    @classmethod
    def from_dict(cls, record: dict) -> "Calibration":
        return cls(score=record["score"], thresholds=dict(record["thresholds"]), accept_rate=record["accept_rate"],
                   validation_auroc=dict(record["validation_auroc"]),
                   validation_unknowns=record.get("validation_unknowns", "held_out_classes"),
                   enrolment_threshold=record.get("enrolment_threshold"))


# NOTE: without a background set, the best score on dogs42 against 100 DogFaceNet dogs it never saw
# reaches an AUROC of 0.91 and flags 71% of unknown photos. docs/benchmarks.md has the figures.
def calibrate(per_class: dict[str, np.ndarray], labels: np.ndarray, accept_rate: float = DEFAULT_ACCEPT_RATE,
              unknown_per_class: dict[str, np.ndarray] | None = None) -> Calibration:
    """Choose the score and thresholds from validation photos of known animals.

    Scores are compared by how well they separate the validation photos from ``unknown_per_class``
    (photos of animals held out of training) when given, else from the validation photos scored
    with their own class removed. Each threshold is the score that ``accept_rate`` of the
    validation photos reach or exceed.
    """
    known = known_scores(per_class)
    if unknown_per_class is None:
        unknown, kind = held_out_scores(per_class, labels), "held_out_classes"
    else:
        unknown, kind = known_scores(unknown_per_class), "background"
    separation = {name: auroc(known[name], unknown[name]) for name in per_class}
    thresholds = {name: float(np.quantile(known[name], 1.0 - accept_rate, method="lower")) for name in per_class}
    best = max(separation, key=lambda name: separation[name])
    return Calibration(score=best, thresholds=thresholds, accept_rate=accept_rate, validation_auroc=separation,
                       validation_unknowns=kind)


def enrolment_threshold(class_model: ClassModel, embeddings: np.ndarray, animals: np.ndarray,
                        accept_rate: float = DEFAULT_ACCEPT_RATE, photos: int = 5) -> float | None:
    """Identity cosine that ``accept_rate`` of an enrolled animal's other photos reach.

    Simulates enrolment on animals that no part of training saw (held-out background animals).
    Each photo of an animal with at least 3 photos is compared with the mean embedding of up to
    ``photos`` of its other photos, as ``testing.py --enroll`` stores it. None when no animal has
    3 photos.
    """
    similarities = []
    for animal in np.unique(animals):
        own = np.asarray(embeddings)[animals == animal]
        if len(own) < 3:
            continue
        others = [np.delete(np.arange(len(own)), index)[:photos] for index in range(len(own))]
        means = np.stack([own[rest].mean(axis=0) for rest in others])
        similarities.append(np.sum(class_model.identity(own) * class_model.identity(means), axis=1))
    if not similarities:
        return None
    return float(np.quantile(np.concatenate(similarities), 1.0 - accept_rate, method="lower"))


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

    An enrolled animal is named when the photo's cosine similarity to its mean embedding (both in
    the identity space when the granja has one) reaches the enrolment threshold (else that
    similarity's threshold, or ``threshold`` when that similarity is the chosen score) and beats
    the similarity to every trained class's mean. Otherwise the trained head names its best class when
    the chosen score reaches the threshold (``threshold`` overrides the calibrated one).
    """
    threshold = calibration.threshold if threshold is None else threshold
    per_class = class_model.per_class(probabilities, embeddings, penultimate)
    scores = per_class[calibration.score].max(axis=1)
    similarity_name = "identity_cosine" if class_model.has_identity else "cosine"
    names = list(enrolled)
    enrolled_similarity = None
    if names:
        gallery = np.stack([enrolled[name] for name in names])
        if class_model.has_identity:
            enrolled_similarity = cosine_similarities(class_model.identity(embeddings), class_model.identity(gallery))
        else:
            enrolled_similarity = cosine_similarities(embeddings, gallery)
    trained_similarity = per_class[similarity_name]
    if calibration.score == similarity_name and threshold != calibration.threshold:
        similarity_threshold = threshold
    elif calibration.enrolment_threshold is not None:
        similarity_threshold = calibration.enrolment_threshold
    else:
        similarity_threshold = calibration.thresholds[similarity_name]
    decisions = []
    for row in range(len(probabilities)):
        if enrolled_similarity is not None:
            best = int(enrolled_similarity[row].argmax())
            similarity = float(enrolled_similarity[row, best])
            if similarity >= similarity_threshold and similarity > float(trained_similarity[row].max()):
                decisions.append(Decision(names[best], similarity, similarity_threshold, similarity_name,
                                          enrolled=True))
                continue
        score = float(scores[row])
        name = class_names[int(np.argmax(probabilities[row]))] if score >= threshold else UNKNOWN
        decisions.append(Decision(name, score, threshold, calibration.score))
    return decisions
