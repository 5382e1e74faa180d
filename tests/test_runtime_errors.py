"""Bad masks and multipliers raise exceptions that name the problem; nothing crashes.

Python checks first (messages name the entry); the C API checks again on its own, so a caller that goes
straight to ctypes gets an error code, not an assertion or a write out of bounds.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from cna_local.runtime import PatchedLibraryError, SteeredLlama, SteeringError, binding


@pytest.fixture(scope="module")
def llm(tiny_gguf):
    llm = SteeredLlama(str(tiny_gguf("llama", "f32")), n_ctx=32, n_threads=2)
    yield llm
    llm.close()


def shape(llm):
    return llm.steering.shape.n_layer, llm.steering.shape.n_ff


@pytest.mark.parametrize(
    "entries, message",
    [
        (lambda L, F: ([L], [0], [0.0]), r"layer \d+ is out of range: the model has \d+ layers"),
        (lambda L, F: ([-1], [0], [0.0]), r"layer -1 is out of range"),
        (lambda L, F: ([0], [F], [0.0]), r"neuron \d+ of layer 0 is out of range: the model's FFN has \d+ neurons"),
        (lambda L, F: ([0], [-3], [0.0]), r"neuron -3 of layer 0 is out of range"),
        (lambda L, F: ([0, 1], [1, 2], [0.0, float("nan")]), r"entry 1: scale nan .* is not a finite number"),
        (lambda L, F: ([0], [1], [float("inf")]), r"scale inf .* is not a finite number"),
        (lambda L, F: ([], [], []), r"the mask is empty"),
        (lambda L, F: ([0, 0], [5, 5], [0.0, 1.0]), r"layer 0, neuron 5 appears more than once"),
        (lambda L, F: ([0, 1], [5], [0.0]), r"differ in length"),
    ],
    ids=["layer>=n_layer", "layer<0", "neuron>=n_ff", "neuron<0", "nan", "inf", "empty", "duplicate", "lengths"],
)
def test_bad_entries_raise_named_errors(llm, entries, message):
    layers, neurons, scales = entries(*shape(llm))
    with pytest.raises(SteeringError, match=message):
        llm.steering.set_entries(layers, neurons, scales)


def test_a_rejected_mask_keeps_the_previous_one(llm):
    llm.steering.set_entries([0, 1], [3, 4], [0.0, 2.0])
    with pytest.raises(SteeringError):
        llm.steering.set_entries([0], [10**6], [0.0])
    layers, neurons, scales = llm.steering.entries()
    assert layers.tolist() == [0, 1] and neurons.tolist() == [3, 4] and scales.tolist() == [0.0, 2.0]
    llm.steering.clear()


@pytest.mark.parametrize(
    "layers, neurons, scales, code",
    [
        ([99], [0], [0.0], -3),
        ([0], [99999], [0.0], -4),
        ([0], [0], [float("nan")], -5),
        ([0, 0], [1, 1], [0.0, 0.0], -6),
        ([], [], [], -2),
    ],
    ids=["layer", "neuron", "nan", "duplicate", "empty"],
)
def test_c_api_validates_on_its_own(llm, layers, neurons, scales, code):
    lib = binding.lib()
    la = np.array(layers, np.int32)
    na = np.array(neurons, np.int32)
    sa = np.array(scales, np.float32)
    i32p = ctypes.POINTER(ctypes.c_int32)
    rc = lib.llama_set_neuron_mask(
        llm.ctx, la.ctypes.data_as(i32p), na.ctypes.data_as(i32p), sa.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), len(la)
    )
    assert rc == code
    assert lib.llama_get_neuron_mask(llm.ctx, None, None, None, 0) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "strong", None])
def test_bad_multiplier_is_refused_and_the_mask_kept(llm, tmp_path, bad):
    from cna_local.errors import CnaLocalError

    from test_runtime_llama import mask_for

    llm.set_mask(mask_for(llm.model_path, tmp_path), multiplier=0.5)
    with pytest.raises(CnaLocalError, match="multiplier must be a"):
        llm.multiplier = bad
    assert llm.multiplier == 0.5 and np.all(llm.steering.entries()[2] == 0.5)
    llm.steering.clear()


def test_multiplier_without_a_mask_is_refused(llm):
    llm.steering.clear()
    with pytest.raises(SteeringError, match="no mask is set"):
        llm.steering.multiplier = 0.0


def test_stock_library_is_named_not_crashed(monkeypatch):
    """A libllama without the patch's symbols (a stock llama-cpp-python build) gives a clear error."""
    import llama_cpp.llama_cpp as lc

    lib_dir = binding.library_path().parent
    other = next(p for p in sorted(lib_dir.glob("libggml-base*")))
    monkeypatch.setattr(lc, "_lib", ctypes.CDLL(str(other)))
    monkeypatch.setattr(binding, "_lib", None)
    with pytest.raises(PatchedLibraryError, match=r"lacks llama_set_neuron_mask.*not the patched libllama"):
        binding.lib()
