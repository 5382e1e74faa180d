"""Layers a mask cannot reach are refused when the mask is set, by architecture and layer.

llama.cpp applies the mask inside build_ffn, the dense FFN builder. Which layers go through it is found by
building (not computing) a graph with every layer steered, once per context: mixture-of-experts layers
(even those with a shared expert built by build_ffn), and models without a dense FFN, are refused with a
message naming the model's architecture and the layers; the dense leading layers of a DeepSeek-style
model are steered.
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest

from cna_local.fingerprint import fingerprint_from_gguf
from cna_local.maskfile import NeuronMask
from cna_local.runtime import SteeredLlama, SteeringError, binding


def logits(llm, prompt=b"Hello there, how are you") -> np.ndarray:
    llm.reset()
    llm.eval(llm.tokenize(prompt))
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def c_set(llm, layers, neurons, scales) -> int:
    i32p = ctypes.POINTER(ctypes.c_int32)
    la, na = np.array(layers, np.int32), np.array(neurons, np.int32)
    sa = np.array(scales, np.float32)
    return binding.lib().llama_set_neuron_mask(llm.ctx, la.ctypes.data_as(i32p), na.ctypes.data_as(i32p),
                                                sa.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), len(la))


@pytest.fixture(scope="module")
def deepseek(tiny_gguf):
    llm = SteeredLlama(str(tiny_gguf("deepseek2", "f32")), n_ctx=64, n_threads=2)  # layer 0 dense, 1-2 MoE
    yield llm
    llm.close()


def test_the_dense_leading_layer_of_a_moe_model_is_reachable_and_steered(deepseek):
    assert deepseek.steering.reachable().tolist() == [True, False, False]
    plain = logits(deepseek)
    deepseek.steering.set_entries(np.zeros(64, np.int32), np.arange(64), np.full(64, -2.0))
    steered = logits(deepseek)
    assert np.abs(steered - plain).max() > 1e-3
    deepseek.steering.clear()
    assert np.array_equal(logits(deepseek), plain)


def test_a_moe_layer_is_refused_by_name_and_the_mask_kept(deepseek):
    deepseek.steering.set_entries([0], [3], [0.5])
    with pytest.raises(SteeringError, match=r"this deepseek2 model is a mixture-of-experts model \(4 experts\) and "
                                            r"layers 1-2 route tokens through experts.*steer only its dense layers \(0\)"):
        deepseek.steering.set_entries([0, 1, 2], [3, 3, 3], [0.0, 0.0, 0.0])
    assert deepseek.steering.entries()[0].tolist() == [0]
    # llama.cpp refuses on its own too, with its code for an unreachable layer, keeping the mask
    assert c_set(deepseek, [1], [3], [0.0]) == -9
    assert deepseek.steering.entries()[0].tolist() == [0]
    deepseek.steering.clear()


def test_a_mask_file_naming_a_moe_layer_is_refused_when_set(deepseek, tmp_path):
    fp = fingerprint_from_gguf(deepseek.model_path)
    mask = NeuronMask(arch=fp.arch, n_layer=fp.n_layer, n_ff=fp.n_ff, n_embd=fp.n_embd, fingerprint=fp.digest,
                      model_name="tiny", layers=[0, 2], neurons=[1, 1], scores=[1.0, 1.0], multiplier=0.0)
    with pytest.raises(SteeringError, match="layer 2 routes tokens through experts"):
        deepseek.set_mask(mask)
    assert not deepseek.steering.active


@pytest.mark.parametrize("arch, message", [
    ("mixtral", r"this llama model is a mixture-of-experts model \(4 experts\): none of its 3 layers is one dense "
                r"FFN a neuron mask can reach. Fix: neuron masks need a dense-FFN model"),
    # qwen2moe builds its shared expert with build_ffn; the layer is still not one dense FFN
    ("qwen2moe", r"this qwen2moe model is a mixture-of-experts model \(4 experts\): none of its 3 layers"),
    ("mamba", r"this mamba model has no FFN \(MLP\) layers"),
])
def test_models_without_a_reachable_layer_are_refused_by_name(tiny_gguf, arch, message):
    llm = SteeredLlama(str(tiny_gguf(arch, "f32")), n_ctx=64, n_threads=2)
    try:
        assert not llm.steering.reachable().any()
        with pytest.raises(SteeringError, match=message):
            llm.steering.set_entries([0], [0], [0.0])
        assert c_set(llm, [0], [0], [0.0]) == -7
        assert not llm.steering.active
        llm.create_completion("Hi", max_tokens=2)  # and the model still runs
    finally:
        llm.close()


def test_reach_is_found_on_a_context_with_one_cache_stream_per_sequence(tiny_gguf):
    """The probe graph has one token per sequence: a KV cache split into a stream per sequence cannot build
    a graph with fewer (llama.cpp aborted in ggml_reshape_3d before this was fixed)."""
    from llama_cpp import _internals

    llm = SteeredLlama(str(tiny_gguf("llama", "f32")), n_ctx=256, n_threads=1)
    try:
        llm._ctx.close()
        llm.context_params.n_seq_max = 4
        llm.context_params.kv_unified = False
        llm._ctx = _internals.LlamaContext(model=llm._model, params=llm.context_params, verbose=False)
        out = np.zeros(llm.steering.shape.n_layer, np.uint8)
        rc = binding.lib().llama_get_neuron_mask_reach(llm.ctx, out.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), len(out))
        assert rc == len(out) and out.all()
        assert c_set(llm, [0, 1], [3, 5], [0.0, 2.0]) == 0
    finally:
        llm._ctx.close()
        llm.close()
