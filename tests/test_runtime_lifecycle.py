"""The mask's life in a llama context: changes between decodes, with llama.cpp's graph reuse on.

llama.cpp reuses the previous compute graph when its parameters say the graph would come out the same.
Which layers carry a scale op is part of the graph, so a change of steered layers must never run on a
reused graph, while a change of values only must (that is what makes a live multiplier cheap). Each step
below is compared bit for bit with a context that never reuses a graph, or with a fresh context.
"""

from __future__ import annotations

import os

import llama_cpp
import numpy as np
import pytest

from cna_local.runtime import SteeredLlama

PROMPT = "The quick brown fox jumps over"


def logits(llm) -> np.ndarray:
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def n_reused(llm) -> int:
    return llama_cpp.llama_perf_context(llm.ctx).n_reused


def open_model(path, reuse: bool = True) -> SteeredLlama:
    old = os.environ.pop("LLAMA_GRAPH_REUSE_DISABLE", None)
    if not reuse:
        os.environ["LLAMA_GRAPH_REUSE_DISABLE"] = "1"  # read once, when the context is made
    try:
        return SteeredLlama(str(path), n_ctx=128, n_threads=2, n_batch=64)
    finally:
        os.environ.pop("LLAMA_GRAPH_REUSE_DISABLE", None)
        if old is not None:
            os.environ["LLAMA_GRAPH_REUSE_DISABLE"] = old


@pytest.fixture(scope="module")
def model(tiny_gguf):
    return tiny_gguf("llama", "f32")  # 3 layers, n_ff 128


# (layers, neurons, scales): A and B steer different layers; A2 is A with other values
A = ([0, 0, 2], [5, 77, 100], [0.0, -2.0, 3.0])
A2 = ([0, 0, 2], [5, 77, 100], [1.5, 4.0, -1.0])
B = ([1, 1], [9, 64], [-3.0, 0.0])
OFF = None


def apply(llm, entries, keep_kv: bool = False) -> None:
    n = llm.n_tokens
    if entries is None:
        llm.steering.clear()
    else:
        llm.steering.set_entries(*entries)
    if keep_kv:
        # a steering change drops Llama's record of the cached tokens (they were computed under the old
        # mask); here the history under changing masks is the point, so keep it
        llm.n_tokens = n


STEPS = [A, B, A, OFF, A, A2, B, OFF, OFF, A2]


def test_each_step_equals_a_fresh_context_with_that_mask(model):
    """A -> B -> A -> clear -> A ..., the prompt re-evaluated after each change (graphs cached all along)."""
    live = open_model(model)
    tokens = live.tokenize(PROMPT.encode())
    try:
        for i, entries in enumerate(STEPS):
            apply(live, entries)
            live.reset()
            live.eval(tokens)
            got_prompt = logits(live)
            live.eval([42])  # a one-token graph: the shape every step shares
            got_next = logits(live)

            fresh = open_model(model)
            try:
                if entries is not None:
                    fresh.steering.set_entries(*entries)
                fresh.eval(tokens)
                want_prompt = logits(fresh)
                fresh.eval([42])
                want_next = logits(fresh)
            finally:
                fresh.close()
            assert np.array_equal(got_prompt, want_prompt), f"step {i}: prompt logits differ from a fresh context"
            assert np.array_equal(got_next, want_next), f"step {i}: next-token logits differ from a fresh context"
    finally:
        live.close()


def test_changes_between_decodes_equal_a_context_that_never_reuses_graphs(model):
    """One decode per step, KV kept: the same history in a context with graph reuse disabled."""
    live, reference = open_model(model), open_model(model, reuse=False)
    try:
        tokens = live.tokenize(PROMPT.encode())
        for llm in (live, reference):
            llm.eval(tokens)
        reused_before = n_reused(live)
        for i, entries in enumerate(STEPS + STEPS):
            for llm in (live, reference):
                apply(llm, entries, keep_kv=True)
                llm.eval([100 + i])
            assert np.array_equal(logits(live), logits(reference)), f"step {i} ({entries}): differs from no-reuse"
        assert n_reused(reference) == 0
        assert n_reused(live) > reused_before  # graphs were reused along the way, yet nothing went stale
    finally:
        live.close()
        reference.close()


def test_a_value_change_reuses_the_graph_and_a_layer_change_does_not(model):
    live = open_model(model)
    try:
        live.eval(live.tokenize(PROMPT.encode()))
        apply(live, A, keep_kv=True)
        live.eval([1])
        live.eval([2])  # now the one-token graph with A's layers is the previous graph
        before = n_reused(live)
        apply(live, A2, keep_kv=True)  # same layers, new values
        live.eval([3])
        assert n_reused(live) == before + 1
        apply(live, B, keep_kv=True)  # other layers
        live.eval([4])
        assert n_reused(live) == before + 1
        apply(live, OFF, keep_kv=True)  # no layers
        live.eval([5])
        assert n_reused(live) == before + 1
        live.eval([6])  # nothing changed: reused again
        assert n_reused(live) == before + 2
    finally:
        live.close()
