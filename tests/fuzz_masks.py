"""Generated broken mask files, one way of lying per mutation, for the fuzz test and tools/fuzz_masks.py.

The files are built byte by byte with a small GGUF serializer (GGUFWriter refuses to write most of these:
duplicated tensors, wrong counts, values of the wrong type), starting from a valid mask for the model under
test and then broken in one way that hypothesis chooses:

  truncate      cut at an offset in the header, the key/values, the tensor infos, the padding or the data
  bitflip       one to eight bits flipped anywhere
  huge_count    a tensor, key/value, array or string count set to up to 2^64 - 1
  wrong_type    a key stored with another GGUF value type (string for a number, array for a string ...)
  dup_key / dup_tensor / missing_tensor / extra_tensor / wrong_dtype / bad_shape
  unsorted / repeated / out_of_range   neuron indices
  nonfinite     NaN or infinite scores, scales or multiplier
  fingerprint   another model's fingerprint, or another shape
  version       a future or nonsense format version
  other_kind    a LoRA adapter, a model, not GGUF at all, an empty file
  none          the valid file (it must load, print and apply)
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
# ggml tensor types
T_F32, T_F16, T_I8, T_I16, T_I32, T_I64, T_F64 = 0, 1, 24, 25, 26, 27, 28
ALIGN = 32
PREFIX = "adapter.neuron_mask."

# hypothesis leans towards the first choices: the valid file comes last
MUTATIONS = ("bitflip", "truncate", "huge_count", "wrong_type", "dup_key", "dup_tensor", "missing_tensor",
             "extra_tensor", "wrong_dtype", "bad_shape", "unsorted", "repeated", "out_of_range", "nonfinite",
             "fingerprint", "version", "other_kind", "none")

_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
           I64: "<q", F64: "<d"}


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value) -> bytes:
    if vtype == STRING:
        return _str(value)
    if vtype == ARRAY:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_value(etype, v) for v in items)
    return struct.pack(_SCALAR[vtype], value)


@dataclass
class Tensor:
    name: str
    ttype: int
    data: bytes
    dims: list[int]


@dataclass
class Spec:
    """A GGUF file as lists, so that a mutation can break any part of it before it is serialized."""

    kvs: list[tuple[str, int, object]] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    n_kv: int | None = None  # header counts; None = the true ones
    n_tensors: int | None = None

    def kv(self, key: str):
        return next((i for i, (k, _, _) in enumerate(self.kvs) if k == key), None)

    def serialize(self) -> tuple[bytes, dict[str, int]]:
        """The file and where its sections start (offset classes for truncation)."""
        out = bytearray(b"GGUF" + struct.pack("<I", 3))
        out += struct.pack("<QQ", len(self.tensors) if self.n_tensors is None else self.n_tensors,
                           len(self.kvs) if self.n_kv is None else self.n_kv)
        marks = {"header": 0, "kv": len(out)}
        for key, vtype, value in self.kvs:
            out += _str(key) + struct.pack("<I", vtype) + _value(vtype, value)
        marks["tensor_info"] = len(out)
        offset = 0
        for t in self.tensors:
            out += _str(t.name) + struct.pack("<I", len(t.dims)) + b"".join(struct.pack("<Q", d) for d in t.dims)
            out += struct.pack("<IQ", t.ttype, offset)
            offset += -(-len(t.data) // ALIGN) * ALIGN
        marks["padding"] = len(out)
        out += b"\0" * (-len(out) % ALIGN)
        marks["data"] = len(out)
        for t in self.tensors:
            out += t.data + b"\0" * (-len(t.data) % ALIGN)
        marks["end"] = len(out)
        return bytes(out), marks


def _tensor(name: str, array: np.ndarray, ttype: int) -> Tensor:
    return Tensor(name, ttype, np.ascontiguousarray(array).tobytes(), [int(array.size)])


def valid_spec(model, layers, neurons, scores, multiplier, scales=None) -> Spec:
    """The spec of a valid mask file for `model` (a cna_local Fingerprint), as NeuronMask.save writes it."""
    spec = Spec(kvs=[
        ("general.architecture", STRING, model.arch),
        ("general.type", STRING, "adapter"),
        ("general.name", STRING, "fuzz"),
        ("adapter.type", STRING, "neuron_mask"),
        (PREFIX + "version", U32, 1),
        (PREFIX + "multiplier", F32, multiplier),
        (PREFIX + "n_layer", U32, model.n_layer),
        (PREFIX + "n_ff", U32, model.n_ff),
        (PREFIX + "n_embd", U32, model.n_embd),
        (PREFIX + "model_fingerprint", STRING, model.digest),
        (PREFIX + "model_name", STRING, "tiny"),
        (PREFIX + "prompts_sha256", STRING, "0" * 64),
        (PREFIX + "selection", STRING, '{"score": "selective"}'),
        (PREFIX + "tool_version", STRING, "fuzz"),
        (PREFIX + "n_neurons", U32, len(layers)),
    ])
    for layer in sorted(set(layers)):
        rows = [i for i, l in enumerate(layers) if l == layer]
        spec.tensors.append(_tensor(f"blk.{layer}.ffn_down.weight.neuron_idx", np.array([neurons[i] for i in rows], "<i4"), T_I32))
        spec.tensors.append(_tensor(f"blk.{layer}.ffn_down.weight.neuron_score", np.array([scores[i] for i in rows], "<f4"), T_F32))
        if scales is not None:
            spec.tensors.append(_tensor(f"blk.{layer}.ffn_down.weight.neuron_scale", np.array([scales[i] for i in rows], "<f4"), T_F32))
    return spec


@st.composite
def valid_specs(draw, model) -> Spec:
    per_layer = draw(st.lists(st.integers(0, 4), min_size=model.n_layer, max_size=model.n_layer))
    if sum(per_layer) == 0:
        per_layer[0] = 1
    layers, neurons = [], []
    for layer, count in enumerate(per_layer):
        picked = draw(st.lists(st.integers(0, model.n_ff - 1), min_size=count, max_size=count, unique=True))
        layers += [layer] * count
        neurons += sorted(picked)
    finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, width=32)
    scores = draw(st.lists(finite, min_size=len(layers), max_size=len(layers)))
    scales = draw(st.none() | st.lists(finite, min_size=len(layers), max_size=len(layers)))
    return valid_spec(model, layers, neurons, scores, draw(finite), scales)


def _nonfinite(draw):
    return draw(st.sampled_from([math.nan, math.inf, -math.inf]))


@st.composite
def mask_files(draw, model) -> tuple[str, bytes]:
    """(mutation, file bytes) for the model with fingerprint `model`."""
    spec = draw(valid_specs(model))
    kind = draw(st.sampled_from(MUTATIONS))
    data_tensors = [t for t in spec.tensors]
    pick_tensor = lambda: data_tensors[draw(st.integers(0, len(data_tensors) - 1))]  # noqa: E731

    if kind == "huge_count":
        where = draw(st.sampled_from(["n_tensors", "n_kv", "array", "string", "dims"]))
        huge = draw(st.sampled_from([2**31, 2**32 + 1, 2**48, 2**63, 2**64 - 1]))
        if where == "n_tensors":
            spec.n_tensors = huge
        elif where == "n_kv":
            spec.n_kv = huge
        elif where == "dims":
            pick_tensor().dims = [huge]
        else:
            data, _ = spec.serialize()
            key = PREFIX + "model_fingerprint" if where == "string" else None
            if key is None:  # an array value whose count lies
                spec.kvs.append((PREFIX + "extra", ARRAY, (U32, [1, 2, 3])))
                data, _ = spec.serialize()
                at = data.index(_str(PREFIX + "extra")) + len(_str(PREFIX + "extra")) + 8  # after the type and elem type
            else:
                at = data.index(_str(key)) + len(_str(key)) + 4
            return kind, data[:at] + struct.pack("<Q", huge) + data[at + 8:]
    elif kind == "wrong_type":
        i = draw(st.integers(0, len(spec.kvs) - 1))
        key, _, _ = spec.kvs[i]
        vtype, value = draw(st.sampled_from([
            (STRING, "1"), (STRING, "nan"), (F32, 1.0), (I32, -5), (U64, 2**40), (BOOL, True), (U8, 3),
            (ARRAY, (U32, [1, 2])), (ARRAY, (STRING, ["a", "b"])), (F64, -0.5),
        ]))
        spec.kvs[i] = (key, vtype, value)
    elif kind == "dup_key":
        spec.kvs.append(spec.kvs[draw(st.integers(0, len(spec.kvs) - 1))])
    elif kind == "dup_tensor":
        spec.tensors.append(pick_tensor())
    elif kind == "missing_tensor":
        spec.tensors.remove(pick_tensor())
    elif kind == "extra_tensor":
        name = draw(st.sampled_from(["blk.0.ffn_down.weight.lora_a", "token_embd.weight", "blk.x.ffn_down.weight.neuron_idx",
                                     "blk.99999999999.ffn_down.weight.neuron_idx", "blk.0.attn_q.weight.neuron_idx"]))
        spec.tensors.append(_tensor(name, np.zeros(2, "<f4"), T_F32))
    elif kind == "wrong_dtype":
        t = pick_tensor()
        t.ttype = draw(st.sampled_from([T_F16, T_I8, T_I16, T_I64, T_F64, T_F32, T_I32, 12, 99]))
    elif kind == "bad_shape":
        t = pick_tensor()
        t.dims = draw(st.sampled_from([[t.dims[0], 1], [1, t.dims[0]], [0], [t.dims[0] + 1], [max(t.dims[0] - 1, 0)], []]))
    elif kind in ("unsorted", "repeated", "out_of_range"):
        idx = [t for t in spec.tensors if t.name.endswith("neuron_idx")]
        t = idx[draw(st.integers(0, len(idx) - 1))]
        values = np.frombuffer(t.data, "<i4").copy()
        if kind == "unsorted" and len(values) > 1:
            values = values[::-1].copy()
        elif kind == "repeated" and len(values) > 1:
            values[1] = values[0]
        else:
            values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from([-1, model.n_ff, 2**31 - 1, -(2**31)]))
        t.data = values.tobytes()
    elif kind == "nonfinite":
        target = draw(st.sampled_from(["multiplier", "score", "scale"]))
        if target == "multiplier":
            spec.kvs[spec.kv(PREFIX + "multiplier")] = (PREFIX + "multiplier", F32, _nonfinite(draw))
        else:
            pool = [t for t in spec.tensors if t.name.endswith("neuron_" + target)] or \
                   [t for t in spec.tensors if t.name.endswith("neuron_score")]
            t = pool[draw(st.integers(0, len(pool) - 1))]
            values = np.frombuffer(t.data, "<f4").copy()
            values[draw(st.integers(0, len(values) - 1))] = _nonfinite(draw)
            t.data = values.tobytes()
    elif kind == "fingerprint":
        key, value = draw(st.sampled_from([
            (PREFIX + "model_fingerprint", "0" * 64), (PREFIX + "model_fingerprint", ""),
            (PREFIX + "n_layer", model.n_layer + 1), (PREFIX + "n_ff", model.n_ff * 2), (PREFIX + "n_embd", 7),
            ("general.architecture", "qwen2"),
        ]))
        i = spec.kv(key)
        spec.kvs[i] = (key, spec.kvs[i][1], value)
    elif kind == "version":
        spec.kvs[spec.kv(PREFIX + "version")] = (PREFIX + "version", U32, draw(st.sampled_from([0, 2, 7, 2**32 - 1])))
    elif kind == "other_kind":
        other = draw(st.sampled_from(["lora", "model", "text", "empty", "magic_only"]))
        if other == "lora":
            spec.kvs[spec.kv("adapter.type")] = ("adapter.type", STRING, "lora")
        elif other == "model":
            spec.kvs[spec.kv("general.type")] = ("general.type", STRING, "model")
        else:
            return kind, {"text": b"# not a mask\n", "empty": b"", "magic_only": b"GGUF"}[other]

    data, marks = spec.serialize()
    if kind == "truncate":
        section = draw(st.sampled_from(["header", "kv", "tensor_info", "padding", "data"]))
        start = marks[section]
        stop = {"header": marks["kv"], "kv": marks["tensor_info"], "tensor_info": marks["padding"],
                "padding": marks["data"], "data": marks["end"]}[section]
        if stop <= start:
            return kind, data[:start]
        return kind, data[:draw(st.integers(start, stop - 1))]
    if kind == "bitflip":
        flipped = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, len(flipped) - 1))
            flipped[pos] ^= 1 << draw(st.integers(0, 7))
        return kind, bytes(flipped)
    return kind, data


# ------------------------------------------------------------------------------------------ the harness

def _watchdog(seconds: int, kind: str, data: bytes):
    """A case that runs past `seconds` is a hang: save it and stop the process loudly. (An alarm signal
    is not enough: the exception it raises can land in a gc callback and be swallowed.)"""
    import hashlib
    import os
    import sys
    import tempfile
    import threading

    def fire():
        keep = os.path.join(tempfile.gettempdir(), f"{kind}-hang-{hashlib.sha256(data).hexdigest()[:12]}.gguf")
        with open(keep, "wb") as fh:
            fh.write(data)
        sys.stderr.write(f"\nHANG: a {kind} case ran past {seconds} s; the file is kept as {keep}\n")
        sys.stderr.flush()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    return timer


def run_case(kind: str, data: bytes, path, llm, seconds: int = 20) -> str:
    """Feed one file to NeuronMask.load, `cna-local inspect` and SteeredLlama.set_mask.

    Returns what happened ("applied", "refused by set_mask: X", "refused by load: X"); raises
    AssertionError for a crash (any exception that is not a CnaLocalError), an error without a message
    that names the file, or a load/inspect disagreement; a hang (over `seconds`) stops the process.
    """
    from click.testing import CliRunner

    from cna_local.cli import cli
    from cna_local.errors import CnaLocalError
    from cna_local.maskfile import NeuronMask

    path.write_bytes(data)
    watchdog = _watchdog(seconds, kind, data)
    watchdog.start()
    try:
        try:
            mask = NeuronMask.load(path)
            load_error = None
        except CnaLocalError as exc:
            mask, load_error = None, exc
        result = CliRunner().invoke(cli, ["inspect", str(path)])
        if mask is not None:
            try:
                llm.set_mask(mask)
                outcome = "applied"
            except CnaLocalError as exc:
                assert str(exc).strip(), f"{kind}: set_mask raised {type(exc).__name__} without a message"
                outcome = f"refused by set_mask: {type(exc).__name__}"
            finally:
                llm.steering.clear()
    finally:
        watchdog.cancel()

    if load_error is not None:
        message = str(load_error)
        assert str(path) in message, f"{kind}: the load error does not name the file: {message}"
        assert result.exit_code == 1 and result.exception is not None and isinstance(result.exception, SystemExit), \
            f"{kind}: inspect did not fail cleanly (exit {result.exit_code}, {result.exception!r}): {result.output[-500:]}"
        assert result.output.startswith("Error: ") and "Traceback" not in result.output, result.output[-500:]
        return f"refused by load: {type(load_error).__name__}"
    assert result.exit_code == 0, f"{kind}: the file loads but inspect failed: {result.output[-800:]}"
    return outcome
