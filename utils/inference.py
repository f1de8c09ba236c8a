"""A frozen inference graph of a trained classifier, for scoring photos without rebuilding Keras layers.

Loading ``model.keras`` rebuilds every layer from its configuration and creates and assigns each
variable, about 2 s for MobileNetV2 on 2 cores. The frozen graph contains the same network with its
weights folded into constants: importing it takes about a quarter of that. It has three outputs:
the class probabilities, the embedding (the pooled backbone features that feed the dense head)
and the penultimate features (the input of the head's last layer).

``model.keras`` stays the source of truth. The graph records the SHA-256 of the model file it
was frozen from, and ``load_scorer`` uses the graph only while that file is unchanged.
"""

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("probabilities", "embedding", "penultimate")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def freeze_graph(model) -> tuple[bytes, dict]:
    """Freeze ``model`` into a serialised GraphDef with its probabilities and embedding as outputs.

    Returns ``(graph_bytes, signature)``; the signature names the input and output tensors.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from utils.features import penultimate_model, split_at_head

    extractor, head = split_at_head(model)
    penultimate = penultimate_model(model)

    @tf.function
    def forward(image):
        embedding = extractor(image, training=False)
        return {"probabilities": head(embedding, training=False), "embedding": embedding,
                "penultimate": penultimate(embedding, training=False)}

    spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name=INPUT_NAME)
    concrete = forward.get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(concrete)
    # Freezing keeps tensor names but flattens the output structure, so names come from the original.
    outputs = concrete.structured_outputs
    signature = {
        "input": frozen.inputs[0].name,
        "outputs": {name: outputs[name].name for name in OUTPUT_NAMES},
        "embedding_size": int(outputs["embedding"].shape[-1]),
    }
    return frozen.graph.as_graph_def().SerializeToString(), signature


@dataclass
class Scores:
    """Outputs of a scorer for a batch of photos, one row per photo."""

    probabilities: np.ndarray
    embeddings: np.ndarray
    penultimate: np.ndarray


class GraphScorer:
    """Score photos with a frozen graph written by ``freeze_graph``."""

    def __init__(self, graph_bytes: bytes, signature: dict, batch_size: int = 32):
        import tensorflow as tf

        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString(graph_bytes)
        names = [signature["outputs"][name] for name in OUTPUT_NAMES]

        def imported(image):
            return tf.compat.v1.import_graph_def(graph_def, input_map={signature["input"]: image},
                                                 return_elements=names, name="")

        shape = graph_def_input_shape(graph_def, signature["input"])
        self._function = tf.compat.v1.wrap_function(imported, [tf.TensorSpec(shape, tf.float32)])
        self.batch_size = batch_size

    def __call__(self, images: np.ndarray) -> Scores:
        import tensorflow as tf

        outputs = []
        for start in range(0, len(images), self.batch_size):
            batch = tf.constant(images[start:start + self.batch_size], dtype=tf.float32)
            outputs.append([tensor.numpy() for tensor in self._function(batch)])
        return Scores(*(np.concatenate(parts).astype(np.float32) for parts in zip(*outputs)))


class KerasScorer:
    """Score photos with the Keras model itself (when no matching frozen graph exists)."""

    def __init__(self, model, batch_size: int = 32):
        from utils.features import penultimate_model, split_at_head

        self.extractor, self.head = split_at_head(model)
        self.penultimate = penultimate_model(model)
        self.batch_size = batch_size

    def __call__(self, images: np.ndarray) -> Scores:
        if len(images) <= self.batch_size:
            embeddings = np.asarray(self.extractor(images, training=False))
        else:
            embeddings = self.extractor.predict(images, batch_size=self.batch_size, verbose=0)
        probabilities = np.asarray(self.head(embeddings, training=False))
        penultimate = np.asarray(self.penultimate(embeddings, training=False))
        return Scores(probabilities.astype(np.float32), np.asarray(embeddings, dtype=np.float32),
                      penultimate.astype(np.float32))


def graph_def_input_shape(graph_def, tensor_name: str) -> list:
    """Return the shape of a placeholder in a GraphDef, with None for unknown dimensions."""
    node_name = tensor_name.split(":")[0]
    node = next(node for node in graph_def.node if node.name == node_name)
    return [None if dim.size < 0 else dim.size for dim in node.attr["shape"].shape.dim]
