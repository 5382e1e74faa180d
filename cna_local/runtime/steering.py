"""Neuron steering on a llama_cpp.Llama: set masks, change their strength live, clear them.

The mask lives in the llama context (patches/): per layer an [n_ff] F32 scale tensor on the layer's
device, multiplied into the FFN activation right before the down projection, at every position, in the
layers that carry steered neurons. Changing only the strength rewrites those tensors in place (no model
reload, no graph rebuild).

One record says what is set: `NeuronSteering.state`, a `SteeringState` (the masks and multipliers it was
made from, or raw entries, and the entries llama.cpp holds). Everything else (`mask`, `multiplier`,
`scaled()`, saving and restoring around an evaluation) is derived from it.
"""

from __future__ import annotations

import ctypes
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from ..errors import CnaLocalError
from ..multipliers import check_multiplier
from . import binding
from ..schedules import ScheduleError, check_schedule
from .composition import compose

if TYPE_CHECKING:
    import llama_cpp

    from ..gate import Gate
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


def _layer_list(layers: Sequence[int]) -> str:
    """0-3, 5, 7-9"""
    runs: list[list[int]] = []
    for il in sorted(set(int(x) for x in layers)):
        if runs and il == runs[-1][1] + 1:
            runs[-1][1] = il
        else:
            runs.append([il, il])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def check_entries(shape: ModelShape, layers: np.ndarray, neurons: np.ndarray, scales: np.ndarray,
                  reachable: np.ndarray | None = None) -> None:
    """Raise SteeringError naming the first bad entry; mirrors the C checks with better messages.

    reachable: per layer, whether llama.cpp builds its FFN where the mask applies (None: not checked).
    """
    if not (len(layers) == len(neurons) == len(scales)):
        raise SteeringError(f"layers, neurons and scales differ in length ({len(layers)}, {len(neurons)}, {len(scales)})")
    if len(layers) == 0:
        raise SteeringError("the mask is empty: it names no neuron. Use clear() to switch steering off.")
    bad = np.flatnonzero((layers < 0) | (layers >= shape.n_layer))
    if bad.size:
        i = int(bad[0])
        raise SteeringError(f"entry {i}: layer {layers[i]} is out of range: the model has {shape.n_layer} layers (0-{shape.n_layer - 1})")
    if reachable is not None and not reachable[layers].all():
        check_reachable(shape, reachable, layers)
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


def check_reachable(shape: ModelShape, reachable: np.ndarray, layers: np.ndarray) -> None:
    """Raise SteeringError, by architecture and layer, when `layers` include layers llama.cpp cannot steer."""
    wanted = np.unique(layers[~reachable[layers]])
    if not wanted.size:
        return
    ok = np.flatnonzero(reachable)
    these = f"layer{'s' if len(wanted) > 1 else ''} {_layer_list(wanted)}"
    if shape.n_ff == 0:
        why = f"this {shape.arch} model has no FFN (MLP) layers, so there are no neurons for a mask to scale"
    elif not ok.size:
        kind = f"a mixture-of-experts model ({shape.n_expert} experts)" if shape.n_expert > 0 else \
            "a model whose FFNs llama.cpp builds outside build_ffn, where the mask applies"
        why = f"this {shape.arch} model is {kind}: none of its {shape.n_layer} layers is one dense FFN a neuron mask can reach"
    elif shape.n_expert > 0:
        why = (f"this {shape.arch} model is a mixture-of-experts model ({shape.n_expert} experts) and {these} "
               f"route{'' if len(wanted) > 1 else 's'} tokens through experts, not through one dense FFN: "
               "a neuron mask cannot reach them")
    else:
        why = f"this {shape.arch} model builds the FFN of {these} outside llama.cpp's build_ffn, where the mask applies"
    if ok.size:
        fix = (f"Fix: neuron masks can steer only its dense layers ({_layer_list(ok)}); "
               "make a mask that names only those (`cna-local attribute --layers`).")
    else:
        fix = "Fix: neuron masks need a dense-FFN model (Llama, Qwen2, Mistral, Gemma, Phi-3 ...)."
    raise SteeringError(f"{why}. {fix}")


@dataclass(frozen=True, eq=False)
class SteeringState:
    """What is set on a context: nothing, masks at multipliers, or raw entries.

    `masks`/`multipliers` say what the state was made from (empty for raw entries and for off);
    `layers`/`neurons`/`scales` are what llama.cpp holds (empty when off). Two states with the same
    `key` run the same computation, so KV state cached under one is valid under the other.
    """

    masks: tuple["NeuronMask", ...] = ()
    multipliers: tuple[float, ...] = ()
    layers: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    neurons: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    scales: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    schedule: str = "all"  # which positions are steered (cna_local.schedules)
    gate: "Gate | None" = None  # steer only the prompts it fires on (cna_local.gate); weights in entry order

    @property
    def off(self) -> bool:
        return len(self.layers) == 0

    @property
    def key(self) -> str:
        """A digest of the entries llama.cpp holds ("" when off)."""
        if self.off:
            return ""
        h = hashlib.sha256(self.schedule.encode())
        if self.gate is not None:
            h.update(f"gate {self.gate.threshold!r} {self.gate.threshold_strengthen!r}".encode() + self.gate.weights.tobytes())
            if self.gate.own:
                h.update(self.gate.layers.tobytes() + self.gate.neurons.tobytes())
        for array in (self.layers, self.neurons, self.scales):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()


OFF = SteeringState()


class NeuronSteering:
    """The neuron masks of one `llama_cpp.Llama`.

    **Mutates the Llama**: every change of what is computed resets its evaluated-token cache
    (`Llama.reset()`), since KV state computed under the old strength would otherwise be reused for the
    prompt prefix; setting what is already set keeps it.
    Not thread-safe: do not change the mask while another thread generates with the same Llama.
    """

    def __init__(self, llm: "llama_cpp.Llama"):
        self._lib = binding.lib()
        self._llm = llm
        self.shape = model_shape(llm)
        self._fingerprint = None
        self._reachable: np.ndarray | None = None
        self._state: SteeringState = OFF
        self._phase_on = True  # whether llama.cpp holds the state's scales (True) or ones, see phase()

    # -- what is set

    @property
    def state(self) -> SteeringState:
        """What is set now; hand it to `restore()` to come back to it."""
        return self._state

    @property
    def masks(self) -> tuple["NeuronMask", ...]:
        return self._state.masks

    @property
    def mask(self) -> "NeuronMask | None":
        """The mask file that is set, when exactly one is (None when off, for raw entries or several masks)."""
        return self._state.masks[0] if len(self._state.masks) == 1 else None

    @property
    def schedule(self) -> str:
        """Which positions the mask is applied at (cna_local.schedules); "all" when off."""
        return self._state.schedule

    @property
    def gate(self) -> "Gate | None":
        """The gate in use (None: every prompt is steered)."""
        return self._state.gate

    @property
    def multipliers(self) -> tuple[float, ...]:
        return self._state.multipliers

    @property
    def multiplier(self) -> float | None:
        """The strength of the one mask file that is set (None otherwise); setting it changes it live."""
        return self._state.multipliers[0] if len(self._state.multipliers) == 1 else None

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        if len(self._state.masks) != 1:
            what = "no mask is set: call set_mask(mask) first" if not self._state.masks else \
                f"{len(self._state.masks)} masks are set: use set_multipliers([...]) with one value each"
            raise SteeringError(what)
        self.set_masks(self._state.masks, [check_multiplier(value)], self._state.schedule, self._state.gate is not None)

    @property
    def active(self) -> bool:
        """Whether llama.cpp holds a mask now (read from the context)."""
        return self._lib.llama_get_neuron_mask(self._llm.ctx, None, None, None, 0) > 0

    # -- changing it

    def set_mask(self, mask: "NeuronMask", multiplier: float | None = None, schedule: str | None = None,
                 gate: bool | None = None) -> None:
        """Apply a NeuronMask (see cna_local.maskfile) at `multiplier` (default: the mask's own), on the
        positions of `schedule` (default: the mask's own), on the prompts its gate fires on (gate=None: when
        the mask has a gate; False: every prompt; True: the mask's gate, which it must have)."""
        self.set_masks([mask], [multiplier], schedule, gate)

    def set_masks(self, masks: Sequence["NeuronMask"], multipliers: Sequence[float | None] | None = None,
                  schedule: str | None = None, gate: bool | None = None) -> None:
        """Apply several masks at once, each at its multiplier (None: its own); where they name the same
        neuron, their factors multiply. All at multiplier 1 is exactly the unsteered model. The schedule
        (None: the masks' own, which must then agree) applies to all of them. A gate needs one mask
        (gate=None uses it when that mask has one)."""
        from ..fingerprint import fingerprint_from_gguf

        masks = tuple(masks)
        if not masks:
            raise SteeringError("no mask given. Fix: pass at least one mask, or call clear() to switch steering off.")
        multipliers = [None] * len(masks) if multipliers is None else list(multipliers)
        if len(multipliers) != len(masks):
            raise SteeringError(f"{len(masks)} masks but {len(multipliers)} multipliers: give one multiplier per mask.")
        if self._fingerprint is None:  # the model file does not change under a live Llama
            self._fingerprint = fingerprint_from_gguf(self._llm.model_path)
        for mask in masks:
            mask.check_matches(self._fingerprint, model_label=self._llm.model_path)
        gated = self._gate_for(masks, gate)
        # a mask's own strength depends on whether its gate is used (maskfile.NeuronMask.default_multiplier)
        values = tuple(check_multiplier(m.default_multiplier(gated is not None) if v is None else v)
                       for m, v in zip(masks, multipliers))
        if schedule is None:
            own = {getattr(m, "schedule", "all") for m in masks}
            if len(own) > 1:
                raise SteeringError(f"the masks have different default schedules ({', '.join(sorted(own))}). "
                                    "Fix: pass schedule= to say which positions to steer.")
            schedule = own.pop()
        try:
            check_schedule(schedule)
        except ScheduleError as exc:
            raise SteeringError(str(exc)) from None
        layers, neurons, scales = compose(masks, values)
        self._apply(SteeringState(masks, values, layers, neurons, scales, schedule, gated))

    @staticmethod
    def _gate_for(masks: Sequence["NeuronMask"], gate: bool | None) -> "Gate | None":
        own = [getattr(m, "gate", None) for m in masks]
        if gate is None:
            return own[0] if len(masks) == 1 else None
        if not gate:
            return None
        if len(masks) != 1:
            raise SteeringError(f"a gate needs one mask, and {len(masks)} are set. Fix: set one mask, or gate=False.")
        if own[0] is None:
            raise SteeringError("this mask has no gate. Fix: make one with `cna-local attribute` (it fits a gate by "
                                "default), or steer every prompt (gate off).")
        return own[0]

    def set_gate(self, on: bool) -> None:
        """Use the mask's gate (on) or steer every prompt (off); the rest of what is set stays."""
        s = self._state
        if s.off or not s.masks:
            raise SteeringError("no mask is set: call set_mask(mask) first, then choose its gate")
        gate = self._gate_for(s.masks, bool(on))
        was = s.gate is not None
        if all(v == m.default_multiplier(was) for m, v in zip(s.masks, s.multipliers)):
            # at the mask's own strength for one mode: take its own strength for the other
            self.set_masks(s.masks, None, s.schedule, bool(on))
            return
        self._apply(SteeringState(s.masks, s.multipliers, s.layers, s.neurons, s.scales, s.schedule, gate), checked=True)

    def set_multipliers(self, multipliers: Sequence[float | None]) -> None:
        """New strengths for the masks that are set, one per mask, in their order."""
        if not self._state.masks:
            raise SteeringError("no mask is set: call set_mask(mask) or set_masks([...]) first")
        self.set_masks(self._state.masks, multipliers, self._state.schedule, self._state.gate is not None)

    def set_schedule(self, schedule: str) -> None:
        """Apply what is set on the positions of another schedule (cna_local.schedules)."""
        try:
            check_schedule(schedule)
        except ScheduleError as exc:
            raise SteeringError(str(exc)) from None
        if self._state.off:
            raise SteeringError("no mask is set: call set_mask(mask) first, then choose its schedule")
        s = self._state
        self._apply(SteeringState(s.masks, s.multipliers, s.layers, s.neurons, s.scales, schedule, s.gate), checked=True)

    def set_entries(self, layers, neurons, scales) -> None:
        """Scale neuron `neurons[i]` of layer `layers[i]` by `scales[i]`; replaces what is set."""
        layers = np.ascontiguousarray(layers, dtype=np.int32)
        neurons = np.ascontiguousarray(neurons, dtype=np.int32)
        scales = np.ascontiguousarray(scales, dtype=np.float32)
        check_entries(self.shape, layers, neurons, scales, self.reachable())
        order = np.lexsort((neurons, layers))
        self._apply(SteeringState((), (), layers[order], neurons[order], scales[order]), checked=True)

    def clear(self) -> None:
        """Switch steering off; the model runs exactly as without the patch."""
        self._apply(OFF)

    def restore(self, state: SteeringState) -> None:
        """Set again what `state` (from `.state`) describes."""
        self._apply(state)

    @contextmanager
    def scaled(self, *multipliers: float) -> Iterator["NeuronSteering"]:
        """Temporarily run the masks that are set at other strengths: `with steering.scaled(0): ...`."""
        saved = self._state
        self.set_multipliers(multipliers)
        try:
            yield self
        finally:
            self.restore(saved)

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

    def reachable(self) -> np.ndarray:
        """Per layer, whether llama.cpp builds its FFN where a mask applies (found once per context)."""
        if self._reachable is None:
            out = np.zeros(self.shape.n_layer, np.uint8)
            rc = self._lib.llama_get_neuron_mask_reach(
                self._llm.ctx, out.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), len(out))
            if rc < 0:
                raise SteeringError(f"llama.cpp could not find the layers a mask reaches: {binding.status_message(rc)}")
            self._reachable = out[:rc].astype(bool)
        return self._reachable

    # -- the one place that talks to llama.cpp

    def phase(self, on: bool) -> None:
        """For a schedule other than "all": have llama.cpp hold the state's scales (on) or ones (off: bit
        for bit the unsteered computation, the same graph) for the positions decoded next. Leaves the
        state and the cached KV prefix alone: the runtime calls this between the parts of one request."""
        state = self._state
        if state.off or on == self._phase_on:
            return
        scales = state.scales if on else np.ones_like(state.scales)
        i32p = ctypes.POINTER(ctypes.c_int32)
        rc = self._lib.llama_set_neuron_mask(self._llm.ctx, state.layers.ctypes.data_as(i32p),
                                             state.neurons.ctypes.data_as(i32p),
                                             scales.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), len(state.layers))
        if rc != 0:
            raise SteeringError(f"llama.cpp refused the neuron mask: {binding.status_message(rc)}")
        self._phase_on = on

    def _apply(self, state: SteeringState, checked: bool = False) -> None:
        if state.key == self._state.key:
            self._state = state  # the same computation: cached KV state stays valid
            self.phase(True)
            return
        if state.off:
            self._lib.llama_clear_neuron_mask(self._llm.ctx)
        else:
            if not checked:  # composed masks: their entries meet this model's layers only here
                check_entries(self.shape, state.layers, state.neurons, state.scales, self.reachable())
            i32p = ctypes.POINTER(ctypes.c_int32)
            rc = self._lib.llama_set_neuron_mask(
                self._llm.ctx,
                state.layers.ctypes.data_as(i32p),
                state.neurons.ctypes.data_as(i32p),
                state.scales.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                len(state.layers),
            )
            if rc != 0:
                raise SteeringError(f"llama.cpp refused the neuron mask: {binding.status_message(rc)}")
        self._state = state
        self._phase_on = True
        self._invalidate_cache()

    def _invalidate_cache(self) -> None:
        # llama-cpp-python reuses the evaluated prefix between calls; that state was computed under the
        # previous mask, so drop it (and any prompt cache) to make the new strength apply to every token
        self._llm.reset()
        if getattr(self._llm, "cache", None) is not None:
            self._llm.set_cache(None)
