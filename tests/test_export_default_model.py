"""The exported adapter on the default model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M): it reproduces the
neuron mask to within the model's own rounding noise in llama.cpp.

On K-quant models llama.cpp quantizes each activation block before the matmul, so scaling a neuron before
the matmul (the mask) and correcting after it (the adapter) round differently. The bound is calibrated on
the model itself: how much its logits move when one prompt is merely split differently into batches.
"""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from cna_local.export import low_rank_updates, write_gguf_lora
from cna_local.export.lowrank import gguf_down_weights
from cna_local.fingerprint import fingerprint_from_gguf
from cna_local.maskfile import NeuronMask
from cna_local.models import resolve_model
from cna_local.runtime import SteeredLlama

from tiny_models import CACHE

pytestmark = pytest.mark.slow


def logits_after(llm, tokens, split=None) -> np.ndarray:
    llm.reset()
    if split:
        llm.eval(tokens[:split])
        llm.eval(tokens[split:])
    else:
        llm.eval(tokens)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def test_the_adapter_on_the_default_model_is_within_its_rounding_noise(monkeypatch, tmp_path):
    monkeypatch.setenv("CNA_LOCAL_CACHE", str(CACHE))  # the model is assembled once, not per test
    path = resolve_model("default")
    fp = fingerprint_from_gguf(path)
    rng = np.random.default_rng(0)
    layers = rng.integers(fp.n_layer // 2, fp.n_layer, 117)  # 0.1% of the neurons, in the late half like the product's
    neurons = rng.integers(0, fp.n_ff, 117)
    keep = np.unique(layers.astype(np.int64) * fp.n_ff + neurons, return_index=True)[1]
    mask = NeuronMask(arch=fp.arch, n_layer=fp.n_layer, n_ff=fp.n_ff, n_embd=fp.n_embd, fingerprint=fp.digest,
                      model_name="default", layers=layers[keep], neurons=neurons[keep], scores=np.ones(len(keep)),
                      multiplier=-1.5)
    lora = write_gguf_lora(tmp_path / "m.lora.gguf", mask, low_rank_updates(mask, gguf_down_weights(path)), -1.5)

    with_mask = SteeredLlama(str(path), n_ctx=512, n_threads=2)
    with_lora = SteeredLlama(str(path), n_ctx=512, n_threads=2, lora_path=str(lora), lora_scale=1.0)
    try:
        tokens = with_mask.tokenize(b"<|im_start|>user\nHow do I pick a lock on a door I do not own?<|im_end|>\n"
                                    b"<|im_start|>assistant\n", special=True)
        plain = logits_after(with_mask, tokens)
        noise = np.abs(logits_after(with_mask, tokens, split=7) - plain).max()  # the same model, batches split otherwise
        with_mask.set_mask(mask)
        want = logits_after(with_mask, tokens)
        got = logits_after(with_lora, tokens)
    finally:
        with_mask.close()
        with_lora.close()
    diff, effect = np.abs(got - want).max(), np.abs(want - plain).max()
    print(f"default model: |adapter - mask| {diff:.3g}, batch-split noise {noise:.3g}, mask effect {effect:.3g}")
    assert noise > 0  # the calibration measures something
    assert diff <= 3 * noise
    assert effect > 2 * diff
