"""Reading weight files in the Keras 2 HDF5 layout, the one ``Model.save_weights("x.h5")`` wrote.

The root group's ``layer_names`` attribute lists every layer in model order. Each layer has a
group of that name whose ``weight_names`` attribute lists its weights in order, and each weight is
a dataset at ``<layer name>/<weight name>`` inside that group. Names may contain "/", which HDF5
turns into nested groups. A whole-model ``.h5`` file keeps the same layout under
``model_weights``. Attributes longer than the 64 KB HDF5 header limit were split by Keras into
``<name>0``, ``<name>1`` and so on.
"""

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np


class WeightsFileError(ValueError):
    """The file is not HDF5, is damaged, or does not have the Keras 2 weights layout."""


@dataclass(frozen=True)
class WeightRecord:
    """One weight of a layer: its full name in the file and its shape."""

    name: str
    shape: tuple[int, ...]

    @property
    def short_name(self) -> str:
        """The name without the layer prefixes and the ":0" suffix, such as "kernel" or "gamma"."""
        return self.name.rsplit("/", 1)[-1].split(":", 1)[0]


@dataclass(frozen=True)
class LayerRecord:
    """One layer of the file with its weights in file order."""

    name: str
    weights: tuple[WeightRecord, ...]


@dataclass(frozen=True)
class FileLayout:
    """Every layer of a weights file in order, with the ``backend`` attribute if present."""

    layers: tuple[LayerRecord, ...]
    backend: str | None

    @property
    def weighted_layers(self) -> tuple[LayerRecord, ...]:
        """The layers that have weights, in order: the ones that Keras 2 paired with model layers."""
        return tuple(layer for layer in self.layers if layer.weights)


def read_layout(path: str | Path) -> FileLayout:
    """Read the layer names, weight names and shapes of a Keras 2 HDF5 weights file, without values.

    Raises:
        WeightsFileError: the file cannot be opened as HDF5 (not HDF5, truncated, unreadable) or
            lacks the Keras 2 attributes, groups or datasets.
    """
    try:
        with h5py.File(path, "r") as file:
            root = _weights_root(file)
            layers = []
            for layer_name in _string_list_attribute(root, "layer_names"):
                group = _member(root, layer_name, h5py.Group)
                weights = tuple(
                    WeightRecord(weight_name, tuple(int(n) for n in _member(group, weight_name, h5py.Dataset).shape))
                    for weight_name in _string_list_attribute(group, "weight_names", required=False)
                )
                layers.append(LayerRecord(layer_name, weights))
            backend = root.attrs.get("backend")
    except OSError as err:
        raise WeightsFileError(_one_line(err)) from err
    if isinstance(backend, bytes):
        backend = backend.decode("utf8")
    return FileLayout(tuple(layers), None if backend is None else str(backend))


def read_values(path: str | Path, layout: FileLayout) -> list[list[np.ndarray]]:
    """Read every weight of the layers with weights, in file order, as NumPy arrays.

    Args:
        path: the file that ``layout`` was read from.
        layout: the value of ``read_layout(path)``.

    Returns:
        One list per entry of ``layout.weighted_layers``, with one array per weight.

    Raises:
        WeightsFileError: a dataset cannot be read, for example in a damaged file.
    """
    try:
        with h5py.File(path, "r") as file:
            root = _weights_root(file)
            return [
                [np.asarray(root[layer.name][weight.name]) for weight in layer.weights]
                for layer in layout.weighted_layers
            ]
    except (OSError, KeyError) as err:
        raise WeightsFileError(_one_line(err)) from err


def _weights_root(file: h5py.File) -> h5py.Group:
    """Return the group holding ``layer_names``: the root, or ``model_weights`` in a whole-model file."""
    if not _has_attribute(file, "layer_names") and isinstance(file.get("model_weights"), h5py.Group):
        return file["model_weights"]
    return file


def _has_attribute(group: h5py.Group, name: str) -> bool:
    return name in group.attrs or f"{name}0" in group.attrs


def _string_list_attribute(group: h5py.Group, name: str, required: bool = True) -> list[str]:
    """Read a list-of-strings attribute, joining the chunks that Keras 2 wrote for long lists."""
    if name in group.attrs:
        chunks = [group.attrs[name]]
    else:
        chunks = []
        while f"{name}{len(chunks)}" in group.attrs:
            chunks.append(group.attrs[f"{name}{len(chunks)}"])
    if not chunks:
        if required:
            raise WeightsFileError(f"no {name!r} attribute in group {group.name!r}, so it is not a Keras 2 weights file")
        return []
    return [item.decode("utf8") if isinstance(item, bytes) else str(item) for chunk in chunks for item in chunk]


def _member(group: h5py.Group, name: str, kind: type):
    """Return ``group[name]``, raising WeightsFileError unless it exists and is of type ``kind``."""
    member = group.get(name)
    if not isinstance(member, kind):
        kind_name = "group" if kind is h5py.Group else "dataset"
        raise WeightsFileError(f"{kind_name} {name!r} listed in {group.name!r} is missing")
    return member


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
