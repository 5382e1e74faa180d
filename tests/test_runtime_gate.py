"""The gate in the runtime: SteeredLlama steers a prompt only when the mask's gate fires on it, and
otherwise serves it exactly as the unsteered model does."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cna_local.capture import LlamaSource
from cna_local.fingerprint import fingerprint_from_gguf
from cna_local.gate import Gate
from cna_local.runtime import SteeredLlama, SteeringError

from backend import N_GPU_LAYERS
from test_eval_runner import make_mask

LLM = dict(n_ctx=512, n_threads=1, n_threads_batch=1, logits_all=True, n_gpu_layers=N_GPU_LAYERS)  # logprobs: every token's logits
PROMPTS = ["Write a haiku about rain", "Explain how a bicycle stays upright", "List three prime numbers"]


@pytest.fixture(scope="module")
def model(tiny_gguf):
    return tiny_gguf("llama", "f32")


@pytest.fixture(scope="module")
def mask(model):
    return make_mask(fingerprint_from_gguf(model), per_layer=16, multiplier=-4.0)  # replies change visibly


@pytest.fixture(scope="module")
def llm(model):
    llm = SteeredLlama(str(model), **LLM)
    yield llm
    llm.close()


def with_gate(mask, gate):
    return dataclasses.replace(mask, gate=gate)


def chat(llm, prompt, n=12):
    out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=n, temperature=0.0,
                                     top_k=1, repeat_penalty=1.0, logprobs=True, top_logprobs=1)
    choice = out["choices"][0]
    return choice["message"]["content"], [t["logprob"] for t in choice["logprobs"]["content"]]


def unsteered(llm, prompt):
    llm.steering.clear()
    return chat(llm, prompt)


def static(llm, mask, prompt):
    llm.set_mask(mask, gate=False)
    return chat(llm, prompt)


def test_a_gate_that_never_fires_is_the_unsteered_model_exactly(llm, mask):
    for prompt in PROMPTS:
        want = unsteered(llm, prompt)
        llm.set_mask(with_gate(mask, Gate.never(len(mask))))
        assert llm.gate
        assert chat(llm, prompt) == want  # text and every token's log-probability, bit for bit
        assert llm.last_gate is not None and not llm.last_gate.fired


def test_a_gate_that_always_fires_is_the_static_mask_exactly(llm, mask):
    for prompt in PROMPTS:
        want = static(llm, mask, prompt)
        assert want != unsteered(llm, prompt)  # the mask does change the reply
        llm.set_mask(with_gate(mask, Gate.always(len(mask))))
        assert chat(llm, prompt) == want
        assert llm.last_gate.fired


def test_the_gate_reads_what_attribution_captured(model, llm, mask):
    """The runtime's reading of the mask's neurons is the llama backend's last-token value of the prompt."""
    source = LlamaSource(model, n_gpu_layers=N_GPU_LAYERS)
    try:
        values = source.collect(PROMPTS, keep=True, progress=False).values[:, mask.layers, mask.neurons]
    finally:
        source.close()
    weights = np.random.default_rng(1).normal(size=len(mask)).astype(np.float32)
    scores = values.astype(np.float64) @ weights.astype(np.float64)
    threshold = float(np.median(scores))  # fires on the upper half
    gated = with_gate(mask, Gate(weights, threshold))
    fired = []
    for prompt, score in zip(PROMPTS, scores):
        llm.set_mask(gated)
        got = chat(llm, prompt)
        decision = llm.last_gate
        assert decision.score == pytest.approx(score, rel=1e-4, abs=1e-4)
        fired.append(decision.fired)
        assert got == (static(llm, mask, prompt) if decision.fired else unsteered(llm, prompt))
    assert any(fired) and not all(fired)


def test_a_gate_of_its_own_reads_neurons_the_mask_does_not_steer(model, llm, mask):
    """A version 4 gate reads its own neurons out of the same captured row; they need not be in the mask."""
    source = LlamaSource(model, n_gpu_layers=N_GPU_LAYERS)
    try:
        rows = source.collect(PROMPTS, keep=True, progress=False).values  # [prompts, n_layer, n_ff]
    finally:
        source.close()
    steered = set(zip(mask.layers.tolist(), mask.neurons.tolist()))
    free = [(layer, neuron) for layer in range(mask.n_layer) for neuron in range(mask.n_ff) if (layer, neuron) not in steered]
    layers, neurons = np.array(free[::7][:12]).T
    weights = np.random.default_rng(2).normal(size=len(layers)).astype(np.float32)
    scores = rows[:, layers, neurons].astype(np.float64) @ weights.astype(np.float64)
    threshold = float(np.median(scores))
    gated = with_gate(mask, Gate(weights, threshold, layers=layers, neurons=neurons))
    fired = []
    for prompt, score in zip(PROMPTS, scores):
        llm.set_mask(gated)
        got = chat(llm, prompt)
        assert llm.last_gate.score == pytest.approx(score, rel=1e-4, abs=1e-4)
        fired.append(llm.last_gate.fired)
        assert got == (static(llm, mask, prompt) if llm.last_gate.fired else unsteered(llm, prompt))
    assert any(fired) and not all(fired)


def test_after_a_steered_request_the_next_prompt_is_read_unsteered(llm, mask):
    """The KV prefix cached by a fired (steered) request is not reused for the next prompt's gate reading."""
    first, second = PROMPTS[0], PROMPTS[0] + " and snow"  # the second extends the first
    want = unsteered(llm, second)
    llm.set_mask(with_gate(mask, Gate.always(len(mask))))
    chat(llm, first)
    llm.gate = False
    llm.set_mask(with_gate(mask, Gate.never(len(mask))))
    chat(llm, first)  # a closed gate: the cache is unsteered and its prefix may be reused
    assert chat(llm, second) == want


def test_multiplier_and_schedule_changes_keep_the_gate(llm, mask):
    llm.set_mask(with_gate(mask, Gate.never(len(mask))))
    llm.multiplier = 3.0
    assert llm.gate and llm.multiplier == 3.0
    llm.schedule = "generation"
    assert llm.gate
    llm.gate = False
    assert not llm.gate and llm.last_gate is not None


@pytest.mark.parametrize("schedule", ["prompt", "generation"])
def test_gates_under_other_schedules(llm, mask, schedule):
    prompt = PROMPTS[1]
    want_off = unsteered(llm, prompt)
    llm.set_mask(with_gate(mask, Gate.never(len(mask))), schedule=schedule)
    assert chat(llm, prompt) == want_off
    llm.set_mask(mask, schedule=schedule, gate=False)
    want_on = chat(llm, prompt)
    llm.set_mask(with_gate(mask, Gate.always(len(mask))), schedule=schedule)
    got = chat(llm, prompt)
    assert got[0] == want_on[0]
    np.testing.assert_allclose(got[1], want_on[1], atol=1e-3)  # "generation": the last token alone, either way


def test_gate_errors_name_the_problem(llm, mask, model):
    with pytest.raises(SteeringError, match="has no gate"):
        llm.set_mask(mask, gate=True)
    with pytest.raises(SteeringError, match="needs one mask"):
        llm.steering.set_masks([with_gate(mask, Gate.never(len(mask))), mask], gate=True)
    with pytest.raises(SteeringError, match="without a mask"):
        SteeredLlama(str(model), gate=True, **LLM)


def test_the_mask_own_strength_follows_the_gate(llm, mask):
    """A gated mask's default is for gated use; with the gate off its (weaker) static default applies."""
    both = dataclasses.replace(with_gate(mask, Gate.never(len(mask))), multiplier=-4.0, static_multiplier=-1.0)
    llm.set_mask(both)
    assert llm.gate and llm.multiplier == -4.0
    llm.gate = False
    assert llm.multiplier == -1.0  # at its own strength: the static one
    llm.multiplier = 2.0
    llm.gate = True
    assert llm.multiplier == 2.0  # a strength the user chose stays
    llm.set_mask(both, gate=False)
    assert llm.multiplier == -1.0


def test_strengthening_is_decided_by_the_stricter_threshold(llm, mask):
    """A gate whose weakening threshold fires on a prompt and whose strengthening threshold does not:
    below multiplier 1 the prompt is steered, above 1 it is served unsteered, exactly."""
    prompt = PROMPTS[0]
    # score 0 on every prompt: 0 >= -1 fires (weakening), 0 >= 1 does not (strengthening)
    gate = Gate(np.zeros(len(mask), np.float32), -1.0, threshold_strengthen=1.0)
    for m, fires in ((-4.0, True), (0.5, True), (1.5, False), (3.0, False)):
        llm.set_mask(with_gate(mask, gate), m)
        got = chat(llm, prompt)
        assert llm.last_gate.fired == fires
        assert llm.last_gate.threshold == (1.0 if m > 1 else -1.0)  # the threshold that decided
        llm.set_mask(mask, m, gate=False)
        want = chat(llm, prompt) if fires else unsteered(llm, prompt)
        assert got == want
    assert unsteered(llm, prompt) != static(llm, dataclasses.replace(mask, multiplier=3.0), prompt)  # 3 does steer
