"""Neuron steering on a llama_cpp.Llama: set a mask, change its strength live, clear it.

The mask lives in the llama context (patches/): per steered layer an [n_ff] F32 scale tensor on the
layer's device, multiplied into the FFN activation right before the down projection, at every position.
Changing only the multiplier rewrites those tensors in place (no model reload, no graph rebuild).
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

from ..errors import CnaLocalError
from ..maskfile import check_multiplier
from . import binding

if TYPE_CHECKING:
    import llama_cpp

    from ..maskfile import NeuronMask


class SteeringError(CnaLocalError):
    """A mask or multiplier that cannot be applied to this model."""


@dataclass(frozen=True)
class ModelShape:
    arch: str
    n_layer: int
    n_ff: int | None  # None when the model's FFN width varies by layer (the C side still checks)
    n_expert: int


def model_shape(llm: "llama_cpp.Llama") -> ModelShape:
    meta = llm.metadata
    arch = meta.get("general.architecture", "?")
    n_layer = int(binding._llama_cpp.llama_model_n_layer(llm.model))
    try:
        n_ff = int(meta[f"{arch}.feed_forward_length"])
    except (KeyError, ValueError):
        n_ff = None
    n_expert = int(meta.get(f"{arch}.expert_count", 0) or 0)
    return ModelShape(arch, n_layer, n_ff, n_expert)


def check_entries(shape: ModelShape, layers: np.ndarray, neurons: np.ndarray, scales: np.ndarray) -> None:
    """Raise SteeringError naming the first bad entry; mirrors the C checks with better messages."""
    if shape.n_expert > 0:
        raise SteeringError(
            f"this {shape.arch} model has a mixture-of-experts FFN ({shape.n_expert} experts); "
            "neuron masks support dense FFNs only (Llama, Qwen2, Mistral, Gemma, Phi-3 ...)"
        )
    if not (len(layers) == len(neurons) == len(scales)):
        raise SteeringError(f"layers, neurons and scales differ in length ({len(layers)}, {len(neurons)}, {len(scales)})")
    if len(layers) == 0:
        raise SteeringError("the mask is empty: it names no neuron. Use clear() to switch steering off.")
    bad = np.flatnonzero((layers < 0) | (layers >= shape.n_layer))
    if bad.size:
        i = int(bad[0])
        raise SteeringError(f"entry {i}: layer {layers[i]} is out of range: the model has {shape.n_layer} layers (0-{shape.n_layer - 1})")
    if shape.n_ff is not None:
        bad = np.flatnonzero((neurons < 0) | (neurons >= shape.n_ff))
        if bad.size:
            i = int(bad[0])
            raise SteeringError(
                f"entry {i}: neuron {neurons[i]} of layer {layers[i]} is out of range: "
                f"the model's FFN has {shape.n_ff} neurons (0-{shape.n_ff - 1})"
            )
    bad = np.flatnonzero(~np.isfinite(scales))
    if bad.size:
        i = int(bad[0])
        raise SteeringError(f"entry {i}: scale {scales[i]} for layer {layers[i]}, neuron {neurons[i]} is not a finite number")
    keys = layers.astype(np.int64) * (1 << 32) + neurons.astype(np.int64)
    uniq, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        k = int(uniq[counts > 1][0])
        raise SteeringError(f"layer {k >> 32}, neuron {k & 0xFFFFFFFF} appears more than once in the mask")


class NeuronSteering:
    """The neuron mask of one `llama_cpp.Llama`.

    **Mutates the Llama**: every change resets its evaluated-token cache (`Llama.reset()`), since KV state
    computed under the old strength would otherwise be reused for the prompt prefix.
    Not thread-safe: do not change the mask while another thread generates with the same Llama.
    """

    def __init__(self, llm: "llama_cpp.Llama"):
        self._lib = binding.lib()
        self._llm = llm
        self.shape = model_shape(llm)
        self.mask: "NeuronMask | None" = None
        self._fingerprint = None
        self._multiplier: float | None = None

    # -- the sparse form the C API takes

    def set_entries(self, layers, neurons, scales) -> None:
        """Scale neuron `neurons[i]` of layer `layers[i]` by `scales[i]`; replaces any previous mask."""
        layers = np.ascontiguousarray(layers, dtype=np.int32)
        neurons = np.ascontiguousarray(neurons, dtype=np.int32)
        scales = np.ascontiguousarray(scales, dtype=np.float32)
        check_entries(self.shape, layers, neurons, scales)
        i32p = ctypes.POINTER(ctypes.c_int32)
        rc = self._lib.llama_set_neuron_mask(
            self._llm.ctx,
            layers.ctypes.data_as(i32p),
            neurons.ctypes.data_as(i32p),
            scales.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
            len(layers),
        )
        if rc != 0:
            raise SteeringError(f"llama.cpp refused the neuron mask: {binding.STATUS_MESSAGES.get(rc, f'error {rc}')}")
        self._invalidate_cache()

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read the mask back from llama.cpp: (layers, neurons, scales), sorted by layer then neuron."""
        n = self._lib.llama_get_neuron_mask(self._llm.ctx, None, None, None, 0)
        layers = np.zeros(n, np.int32)
        neurons = np.zeros(n, np.int32)
        scales = np.zeros(n, np.float32)
        if n:
            i32p = ctypes.POINTER(ctypes.c_int32)
            self._lib.llama_get_neuron_mask(
                self._llm.ctx,
                layers.ctypes.data_as(i32p),
                neurons.ctypes.data_as(i32p),
                scales.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                n,
            )
        return layers, neurons, scales

    # -- mask files

    def set_mask(self, mask: "NeuronMask", multiplier: float | None = None) -> None:
        """Apply a NeuronMask (see cna_local.maskfile) at `multiplier` (default: the mask's own)."""
        from ..fingerprint import fingerprint_from_gguf

        if self._fingerprint is None:  # the model file does not change under a live Llama
            self._fingerprint = fingerprint_from_gguf(self._llm.model_path)
        mask.check_matches(self._fingerprint, model_label=self._llm.model_path)
        m = check_multiplier(mask.multiplier if multiplier is None else multiplier)
        self.set_entries(mask.layers, mask.neurons, mask.scales_for(m))
        self.mask, self._multiplier = mask, m

    @property
    def multiplier(self) -> float | None:
        """The strength of the current mask file (None when off or set from raw entries)."""
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        if self.mask is None:
            raise SteeringError("no mask is set: call set_mask(mask) first")
        m = check_multiplier(value)
        # same layers, new values: llama.cpp rewrites the scale tensors in place
        self.set_entries(self.mask.layers, self.mask.neurons, self.mask.scales_for(m))
        self._multiplier = m

    @contextmanager
    def scaled(self, multiplier: float) -> Iterator["NeuronSteering"]:
        """Temporarily use another multiplier: `with steering.scaled(0): ...`."""
        old = self._multiplier
        self.multiplier = multiplier
        try:
            yield self
        finally:
            self.multiplier = old

    def clear(self) -> None:
        """Switch steering off; the model runs exactly as without the patch."""
        self._lib.llama_clear_neuron_mask(self._llm.ctx)
        self.mask, self._multiplier = None, None
        self._invalidate_cache()

    @property
    def active(self) -> bool:
        return self._lib.llama_get_neuron_mask(self._llm.ctx, None, None, None, 0) > 0

    def _invalidate_cache(self) -> None:
        # llama-cpp-python reuses the evaluated prefix between calls; that state was computed under the
        # previous mask, so drop it (and any prompt cache) to make the new strength apply to every token
        self._llm.reset()
        if getattr(self._llm, "cache", None) is not None:
            self._llm.set_cache(None)
