"""SteeredLlama: open a model with a mask file, change the strength live, and keep every Llama API working."""

from __future__ import annotations

import numpy as np
import pytest

from cna_local.fingerprint import fingerprint_from_gguf
from cna_local.maskfile import MaskMismatchError, NeuronMask
from cna_local.runtime import SteeredLlama

PROMPT = "The quick brown fox"
GREEDY = dict(max_tokens=12, temperature=0.0, top_k=1, seed=0)


def mask_for(gguf_path, tmp_path, name="m.gguf", multiplier=0.0) -> NeuronMask:
    fp = fingerprint_from_gguf(gguf_path)
    rng = np.random.default_rng(0)
    layers = np.repeat(np.arange(fp.n_layer), 32)
    neurons = np.concatenate([rng.choice(fp.n_ff, 32, replace=False) for _ in range(fp.n_layer)])
    mask = NeuronMask(arch=fp.arch, n_layer=fp.n_layer, n_ff=fp.n_ff, n_embd=fp.n_embd, fingerprint=fp.digest,
                      model_name="tiny", layers=layers, neurons=neurons, scores=np.ones(len(layers)),
                      multiplier=multiplier)
    mask.save(tmp_path / name)
    return mask


@pytest.fixture(scope="module")
def model(tiny_gguf):
    return tiny_gguf("llama", "f32")


def test_open_with_mask_file_sets_its_entries(model, tmp_path):
    mask = mask_for(model, tmp_path, multiplier=-1.0)
    llm = SteeredLlama(model, mask=tmp_path / "m.gguf", n_ctx=64)
    layers, neurons, scales = llm.steering.entries()
    assert np.array_equal(layers, mask.layers) and np.array_equal(neurons, mask.neurons)
    assert np.all(scales == -1.0) and llm.multiplier == -1.0
    llm.close()


def test_multiplier_argument_overrides_the_files(model, tmp_path):
    mask_for(model, tmp_path, multiplier=-1.0)
    llm = SteeredLlama(model, mask=tmp_path / "m.gguf", multiplier=0.5, n_ctx=64)
    assert np.all(llm.steering.entries()[2] == 0.5)
    llm.close()


def test_mask_for_another_model_is_refused(model, tiny_gguf, tmp_path):
    mask_for(tiny_gguf("llama", "f32", seed=1), tmp_path)  # same shape, other weights
    with pytest.raises(MaskMismatchError, match="same shape but different weights.*Fix: re-run"):
        SteeredLlama(model, mask=tmp_path / "m.gguf", n_ctx=64)


def test_completion_chat_and_streaming_work_steered(model, tmp_path):
    mask_for(model, tmp_path)
    llm = SteeredLlama(model, mask=tmp_path / "m.gguf", n_ctx=128)
    text = llm.create_completion(PROMPT, **GREEDY)["choices"][0]["text"]
    streamed = "".join(c["choices"][0]["text"] for c in llm.create_completion(PROMPT, stream=True, **GREEDY))
    assert text and streamed == text
    chat = llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], **GREEDY)
    assert isinstance(chat["choices"][0]["message"]["content"], str)
    llm.close()


def test_steering_changes_generation_and_clear_restores_it(model, tmp_path):
    mask_for(model, tmp_path)
    plain = SteeredLlama(model, n_ctx=128)
    baseline = plain.create_completion(PROMPT, **GREEDY)["choices"][0]["text"]
    plain.set_mask(tmp_path / "m.gguf", multiplier=-1.0)
    steered = plain.create_completion(PROMPT, **GREEDY)["choices"][0]["text"]
    plain.steering.clear()
    assert steered != baseline
    assert plain.create_completion(PROMPT, **GREEDY)["choices"][0]["text"] == baseline
    plain.close()


def test_live_multiplier_change_equals_a_fresh_model(model, tmp_path):
    """The cached prompt prefix from the old strength must not leak into generation at the new one."""
    mask_for(model, tmp_path)
    live = SteeredLlama(model, mask=tmp_path / "m.gguf", multiplier=0.0, n_ctx=128)
    live.create_completion(PROMPT, **GREEDY)  # fills the prefix cache at m=0
    live.multiplier = -1.0
    got = live.create_completion(PROMPT, **GREEDY)["choices"][0]["text"]
    fresh = SteeredLlama(model, mask=tmp_path / "m.gguf", multiplier=-1.0, n_ctx=128)
    assert got == fresh.create_completion(PROMPT, **GREEDY)["choices"][0]["text"]
    with live.steering.scaled(0.0):
        assert np.all(live.steering.entries()[2] == 0.0)
    assert live.multiplier == -1.0
    live.close()
    fresh.close()
