"""A neuron mask as per-layer low-rank updates of the down projection, built from the model's own weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CnaLocalError
from ..multipliers import check_multiplier

if TYPE_CHECKING:
    from ..maskfile import NeuronMask


class ExportError(CnaLocalError):
    """A mask cannot be exported for this model, or the adapter cannot be written."""


@dataclass
class LayerUpdate:
    """W_down -> W_down + B @ A for one layer: A (r, n_ff) one-hot rows, B (n_embd, r) scaled columns."""

    layer: int
    neurons: np.ndarray  # int [r]
    factors: np.ndarray  # float32 [r]: what the mask scales each neuron by at M0
    a: np.ndarray  # float32 [r, n_ff]
    b: np.ndarray  # float32 [n_embd, r]

    @property
    def rank(self) -> int:
        return len(self.neurons)


def multiplier_at_scale(scale: float, m0: float) -> float:
    """The mask multiplier an adapter exported at M0 runs at, at adapter scale `scale`."""
    return 1.0 + scale * (m0 - 1.0)


def low_rank_updates(mask: "NeuronMask", down_weights, m0: float | None = None) -> list[LayerUpdate]:
    """One LayerUpdate per layer the mask steers at M0 (default: the mask's own multiplier).

    down_weights(layer) -> float32 [n_embd, n_ff], the model's down projection as it computes it
    (a GGUF's weights dequantized, or the Hugging Face weights).
    """
    from ..runtime.composition import compose

    m0 = check_multiplier(mask.default_multiplier(False) if m0 is None else m0, what="the export multiplier (M0)")
    if m0 == 1.0:
        raise ExportError("at multiplier 1 the mask changes nothing, so there is no adapter to export. "
                          "Fix: export at the strength scale 1 should mean, e.g. --multiplier -1.5 or 0.")
    layers, neurons, factors = compose([mask], [m0])  # neurons whose factor is exactly 1 add nothing
    updates = []
    for layer in np.unique(layers):
        rows = layers == layer
        idx, f = neurons[rows].astype(np.int64), factors[rows].astype(np.float32)
        w = np.asarray(down_weights(int(layer)), dtype=np.float32)
        if w.shape[1] != mask.n_ff or w.shape[0] != mask.n_embd:
            raise ExportError(f"layer {layer}'s down projection is {w.shape[0]} x {w.shape[1]}, but the mask was made for "
                              f"n_embd {mask.n_embd}, n_ff {mask.n_ff}. Fix: export with the model the mask was made for.")
        a = np.zeros((len(idx), mask.n_ff), np.float32)
        a[np.arange(len(idx)), idx] = 1.0
        b = (w[:, idx] * (f - 1.0)[None, :]).astype(np.float32)
        updates.append(LayerUpdate(int(layer), idx, f, a, b))
    return updates


def gguf_down_weights(path: Path):
    """down_weights(layer) for a GGUF model: `blk.N.ffn_down.weight`, dequantized by gguf-py."""
    from ..gguf_index import GGUFIndex, GGUFIndexError

    try:
        index = GGUFIndex(path)
    except GGUFIndexError as exc:  # a damaged model file
        raise ExportError(str(exc)) from exc
    tensors = index.tensors

    def down(layer: int) -> np.ndarray:
        name = f"blk.{layer}.ffn_down.weight"
        if name not in tensors:
            experts = f"blk.{layer}.ffn_down_exps.weight" in tensors
            why = ("it is a mixture-of-experts layer (ffn_down_exps): its neurons belong to experts, not to one dense "
                   "down projection a LoRA can change") if experts else "the model has no dense down projection there"
            raise ExportError(f"{path.name} has no tensor {name}: {why}. "
                              "Fix: export masks of dense layers, for a dense model.")
        return index.array(name)

    return down


def hf_down_weights(directory: Path):
    """down_weights(layer) for a Hugging Face model directory: `model.layers.N.mlp.down_proj.weight`."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ExportError(f"{directory} has no .safetensors files. Fix: pass a Hugging Face model directory saved "
                          "as safetensors, or the model's .gguf file.")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as sf:
            for key in sf.keys():
                where[key] = f

    def down(layer: int) -> np.ndarray:
        key = f"model.layers.{layer}.mlp.down_proj.weight"
        if key not in where:
            raise ExportError(f"{directory} has no weight {key}: layer {layer} has no dense down projection "
                              "(a mixture-of-experts layer?). Fix: export masks of dense layers, for a dense model.")
        with safe_open(str(where[key]), framework="pt") as sf:  # bf16 weights need torch to be read
            return sf.get_tensor(key).float().numpy()

    return down
