"""ctypes declarations of the neuron-mask and FFN-capture functions that patches/ adds to libllama.

Bound on the library that `llama_cpp` already loaded (`llama_cpp.llama_cpp._lib`), so the mask and the
`Llama` objects share one libllama. A stock library lacks these symbols: we raise `PatchedLibraryError`
naming the library and the fix instead of segfaulting later.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import llama_cpp.llama_cpp as _llama_cpp

SYMBOLS = ("llama_set_neuron_mask", "llama_clear_neuron_mask", "llama_get_neuron_mask", "llama_get_neuron_mask_reach",
           "llama_ffn_capture_start", "llama_ffn_capture_stop", "llama_ffn_capture_status", "llama_ffn_capture_sizes",
           "llama_ffn_capture_take_rows", "llama_ffn_capture_sumsq")

# llama_ffn_capture_start flags (include/llama.h)
CAPTURE_ROWS = 1
CAPTURE_TOKEN_SUMSQ = 2
CAPTURE_NO_LOGITS = 4  # stop each decode after the last layer: its logits are undefined
CAPTURE_MESSAGES = {
    -1: "bad arguments",
    -2: "the context has an eval callback (cb_eval) of its own; the capture needs it",
    -3: "the last token of a sequence had no output (its logits were not requested)",
    -4: "sums of squares over all tokens need an output on every token",
    -5: "a captured tensor had an unexpected layout (see llama.cpp's log)",
    -6: "the capture is not started",
}

# Codes returned by llama_set_neuron_mask (include/llama.h in the patched tree).
STATUS_MESSAGES = {
    -1: "null arguments",
    -2: "empty mask (clear the mask to switch steering off)",
    -3: "a layer index is out of range",
    -4: "a neuron index is out of range",
    -5: "a scale is NaN or infinite",
    -6: "the same (layer, neuron) appears twice",
    -7: "no layer of this model builds its FFN through build_ffn (mixture-of-experts or custom FFN): a mask reaches nothing",
    -8: "could not allocate the mask's buffers on the model's device",
    -9: "a layer's FFN is not built through build_ffn (mixture-of-experts or custom FFN): the mask cannot reach it",
    -10: "the graph that finds the layers a mask can reach could not be built (see llama.cpp's log)",
}


def status_message(code: int) -> str:
    return STATUS_MESSAGES.get(code, f"error {code}")


class PatchedLibraryError(RuntimeError):
    """llama_cpp runs on a libllama without the cna-local neuron-mask patch."""


def library_path() -> Path:
    """The libllama file that llama_cpp loaded."""
    return Path(getattr(_llama_cpp._lib, "_name", "") or _llama_cpp._base_path)


def _bind():
    lib = _llama_cpp._lib
    missing = [name for name in SYMBOLS if not hasattr(lib, name)]
    if missing:
        hint = (
            "LLAMA_CPP_LIB_PATH is set and points at another build: unset it"
            if os.environ.get("LLAMA_CPP_LIB_PATH")
            else "a stock llama-cpp-python seems to be installed over cna-local's: run "
            "`pip uninstall -y llama-cpp-python && pip install --force-reinstall --no-deps cna-local`"
        )
        raise PatchedLibraryError(
            f"llama_cpp loaded {library_path()}, which lacks {', '.join(missing)}: it is not the "
            f"patched libllama that cna-local builds ({hint})."
        )
    ctx_p = _llama_cpp.llama_context_p_ctypes
    i32p = ctypes.POINTER(ctypes.c_int32)
    f32p = ctypes.POINTER(ctypes.c_float)

    # int32_t llama_set_neuron_mask(ctx, const int32_t * layers, const int32_t * neurons, const float * scales, size_t n)
    lib.llama_set_neuron_mask.argtypes = [ctx_p, i32p, i32p, f32p, ctypes.c_size_t]
    lib.llama_set_neuron_mask.restype = ctypes.c_int32
    # void llama_clear_neuron_mask(ctx)
    lib.llama_clear_neuron_mask.argtypes = [ctx_p]
    lib.llama_clear_neuron_mask.restype = None
    # int32_t llama_get_neuron_mask(const ctx, int32_t * layers, int32_t * neurons, float * scales, size_t n_max)
    lib.llama_get_neuron_mask.argtypes = [ctx_p, i32p, i32p, f32p, ctypes.c_size_t]
    lib.llama_get_neuron_mask.restype = ctypes.c_int32
    # int32_t llama_get_neuron_mask_reach(ctx, uint8_t * reachable, size_t n_max)
    lib.llama_get_neuron_mask_reach.argtypes = [ctx_p, ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t]
    lib.llama_get_neuron_mask_reach.restype = ctypes.c_int32

    i64p = ctypes.POINTER(ctypes.c_int64)
    # int32_t llama_ffn_capture_start(ctx, uint32_t flags); void llama_ffn_capture_stop(ctx)
    lib.llama_ffn_capture_start.argtypes = [ctx_p, ctypes.c_uint32]
    lib.llama_ffn_capture_start.restype = ctypes.c_int32
    lib.llama_ffn_capture_stop.argtypes = [ctx_p]
    lib.llama_ffn_capture_stop.restype = None
    # int32_t llama_ffn_capture_status(ctx)
    lib.llama_ffn_capture_status.argtypes = [ctx_p]
    lib.llama_ffn_capture_status.restype = ctypes.c_int32
    # int32_t llama_ffn_capture_sizes(ctx, int64_t * n_rows, int64_t * ffn_width, int64_t * resid_width)
    lib.llama_ffn_capture_sizes.argtypes = [ctx_p, i64p, i64p, i64p]
    lib.llama_ffn_capture_sizes.restype = ctypes.c_int32
    # int64_t llama_ffn_capture_take_rows(ctx, int32_t * seq_ids, float * ffn, float * resid, size_t n_max)
    lib.llama_ffn_capture_take_rows.argtypes = [ctx_p, i32p, f32p, f32p, ctypes.c_size_t]
    lib.llama_ffn_capture_take_rows.restype = ctypes.c_int64
    # int64_t llama_ffn_capture_sumsq(ctx, double * sumsq)
    lib.llama_ffn_capture_sumsq.argtypes = [ctx_p, ctypes.POINTER(ctypes.c_double)]
    lib.llama_ffn_capture_sumsq.restype = ctypes.c_int64
    return lib


_lib = None


def lib():
    """The patched libllama with the mask functions typed; raises PatchedLibraryError on a stock one."""
    global _lib
    if _lib is None:
        _lib = _bind()
    return _lib


def build_info() -> dict:
    """What llama.cpp build the runtime uses: its library directory, the CPU backend variants shipped
    there and the features of the one loaded (x86-64 wheels pick the best variant at import)."""
    import re

    import llama_cpp

    lib_dir = library_path().parent
    variants = sorted(m.group(1) for p in lib_dir.iterdir() if (m := re.match(r"libggml-cpu-(.+)\.so$", p.name)))
    info = llama_cpp.llama_print_system_info().decode()
    return {"llama_cpp_python": llama_cpp.__version__, "library_dir": str(lib_dir), "cpu_variants": variants,
            "cpu_features": re.findall(r"(\w+) = 1", info.split("CPU :", 1)[-1].split("\n", 1)[0])}
