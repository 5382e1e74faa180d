"""A GGUF model's metadata and tensor table, read by ggml's own C parser.

`gguf.GGUFReader` builds a numpy view per element of every metadata array, which on a 150k-token
vocabulary takes 6-8 s (two string arrays of 150k entries) before a single tensor can be found. The
patched libllama that cna-local ships links ggml's `gguf_init_from_file`, which parses the same header in
milliseconds (it is what llama.cpp itself loads models with). The tensors' data is read through a numpy
memory map and dequantized by `gguf.quants`, so only the header parsing changes hands. Where the library
cannot be bound, `gguf.GGUFReader` does the same job, slower.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CnaLocalError


class GGUFIndexError(CnaLocalError):
    """The file is not a readable GGUF model file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    type: int  # ggml type (gguf.GGMLQuantizationType value)
    shape: tuple[int, ...]  # numpy order: the reverse of ggml's ne
    offset: int  # absolute, in bytes from the start of the file
    nbytes: int


# enum gguf_type (ggml/include/gguf.h) -> numpy dtype for the scalar and numeric-array values we read.
_GGUF_NUMERIC = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


_lib = None


def _library():
    """ggml's gguf_* functions, through the libllama llama_cpp loaded (libggml-base is its dependency)."""
    global _lib
    if _lib is None:
        import llama_cpp.llama_cpp as llama

        lib, vp, i64, sz = llama._lib, ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
        for name, args, res in [
            ("gguf_init_from_file", [ctypes.c_char_p, _InitParams], vp), ("gguf_free", [vp], None),
            ("gguf_get_data_offset", [vp], sz), ("gguf_get_n_kv", [vp], i64),
            ("gguf_get_key", [vp, i64], ctypes.c_char_p),
            ("gguf_get_kv_type", [vp, i64], ctypes.c_int), ("gguf_get_arr_type", [vp, i64], ctypes.c_int),
            ("gguf_get_val_data", [vp, i64], vp), ("gguf_get_val_str", [vp, i64], ctypes.c_char_p),
            ("gguf_get_arr_n", [vp, i64], sz), ("gguf_get_arr_data", [vp, i64], vp),
            ("gguf_get_n_tensors", [vp], i64), ("gguf_get_tensor_name", [vp, i64], ctypes.c_char_p),
            ("gguf_get_tensor_offset", [vp, i64], sz), ("gguf_get_tensor_type", [vp, i64], ctypes.c_int),
            ("gguf_get_tensor_size", [vp, i64], sz), ("gguf_get_tensor_ne", [vp, i64], ctypes.POINTER(i64)),
        ]:
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
        _lib = lib
    return _lib


class GGUFIndex:
    """Metadata values and tensor entries of one GGUF file; `array(name)` reads a tensor as float32."""

    def __init__(self, path: str | Path, *, use_library: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFIndexError(f"{self.path} does not exist or is not a file. Fix: pass a .gguf model file.")
        self.values: dict[str, object] = {}
        self.tensors: dict[str, TensorEntry] = {}
        lib = None
        if use_library:
            try:
                lib = _library()
            except (ImportError, AttributeError, OSError):
                lib = None  # no usable libllama here: the pure-Python reader below
        if lib is not None:
            self._read_with_ggml(lib)
        else:
            self._read_with_gguf_py()
        try:
            self._data = np.memmap(self.path, mode="r")
        except (OSError, ValueError) as exc:
            raise GGUFIndexError(f"{self.path} could not be mapped ({exc}).") from exc
        for t in self.tensors.values():
            if t.offset + t.nbytes > len(self._data):
                raise GGUFIndexError(f"{self.path} is truncated: tensor {t.name} ends at byte {t.offset + t.nbytes} of "
                                     f"{len(self._data)}. Fix: download or rebuild the model file.")

    def _read_with_ggml(self, lib) -> None:
        ctx = lib.gguf_init_from_file(os.fsencode(self.path), _InitParams(True, None))
        if not ctx:
            raise GGUFIndexError(f"{self.path} is not a readable GGUF model file (ggml's parser refused it; llama.cpp's "
                                 "log says why). Fix: pass a .gguf model file.")
        try:
            for k in range(int(lib.gguf_get_n_kv(ctx))):
                self._value(lib, ctx, k)
            base = int(lib.gguf_get_data_offset(ctx))
            for i in range(int(lib.gguf_get_n_tensors(ctx))):
                name = lib.gguf_get_tensor_name(ctx, i).decode("utf-8", "replace")
                ne = lib.gguf_get_tensor_ne(ctx, i)
                dims = [int(ne[d]) for d in range(4)]
                while len(dims) > 1 and dims[-1] == 1:
                    dims.pop()
                self.tensors[name] = TensorEntry(name, int(lib.gguf_get_tensor_type(ctx, i)), tuple(reversed(dims)),
                                                 base + int(lib.gguf_get_tensor_offset(ctx, i)),
                                                 int(lib.gguf_get_tensor_size(ctx, i)))
        finally:
            lib.gguf_free(ctx)

    def _value(self, lib, ctx, k: int) -> None:
        """Keep key k's value when it is a number, a string or an array of numbers (string arrays, the
        vocabulary, are what makes a header slow to read and are not needed here)."""
        key = lib.gguf_get_key(ctx, k).decode("utf-8", "replace")
        kind = lib.gguf_get_kv_type(ctx, k)
        if kind == _GGUF_STRING:
            self.values[key] = lib.gguf_get_val_str(ctx, k).decode("utf-8", "replace")
        elif kind in _GGUF_NUMERIC:
            dtype = np.dtype(_GGUF_NUMERIC[kind])
            raw = ctypes.string_at(lib.gguf_get_val_data(ctx, k), dtype.itemsize)
            self.values[key] = np.frombuffer(raw, dtype)[0].item()
        elif kind == _GGUF_ARRAY and lib.gguf_get_arr_type(ctx, k) in _GGUF_NUMERIC:
            dtype = np.dtype(_GGUF_NUMERIC[lib.gguf_get_arr_type(ctx, k)])
            n = int(lib.gguf_get_arr_n(ctx, k))
            raw = ctypes.string_at(lib.gguf_get_arr_data(ctx, k), n * dtype.itemsize)
            self.values[key] = np.frombuffer(raw, dtype).tolist()

    def _read_with_gguf_py(self) -> None:
        import gguf

        try:
            reader = gguf.GGUFReader(self.path)
        except Exception as exc:  # GGUFReader raises ValueError, struct.error, IndexError... on junk
            raise GGUFIndexError(f"{self.path} is not a readable GGUF model file ({exc}). Fix: pass a .gguf model file.") from exc
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or not field.types or field.types[0] == gguf.GGUFValueType.ARRAY and (
                    len(field.types) < 2 or field.types[1] == gguf.GGUFValueType.STRING):
                continue
            self.values[key] = field.contents()
        for t in reader.tensors:
            self.tensors[t.name] = TensorEntry(t.name, int(t.tensor_type), tuple(reversed([int(d) for d in t.shape])),
                                               int(t.data_offset), int(t.n_bytes))

    def value(self, key: str):
        """A metadata value (number, string or list of numbers), or None when the file lacks it."""
        return self.values.get(key)

    def array(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 in numpy order ([rows, columns] for a matrix), dequantized by gguf-py."""
        import gguf

        t = self.tensors[name]
        raw = self._data[t.offset:t.offset + t.nbytes]
        kind = gguf.GGMLQuantizationType(t.type)
        if kind == gguf.GGMLQuantizationType.F32:
            return np.asarray(raw.view(np.float32)).reshape(t.shape)
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
        rows = raw.reshape(-1, t.shape[-1] // block * type_size)
        return np.asarray(gguf.quants.dequantize(rows, kind), np.float32).reshape(t.shape)
