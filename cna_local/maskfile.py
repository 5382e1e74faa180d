"""The neuron-mask file: which MLP neurons to scale, in a GGUF that llama.cpp's C gguf API can read.

Format v1 follows llama.cpp's adapter conventions (like LoRA GGUFs):

  general.type          = "adapter"
  general.architecture  = base model architecture (e.g. "qwen2")
  general.name          = a label for the mask
  adapter.type          = "neuron_mask"
  adapter.neuron_mask.version            u32  = 1
  adapter.neuron_mask.multiplier         f32  default multiplier (0 ablates, 1 = no change)
  adapter.neuron_mask.n_layer / n_ff / n_embd   u32  shape of the base model
  adapter.neuron_mask.model_fingerprint  str  hex sha256 of the model's norm weights (fingerprint.py)
  adapter.neuron_mask.model_name         str
  adapter.neuron_mask.prompts_sha256     str  hash of the positive and negative prompt sets
  adapter.neuron_mask.selection          str  JSON of the selection parameters
  adapter.neuron_mask.tool_version       str  cna_local.__version__
  adapter.neuron_mask.n_neurons          u32  total entries over all layers
  adapter.neuron_mask.schedule           str  optional (version 2): the default steering schedule,
                                              "prompt" or "generation" (cna_local.schedules); absent = "all"
  adapter.neuron_mask.calibration        str  optional: JSON of how the default multiplier was chosen
  adapter.neuron_mask.gate_threshold     f32  optional (version 3): the gate fires when the weighted sum of
                                              its neurons at the prompt's last token is >= this
  adapter.neuron_mask.gate               str  with it: JSON of how the gate was fitted (cna_local.gate)
  adapter.neuron_mask.static_multiplier  f32  optional (version 3): the default multiplier when the gate is
                                              not used (every prompt steered); `multiplier` is then the
                                              default through the gate
  adapter.neuron_mask.gate_threshold_strengthen
                                         f32  optional (version 5): where the gate fires when the multiplier
                                              is above 1 (strengthening), >= gate_threshold

A file whose schedule is "all" is written as version 1, so older readers still load it; one with
another schedule is version 2, which older readers refuse by name instead of steering every position. A
file with a gate on the mask's neurons is version 3, which older readers refuse by name instead of
steering every prompt; one whose gate reads neurons of its own is version 4, which version 3 readers
refuse by name instead of reading the wrong neurons; one whose gate has a strengthening threshold is
version 5, which version 4 readers refuse by name instead of strengthening through the looser threshold.

  per layer with neurons (named after the weight they act on):
  blk.{il}.ffn_down.weight.neuron_idx    I32 [n]  neuron indices, strictly ascending
  blk.{il}.ffn_down.weight.neuron_score  F32 [n]  attribution scores
  blk.{il}.ffn_down.weight.neuron_scale  F32 [n]  optional per-neuron scales t (all layers or none): at
                                                 multiplier m neuron i is scaled by m + (1 - m) * t_i
                                                 (t_i at m = 0, 1 at m = 1); without them, by m
  blk.{il}.ffn_down.weight.neuron_gate   F32 [n]  optional (version 3, all layers or none): the gate's
                                                 weight on each neuron

  per layer where a version 4 gate reads neurons (its own; the mask need not hold any there):
  blk.{il}.ffn_down.weight.neuron_gate_idx     I32 [g]  the neurons it reads, strictly ascending
  blk.{il}.ffn_down.weight.neuron_gate_weight  F32 [g]  its weight on each
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CnaLocalError
from .fingerprint import Fingerprint
from .gate import Gate, GateError
from .multipliers import check_multiplier
from .schedules import SCHEDULES, check_schedule

FORMAT_VERSION = 5
ADAPTER_TYPE = "neuron_mask"
KEY_PREFIX = f"adapter.{ADAPTER_TYPE}."
GGUF_MAGIC = b"GGUF"
_TENSOR_RE = re.compile(r"^blk\.(\d+)\.ffn_down\.weight\.neuron_(idx|score|scale|gate|gate_idx|gate_weight)$")
_MASK_KINDS = ("idx", "score", "scale", "gate")
_GATE_KINDS = ("gate_idx", "gate_weight")


class MaskFileError(CnaLocalError):
    """A mask file is unreadable, of the wrong kind, or inconsistent."""


class MaskMismatchError(CnaLocalError):
    """A mask was made for a different model than the one it is applied to."""


def tensor_name(layer: int, kind: str) -> str:
    return f"blk.{layer}.ffn_down.weight.neuron_{kind}"


@dataclass
class NeuronMask:
    arch: str
    n_layer: int
    n_ff: int
    n_embd: int
    fingerprint: str
    model_name: str
    layers: np.ndarray  # int32 [N], sorted by (layer, neuron)
    neurons: np.ndarray  # int32 [N]
    scores: np.ndarray  # float32 [N]
    multiplier: float = 0.0
    scales: np.ndarray | None = None  # float32 [N] per-neuron scales at multiplier 0 (see scales_for), or None
    meta: dict = field(default_factory=dict)  # name, prompts_sha256, selection (dict), tool_version, version, calibration
    schedule: str = "all"  # the default steering schedule (cna_local.schedules)
    gate: Gate | None = None  # steer only the prompts it fires on (cna_local.gate); weights in entry order
    static_multiplier: float | None = None  # with a gate: the default when it is not used (None: `multiplier`)

    def __post_init__(self):
        self.layers = np.asarray(self.layers, np.int32)
        self.neurons = np.asarray(self.neurons, np.int32)
        self.scores = np.asarray(self.scores, np.float32)
        if self.scales is not None:
            self.scales = np.asarray(self.scales, np.float32)
        order = np.lexsort((self.neurons, self.layers))
        if not np.array_equal(order, np.arange(len(order))):
            self.layers, self.neurons, self.scores = self.layers[order], self.neurons[order], self.scores[order]
            if self.scales is not None:
                self.scales = self.scales[order]
            if self.gate is not None and not self.gate.own:
                self.gate = self.gate.with_weights(self.gate.weights[order])
        if self.gate is not None and not self.gate.own and len(self.gate.weights) != len(self.layers):
            raise MaskFileError(f"the gate weighs {len(self.gate.weights)} neurons but the mask names {len(self.layers)}.")
        self.multiplier = check_multiplier(self.multiplier)
        if self.static_multiplier is not None:
            if self.gate is None:
                raise MaskFileError("a static multiplier belongs to a gated mask; this mask has no gate.")
            self.static_multiplier = check_multiplier(self.static_multiplier, what="the static multiplier")
        _validate_entries(self, source="this mask")

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def model_fingerprint(self) -> Fingerprint:
        return Fingerprint(self.arch, self.n_layer, self.n_ff, self.n_embd, self.fingerprint)

    def scales_for(self, multiplier: float | None = None) -> np.ndarray:
        """The factor each neuron is scaled by at `multiplier` (default: the mask's own).

        A plain mask scales every neuron by the multiplier m. A mask with per-neuron scales t_i scales
        neuron i by m + (1 - m) * t_i: t_i at m = 0, exactly 1 (unsteered) at m = 1, on the same line
        beyond; a plain mask is the case t_i = 0, so m means the same for both.
        """
        m = check_multiplier(self.multiplier if multiplier is None else multiplier)
        if self.scales is None:
            return np.full(len(self.layers), m, np.float32)
        return (m + (1.0 - m) * self.scales.astype(np.float64)).astype(np.float32)

    def default_multiplier(self, gated: bool) -> float:
        """The mask's own strength through its gate (gated) or on every prompt."""
        return self.multiplier if gated or self.static_multiplier is None else self.static_multiplier

    @property
    def version(self) -> int:
        """The oldest format that holds this mask: 5 with a gate that has a strengthening threshold, 4 with a
        gate on neurons of its own, 3 with a gate on the mask's, 2 with a schedule other than all, else 1."""
        if self.gate is not None:
            if self.gate.threshold_strengthen is not None:
                return 5
            return 4 if self.gate.own else 3
        return 1 if self.schedule == "all" else 2

    def per_layer_counts(self) -> dict[int, int]:
        layers, counts = np.unique(self.layers, return_counts=True)
        return {int(l): int(c) for l, c in zip(layers, counts)}

    def check_matches(self, fingerprint: Fingerprint, model_label: str = "this model") -> None:
        """Raise MaskMismatchError unless the mask was made for the model with this fingerprint."""
        mine = self.model_fingerprint
        if mine == fingerprint:
            return
        if (mine.arch, mine.n_layer, mine.n_ff, mine.n_embd) != (fingerprint.arch, fingerprint.n_layer, fingerprint.n_ff, fingerprint.n_embd):
            what = "has a different shape than"
        else:
            what = "has the same shape but different weights than"
        raise MaskMismatchError(
            f"the mask was made for {self.model_name or 'another model'} ({mine.describe()}), "
            f"but {model_label} ({fingerprint.describe()}) {what} that model. "
            f"Fix: re-run `cna-local attribute --model <this model>` to make a mask for it."
        )

    # -- file I/O

    def save(self, path: str | Path) -> Path:
        import gguf

        from . import __version__

        path = Path(path)
        meta = dict(self.meta)
        writer = gguf.GGUFWriter(str(path), arch=self.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(str(meta.get("name") or f"neuron mask for {self.model_name}"))
        writer.add_string(gguf.Keys.Adapter.TYPE, ADAPTER_TYPE)
        check_schedule(self.schedule)
        writer.add_uint32(KEY_PREFIX + "version", self.version)
        writer.add_float32(KEY_PREFIX + "multiplier", float(self.multiplier))
        writer.add_uint32(KEY_PREFIX + "n_layer", self.n_layer)
        writer.add_uint32(KEY_PREFIX + "n_ff", self.n_ff)
        writer.add_uint32(KEY_PREFIX + "n_embd", self.n_embd)
        writer.add_string(KEY_PREFIX + "model_fingerprint", self.fingerprint)
        writer.add_string(KEY_PREFIX + "model_name", self.model_name)
        writer.add_string(KEY_PREFIX + "prompts_sha256", str(meta.get("prompts_sha256", "")))
        writer.add_string(KEY_PREFIX + "selection", json.dumps(meta.get("selection", {}), sort_keys=True))
        writer.add_string(KEY_PREFIX + "tool_version", str(meta.get("tool_version") or __version__))
        writer.add_uint32(KEY_PREFIX + "n_neurons", len(self.layers))
        if self.schedule != "all":
            writer.add_string(KEY_PREFIX + "schedule", self.schedule)
        if meta.get("calibration"):
            writer.add_string(KEY_PREFIX + "calibration", json.dumps(meta["calibration"], sort_keys=True))
        if self.gate is not None:
            writer.add_float32(KEY_PREFIX + "gate_threshold", float(self.gate.threshold))
            if self.gate.threshold_strengthen is not None:
                writer.add_float32(KEY_PREFIX + "gate_threshold_strengthen", float(self.gate.threshold_strengthen))
            writer.add_string(KEY_PREFIX + "gate", json.dumps(self.gate.info, sort_keys=True))
            if self.static_multiplier is not None:
                writer.add_float32(KEY_PREFIX + "static_multiplier", float(self.static_multiplier))
        for layer in np.unique(self.layers):
            rows = self.layers == layer
            writer.add_tensor(tensor_name(int(layer), "idx"), self.neurons[rows].astype(np.int32))
            writer.add_tensor(tensor_name(int(layer), "score"), self.scores[rows].astype(np.float32))
            if self.scales is not None:
                writer.add_tensor(tensor_name(int(layer), "scale"), self.scales[rows].astype(np.float32))
            if self.gate is not None and not self.gate.own:
                writer.add_tensor(tensor_name(int(layer), "gate"), self.gate.weights[rows].astype(np.float32))
        if self.gate is not None and self.gate.own:
            for layer in np.unique(self.gate.layers):
                rows = self.gate.layers == layer
                writer.add_tensor(tensor_name(int(layer), "gate_idx"), self.gate.neurons[rows].astype(np.int32))
                writer.add_tensor(tensor_name(int(layer), "gate_weight"), self.gate.weights[rows].astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    @classmethod
    def load(cls, path: str | Path) -> "NeuronMask":
        return read_mask(path)


def _validate_entries(mask: NeuronMask, source: str) -> None:
    for what in ("n_layer", "n_ff", "n_embd"):
        if not 0 < getattr(mask, what) < 2**31:
            raise MaskFileError(f"{source}: {what} is {getattr(mask, what)}, not a model dimension. Fix: re-run `cna-local attribute`.")
    n = len(mask.layers)
    if not (len(mask.neurons) == len(mask.scores) == n) or (mask.scales is not None and len(mask.scales) != n):
        raise MaskFileError(f"{source}: layers, neurons, scores (and scales) differ in length.")
    if n == 0:
        raise MaskFileError(f"{source} names no neuron. Fix: re-run `cna-local attribute` with a larger --top-fraction/--top-k.")
    bad = np.flatnonzero((mask.layers < 0) | (mask.layers >= mask.n_layer))
    if bad.size:
        raise MaskFileError(f"{source}: layer {mask.layers[bad[0]]} does not exist in a {mask.n_layer}-layer model. Fix: re-run `cna-local attribute`.")
    bad = np.flatnonzero((mask.neurons < 0) | (mask.neurons >= mask.n_ff))
    if bad.size:
        i = bad[0]
        raise MaskFileError(f"{source}: neuron {mask.neurons[i]} of layer {mask.layers[i]} is out of range 0-{mask.n_ff - 1} (n_ff {mask.n_ff}). Fix: re-run `cna-local attribute`.")
    same = (np.diff(mask.layers) == 0) & (np.diff(mask.neurons) == 0)
    if same.any():
        i = np.flatnonzero(same)[0]
        raise MaskFileError(f"{source}: neuron {mask.neurons[i]} of layer {mask.layers[i]} appears twice. Fix: re-run `cna-local attribute`.")
    if not np.isfinite(mask.scores).all():
        i = np.flatnonzero(~np.isfinite(mask.scores))[0]
        raise MaskFileError(f"{source}: the score of neuron {mask.neurons[i]} in layer {mask.layers[i]} is {mask.scores[i]}. Fix: re-run `cna-local attribute`.")
    if mask.scales is not None and not np.isfinite(mask.scales).all():
        i = np.flatnonzero(~np.isfinite(mask.scales))[0]
        raise MaskFileError(f"{source}: the scale of neuron {mask.neurons[i]} in layer {mask.layers[i]} is {mask.scales[i]}; scales must be finite.")
    gate = mask.gate
    if gate is not None and gate.own:
        bad = np.flatnonzero((gate.layers >= mask.n_layer) | (gate.neurons >= mask.n_ff))
        if bad.size:
            i = bad[0]
            raise MaskFileError(f"{source}: the gate reads neuron {gate.neurons[i]} of layer {gate.layers[i]}, which a "
                                f"{mask.n_layer}-layer model with n_ff {mask.n_ff} does not have. Fix: re-run `cna-local attribute`.")


def _bounded_reader_class():
    import gguf

    class BoundedReader(gguf.GGUFReader):
        """GGUFReader that refuses to read past the end of the file.

        GGUFReader slices its memory map without a bounds check, so a damaged count (an array of 2^40
        entries) makes it loop, appending empty slices, until memory runs out (found by
        tools/fuzz_masks.py). Every read here is checked first, so a lying count fails at the first read
        beyond the end, within one pass over the file.
        """

        def _get(self, offset, dtype, count=1, override_order=None):
            count = int(count)
            end = int(offset) + np.dtype(dtype).itemsize * count
            if offset < 0 or count < 0 or end > len(self.data):
                raise ValueError(f"{count} x {np.dtype(dtype).name} at offset {offset} runs past the end of the "
                                 f"file ({len(self.data)} bytes)")
            return super()._get(offset, dtype, count, override_order)

    return BoundedReader


def _open_reader(path: Path):
    if not path.is_file():
        raise MaskFileError(f"mask file {path} does not exist. Fix: check the path, or make one with `cna-local attribute --out {path.name}`.")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise MaskFileError(f"{path} is not a neuron-mask file: it is not GGUF at all (it starts with {magic!r}, not b'GGUF'). Fix: pass a mask made by `cna-local attribute`.")
    try:
        reader = _bounded_reader_class()(path)
    except Exception as exc:  # GGUFReader raises ValueError, IndexError, struct errors... on a damaged file
        raise MaskFileError(f"{path} is a damaged or truncated GGUF file ({type(exc).__name__}: {exc}). Fix: make the mask again with `cna-local attribute`.") from exc
    # llama.cpp's C reader needs every tensor's data padded to the alignment;
    # GGUFReader accepts a file cut inside the last padding, so check here.
    size = path.stat().st_size
    for t in reader.tensors:
        end = t.data_offset + -(-int(t.n_bytes) // reader.alignment) * reader.alignment
        if end > size:
            raise MaskFileError(f"{path} is truncated: tensor '{t.name}' needs bytes up to {end} but the file has {size}. Fix: make the mask again with `cna-local attribute`.")
    return reader


def _contents(reader, key: str, path: Path):
    """A key's value, or None when absent; text that is not UTF-8 is a damaged file, not a crash."""
    f = reader.get_field(key)
    if f is None:
        return None
    try:
        return f.contents()
    except (UnicodeDecodeError, ValueError, IndexError) as exc:
        raise MaskFileError(f"{path}: the value of '{key}' cannot be read ({type(exc).__name__}: {exc}); the file is damaged. "
                            "Fix: make the mask again with `cna-local attribute`.") from None


def _describe_other_gguf(reader, path: Path) -> str:
    gtype = _contents(reader, "general.type", path)
    adapter = _contents(reader, "adapter.type", path)
    if gtype == "adapter" and adapter:
        return f"{path} is a {adapter} adapter (adapter.type = {adapter!r}), not a neuron mask"
    if gtype in (None, "model") and any(t.name == "token_embd.weight" for t in reader.tensors):
        return f"{path} is a model GGUF, not a neuron mask. Fix: pass it as --model, and the mask file as MASK"
    return f"{path} is a GGUF file of type {gtype!r}, not a neuron mask"


def _value_types():
    import gguf

    v = gguf.GGUFValueType
    integers = {v.UINT8, v.INT8, v.UINT16, v.INT16, v.UINT32, v.INT32, v.UINT64, v.INT64}
    return {int: integers, float: {v.FLOAT32, v.FLOAT64}, str: {v.STRING}}


_TYPE_NAMES = {int: "an integer", float: "a float", str: "a string"}


def read_mask(path: str | Path) -> NeuronMask:
    """Read and validate a mask file; every problem raises MaskFileError naming the file."""
    import gguf

    path = Path(path)
    reader = _open_reader(path)
    value_types = _value_types()

    if _contents(reader, "general.type", path) != "adapter" or _contents(reader, "adapter.type", path) != ADAPTER_TYPE:
        message = _describe_other_gguf(reader, path)
        raise MaskFileError(message if "Fix:" in message else message + ". Fix: pass a mask made by `cna-local attribute`.")

    def value(key: str, kind: type, default=None):
        f = reader.get_field(key)
        if f is None and default is not None:
            return default
        if f is None:
            raise MaskFileError(f"{path} has no '{key}' entry; the mask file is incomplete. Fix: make it again with `cna-local attribute`.")
        stored = f.types[0] if len(f.types) == 1 else None  # an array has more than one type
        if stored not in value_types[kind]:
            found = "an array" if f.types and f.types[0] == gguf.GGUFValueType.ARRAY else getattr(stored, "name", "?")
            raise MaskFileError(f"{path}: '{key}' is stored as {found}, not as {_TYPE_NAMES[kind]}; the file is damaged or was "
                                "not written by cna-local. Fix: make it again with `cna-local attribute`.")
        return kind(_contents(reader, key, path))

    version = value(KEY_PREFIX + "version", int)
    if version < 1:
        raise MaskFileError(f"{path} says it is a version {version} mask; mask versions start at 1. The file is damaged. Fix: make it again with `cna-local attribute`.")
    if version > FORMAT_VERSION:
        raise MaskFileError(f"{path} is a version {version} mask; this cna-local reads up to version {FORMAT_VERSION}. Fix: upgrade cna-local.")

    def json_object(name: str) -> dict:
        """An optional string entry holding a JSON object ({} when absent)."""
        try:
            obj = json.loads(value(KEY_PREFIX + name, str, default="") or "{}")
        except json.JSONDecodeError:
            raise MaskFileError(f"{path}: the {name} entry is not valid JSON. Fix: make the mask again with `cna-local attribute`.") from None
        if not isinstance(obj, dict):
            raise MaskFileError(f"{path}: the {name} entry is {type(obj).__name__} JSON, not an object. Fix: make the mask again with `cna-local attribute`.")
        return obj

    selection = json_object("selection")
    schedule = value(KEY_PREFIX + "schedule", str, default="all")
    if schedule not in SCHEDULES:
        raise MaskFileError(f"{path}: the schedule entry is {schedule!r}, not one of {', '.join(SCHEDULES)}. Fix: make the mask again with `cna-local attribute`.")
    if version < 2 and schedule != "all":
        raise MaskFileError(f"{path} is a version {version} mask with a schedule entry, which only version 2 has; the file is damaged. Fix: make it again.")
    calibration = json_object("calibration")
    gate_info = json_object("gate")
    has_threshold = reader.get_field(KEY_PREFIX + "gate_threshold") is not None
    strengthen = (value(KEY_PREFIX + "gate_threshold_strengthen", float)
                  if reader.get_field(KEY_PREFIX + "gate_threshold_strengthen") is not None else None)
    static_multiplier = (value(KEY_PREFIX + "static_multiplier", float)
                         if reader.get_field(KEY_PREFIX + "static_multiplier") is not None else None)

    # Informational strings are optional: GGUFWriter silently skips empty strings.
    per_layer: dict[int, dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        match = _TENSOR_RE.match(tensor.name)
        if match is None:
            raise MaskFileError(f"{path} holds an unexpected tensor '{tensor.name}'; it is not a neuron mask of version {FORMAT_VERSION}.")
        layer, kind = int(match.group(1)), match.group(2)
        expected = "I32" if kind in ("idx", "gate_idx") else "F32"
        if tensor.tensor_type.name != expected:
            raise MaskFileError(f"{path}: tensor '{tensor.name}' is {tensor.tensor_type.name}, expected {expected}. Fix: make the mask again with `cna-local attribute`.")
        if len(tensor.shape) != 1:
            raise MaskFileError(f"{path}: tensor '{tensor.name}' has {len(tensor.shape)} dimensions ({[int(d) for d in tensor.shape]}); "
                                "mask tensors are 1-D. Fix: make the mask again with `cna-local attribute`.")
        if kind in per_layer.get(layer, {}):
            raise MaskFileError(f"{path} holds tensor '{tensor.name}' twice. Fix: make the mask again with `cna-local attribute`.")
        per_layer.setdefault(layer, {})[kind] = np.array(tensor.data).reshape(-1)

    gate_parts = {layer: {k: parts.pop(k) for k in _GATE_KINDS if k in parts} for layer, parts in per_layer.items()}
    gate_parts = {layer: parts for layer, parts in gate_parts.items() if parts}
    per_layer = {layer: parts for layer, parts in per_layer.items() if parts}
    layers, neurons, scores, scales, gates = [], [], [], [], []
    with_scales = {layer for layer, parts in per_layer.items() if "scale" in parts}
    if with_scales and with_scales != set(per_layer):
        raise MaskFileError(f"{path}: some layers have neuron_scale tensors and others do not; it must be all layers or none.")
    with_gate = {layer for layer, parts in per_layer.items() if "gate" in parts}
    if with_gate and with_gate != set(per_layer):
        raise MaskFileError(f"{path}: the gate is damaged: some layers have neuron_gate tensors and others do not; it must be "
                            "all layers or none. Fix: make the mask again with `cna-local attribute`, or load it with the gate off.")
    if (with_gate or gate_parts or has_threshold or gate_info or static_multiplier is not None) and version < 3:
        raise MaskFileError(f"{path} is a version {version} mask with gate entries, which only version 3 and later have; the file "
                            "is damaged. Fix: make it again with `cna-local attribute`.")
    if gate_parts and version < 4:
        raise MaskFileError(f"{path} is a version {version} mask with neuron_gate_idx tensors, which only version 4 has; the "
                            "gate is damaged. Fix: make the mask again with `cna-local attribute`.")
    if version == 3 and not (with_gate and has_threshold):
        what = "no neuron_gate tensors" if not with_gate else "no gate_threshold entry"
        raise MaskFileError(f"{path} is a version 3 (gated) mask with {what}: the gate is damaged. "
                            "Fix: make the mask again with `cna-local attribute`.")
    if version == 4 and (with_gate or not gate_parts or not has_threshold):
        what = ("neuron_gate tensors, which belong to a version 3 gate" if with_gate else
                "no neuron_gate_idx tensors" if not gate_parts else "no gate_threshold entry")
        raise MaskFileError(f"{path} is a version 4 (gated) mask with {what}: the gate is damaged. "
                            "Fix: make the mask again with `cna-local attribute`.")
    if strengthen is not None and version < 5:
        raise MaskFileError(f"{path} is a version {version} mask with a gate_threshold_strengthen entry, which only version 5 "
                            "has; the gate is damaged. Fix: make the mask again with `cna-local attribute`.")
    if version >= 5 and (not (with_gate or gate_parts) or (with_gate and gate_parts) or not has_threshold
                         or strengthen is None):
        what = ("no gate tensors" if not (with_gate or gate_parts) else
                "both neuron_gate and neuron_gate_idx tensors" if with_gate and gate_parts else
                "no gate_threshold entry" if not has_threshold else "no gate_threshold_strengthen entry")
        raise MaskFileError(f"{path} is a version {version} (gated) mask with {what}: the gate is damaged. "
                            "Fix: make the mask again with `cna-local attribute`.")
    own_layers, own_neurons, own_weights = [], [], []
    for layer in sorted(gate_parts):
        parts = gate_parts[layer]
        if set(parts) != set(_GATE_KINDS):
            raise MaskFileError(f"{path}: layer {layer} has only {', '.join('neuron_' + k for k in parts)} of the gate's two "
                                "tensors: the gate is damaged. Fix: make the mask again with `cna-local attribute`.")
        idx = parts["gate_idx"]
        if len(parts["gate_weight"]) != len(idx):
            raise MaskFileError(f"{path}: the gate tensors of layer {layer} differ in length: the gate is damaged.")
        if np.any(np.diff(idx) <= 0):
            raise MaskFileError(f"{path}: the gate's neuron indices of layer {layer} are not strictly ascending: the gate is "
                                "damaged. Fix: make the mask again with `cna-local attribute`.")
        own_layers.append(np.full(len(idx), layer, np.int32))
        own_neurons.append(idx.astype(np.int32))
        own_weights.append(parts["gate_weight"].astype(np.float32))
    for layer in sorted(per_layer):
        parts = per_layer[layer]
        for kind in ("idx", "score"):
            if kind not in parts:
                other = "score" if kind == "idx" else "idx"
                raise MaskFileError(f"{path}: layer {layer} has a neuron_{other} tensor but no neuron_{kind} tensor. Fix: make the mask again with `cna-local attribute`.")
        idx = parts["idx"]
        if any(len(parts[k]) != len(idx) for k in parts):
            raise MaskFileError(f"{path}: the tensors of layer {layer} differ in length.")
        if np.any(np.diff(idx) < 0):
            raise MaskFileError(f"{path}: the neuron indices of layer {layer} are not sorted ascending.")
        layers.append(np.full(len(idx), layer, np.int32))
        neurons.append(idx.astype(np.int32))
        scores.append(parts["score"].astype(np.float32))
        if with_scales:
            scales.append(parts["scale"].astype(np.float32))
        if with_gate:
            gates.append(parts["gate"].astype(np.float32))

    n_neurons = value(KEY_PREFIX + "n_neurons", int)
    total = sum(len(x) for x in neurons)
    if n_neurons != total:
        raise MaskFileError(f"{path} says it holds {n_neurons} neurons but its tensors hold {total}; the file is damaged. Fix: make it again.")
    empty = np.zeros(0, np.int32)
    meta = {
        "version": version,
        "name": value("general.name", str, default=""),
        "prompts_sha256": value(KEY_PREFIX + "prompts_sha256", str, default=""),
        "selection": selection,
        "tool_version": value(KEY_PREFIX + "tool_version", str, default=""),
    }
    if calibration:
        meta["calibration"] = calibration
    gate = None
    if with_gate or gate_parts:
        try:
            if gate_parts:
                gate = Gate(np.concatenate(own_weights), value(KEY_PREFIX + "gate_threshold", float), gate_info,
                            layers=np.concatenate(own_layers), neurons=np.concatenate(own_neurons),
                            threshold_strengthen=strengthen)
            else:
                gate = Gate(np.concatenate(gates), value(KEY_PREFIX + "gate_threshold", float), gate_info,
                            threshold_strengthen=strengthen)
        except GateError as exc:
            raise MaskFileError(f"{path}: the gate is damaged: {str(exc).replace('this gate: ', '')}. "
                                "Fix: make the mask again with `cna-local attribute`.") from None
    try:
        return NeuronMask(
            arch=value("general.architecture", str),
            n_layer=value(KEY_PREFIX + "n_layer", int),
            n_ff=value(KEY_PREFIX + "n_ff", int),
            n_embd=value(KEY_PREFIX + "n_embd", int),
            fingerprint=value(KEY_PREFIX + "model_fingerprint", str),
            model_name=value(KEY_PREFIX + "model_name", str, default=""),
            layers=np.concatenate(layers) if layers else empty,
            neurons=np.concatenate(neurons) if neurons else empty,
            scores=np.concatenate(scores) if scores else empty.astype(np.float32),
            multiplier=value(KEY_PREFIX + "multiplier", float),
            scales=np.concatenate(scales) if with_scales else None,
            meta=meta,
            schedule=schedule,
            gate=gate,
            static_multiplier=static_multiplier,
        )
    except MaskFileError as exc:
        raise MaskFileError(str(exc).replace("this mask", str(path), 1)) from None
    except CnaLocalError as exc:  # a bad multiplier
        raise MaskFileError(f"{path}: {exc}") from None
