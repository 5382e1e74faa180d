"""Prompt-prefix reuse never changes an answer: the logits after a prompt are bit for bit those of a fresh
context, whatever was asked before, while a shared prefix is still taken from the KV cache.

llama.cpp rounds differently with the micro-batch a token is evaluated in, so SteeredLlama reuses a cached
prefix only up to a micro-batch boundary, and only where it was evaluated as prompt.
"""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest

from cna_local.runtime import SteeredLlama

SETTINGS = dict(n_ctx=512, n_batch=64, n_ubatch=16, n_threads=2)
SYSTEM = "You are a terse assistant who answers in one short sentence. " * 3


def open_model(path) -> SteeredLlama:
    return SteeredLlama(str(path), **SETTINGS)


def first_logits(llm, tokens) -> np.ndarray:
    """The logits generate() samples its first token from, after evaluating `tokens`."""
    gen = llm.generate(tokens, temp=0.0, top_k=1)
    next(gen)
    out = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    gen.close()
    return out


def fresh_logits(path, tokens) -> np.ndarray:
    llm = open_model(path)
    try:
        return first_logits(llm, tokens)
    finally:
        llm.close()


def answer(llm, tokens, n=12) -> list[int]:
    out = []
    for token in llm.generate(tokens, temp=0.0, top_k=1):
        out.append(token)
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def model(tiny_gguf):
    return tiny_gguf("llama", "f32")


def test_a_second_turn_equals_a_fresh_context_and_reuses_the_first_prompt(model):
    llm = open_model(model)
    try:
        turn1 = llm.tokenize(f"{SYSTEM}\nUser: What is a fox?\nAssistant:".encode())
        reply = answer(llm, turn1)
        turn2 = turn1 + reply + llm.tokenize(b"\nUser: And a dog?\nAssistant:", add_bos=False)
        # the cached first prompt, down to a micro-batch boundary; not the reply, which was decoded token by token
        assert llm.reusable_prefix(turn2) == len(turn1) - len(turn1) % 16 > 0
        assert np.array_equal(first_logits(llm, turn2), fresh_logits(model, turn2))
    finally:
        llm.close()


def test_the_same_prompt_again_is_reused_and_equal(model):
    llm = open_model(model)
    try:
        prompt = llm.tokenize(f"{SYSTEM}\nUser: Name a colour.\nAssistant:".encode())
        first = first_logits(llm, prompt)
        assert 0 < llm.reusable_prefix(prompt) < len(prompt)
        assert np.array_equal(first_logits(llm, prompt), first)
        assert np.array_equal(first, fresh_logits(model, prompt))
    finally:
        llm.close()


def test_a_steering_change_drops_the_cached_prefix(model, tmp_path):
    from test_runtime_llama import mask_for

    llm = open_model(model)
    try:
        prompt = llm.tokenize(f"{SYSTEM}\nUser: Name a colour.\nAssistant:".encode())
        first_logits(llm, prompt)
        llm.set_mask(mask_for(model, tmp_path), -1.0)
        assert llm.reusable_prefix(prompt) == 0
        steered = first_logits(llm, prompt)
        fresh = open_model(model)
        fresh.set_mask(mask_for(model, tmp_path), -1.0)
        assert np.array_equal(steered, first_logits(fresh, prompt))
        fresh.close()
    finally:
        llm.close()


@pytest.mark.parametrize("n_batch, n_ubatch, unit", [(64, 16, 16), (64, 64, 64), (48, 32, 48)])
def test_the_unit_is_the_micro_batch_or_the_batch_where_they_do_not_nest(model, n_batch, n_ubatch, unit):
    llm = SteeredLlama(str(model), n_ctx=256, n_batch=n_batch, n_ubatch=n_ubatch)
    assert llm.prefix_unit == unit
    llm.close()
