"""`SteeredLlama`: a `llama_cpp.Llama` that carries neuron masks.

Everything `Llama` offers (completion, chat completion, streaming, embeddings) works unchanged; the mask
is applied inside llama.cpp's FFN on whatever backend the layers run on (CPU, Metal, CUDA).

One change to `Llama`'s prompt-prefix reuse, so that an answer never depends on what was asked before:
llama.cpp's kernels round differently with the number of tokens evaluated together (measured on the
default Q4_K_M model: 0.3 in the logits when a 144-token prompt is split after 7 tokens instead of
evaluated whole, 0 when split at a multiple of the micro-batch). So a cached prefix is reused only
  * when it was computed under the same steering (a steering change drops it),
  * up to a multiple of the micro-batch (`n_ubatch`), so the rest is evaluated in the same micro-batches
    as a fresh context would use, and
  * only where it was evaluated as prompt, not as generated tokens (decoded one at a time).

The steering schedule (cna_local.schedules) picks the positions the mask applies at: all of them, the
prompt's ("prompt": generated tokens run unsteered on the steered prompt), or those that predict a reply
token ("generation": the prompt's last token and the generated ones). Between the parts of a request
the mask's scales are swapped for ones (bit for bit unsteered, the same graph), not cleared.

A mask with a gate (cna_local.gate) is applied only to the prompts the gate fires on. The prompt is first
evaluated unsteered while llama.cpp's FFN capture reads the gate's neurons at its last token; the gate
scores them; a closed gate leaves the request exactly unsteered (that evaluation is the request's own),
an open one re-evaluates the prompt under steering (under "generation" only its last token) and steers
the reply as the schedule says. `last_gate` says what it decided. The cached prefix is reused for the
unsteered evaluation only where it was computed unsteered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Sequence, Union

import llama_cpp
import numpy as np

from . import binding
from .gating import GateDecision, LastTokenReader
from .steering import NeuronSteering, SteeringError

if TYPE_CHECKING:
    from ..maskfile import NeuronMask

MaskLike = Union["NeuronMask", str, os.PathLike]


@contextlib.contextmanager
def _hushed(verbose: bool):
    """Without verbose, drop llama.cpp's warning that a KV cache shared by several sequences is longer than
    the training context ("possible training context overflow"): it concerns one sequence's positions,
    which the evaluation keeps within n_ctx, not the cells of several."""
    from llama_cpp import _logger

    level = _logger.logger.level
    if not verbose:
        _logger.logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        _logger.logger.setLevel(level)


def load_mask(mask: MaskLike) -> "NeuronMask":
    if hasattr(mask, "layers"):
        return mask  # already a NeuronMask
    from ..maskfile import NeuronMask

    return NeuronMask.load(mask)


class SteeredLlama(llama_cpp.Llama):
    """Open a GGUF model with an optional neuron mask.

    >>> llm = SteeredLlama("model.gguf", mask="refusal.mask.gguf", multiplier=0.0, n_ctx=2048)
    >>> llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}])
    >>> llm.multiplier = -1.0        # live: no reload, the cached prompt state is dropped
    >>> llm.steering.clear()         # back to the unsteered model, exactly

    n_seq_max=N opens the context for N sequences sharing one KV cache of n_ctx cells (for decoding
    several prompts together, as the batched evaluation does). Other keyword arguments go to
    `llama_cpp.Llama`.
    """

    def __init__(self, model_path: str, *, mask: MaskLike | None = None, multiplier: float | None = None,
                 schedule: str | None = None, gate: bool | None = None, **kwargs):
        if mask is None and (multiplier is not None or schedule is not None or gate is not None):
            raise SteeringError("a multiplier, schedule or gate was given without a mask. Fix: pass mask=PATH with it, or drop them.")
        binding.lib()  # a stock libllama fails here, before the model is loaded
        mask = None if mask is None else load_mask(mask)  # a bad mask file fails before the model loads too
        kwargs.setdefault("verbose", False)
        self._exact_len = 0  # leading cached tokens evaluated as prompt, in micro-batches from a boundary
        self._prompt_len = 0  # the prompt generate() is evaluating, until it is
        self._prompt_end = 0  # where generate()'s prompt ends in the KV cache (also with reset=False); 0 outside it
        self.last_reused = 0  # prompt tokens the last generate() took from the KV cache ...
        self.last_prompt_n = 0  # ... and how many it evaluated, in how long
        self.last_prompt_ms = 0.0
        self.last_gate: GateDecision | None = None  # what the gate decided about the last prompt (None: no gate)
        self._gate_open: bool | None = None  # this request's decision; None outside a gated request
        self._kv_steered = False  # whether any cached position was computed with the mask's scales on
        n_seq_max = int(kwargs.pop("n_seq_max", 1))
        if n_seq_max < 1 or n_seq_max > 256:
            raise SteeringError(f"n_seq_max must be between 1 and 256 (llama.cpp's LLAMA_MAX_SEQ), got {n_seq_max}.")
        super().__init__(model_path=str(model_path), **kwargs)
        if n_seq_max > 1:
            with _hushed(self.verbose):
                self._reopen_context(n_seq_max)
        # micro-batches start at every n_batch chunk and every n_ubatch inside it
        self.prefix_unit = self.n_batch if self.n_batch % self.context_params.n_ubatch else self.context_params.n_ubatch
        self.steering = NeuronSteering(self)
        self._reader = None
        if mask is not None:
            self.steering.set_mask(mask, multiplier, schedule, gate)

    def _reopen_context(self, n_seq_max: int) -> None:
        """A context for n_seq_max sequences in one KV cache of n_ctx cells (llama_cpp.Llama has no such
        argument): several prompts decoded together, as the batched evaluation does."""
        from llama_cpp import _internals

        self._ctx.close()
        self.context_params.n_seq_max = n_seq_max
        # one cache shared by the sequences (measured: a cache split per sequence was 12% slower on the
        # evaluation, its greedy steps slower and its teacher forcing faster)
        self.context_params.kv_unified = True
        self._ctx = self._stack.enter_context(contextlib.closing(
            _internals.LlamaContext(model=self._model, params=self.context_params, verbose=self.verbose)))

    # -- prompt-prefix reuse that does not change answers (see the module docstring)

    def reusable_prefix(self, tokens) -> int:
        """How many leading tokens of `tokens` the next generate() takes from the KV cache."""
        n = int(self.n_tokens)
        if n == 0 or (self.steering.gate is not None and self._kv_steered):
            return 0  # a gate reads the prompt unsteered
        limit = min(n, self._exact_len, len(tokens) - 1)  # evaluate at least one token, for its logits
        cached = self.input_ids[:limit]
        same = cached == np.asarray(tokens[:limit], dtype=cached.dtype)
        common = limit if same.all() else int(np.argmin(same))
        return common - common % self.prefix_unit

    def generate(self, tokens, *args, **kwargs):
        tokens = list(tokens)
        if kwargs.get("reset", True):
            self.last_prompt_n, self.last_prompt_ms = 0, 0.0
            keep = self.last_reused = self.reusable_prefix(tokens)
            if keep == 0:
                self.reset()
            else:
                self.n_tokens = keep  # Llama.generate matches only within n_tokens and evaluates the rest
            self._prompt_len = len(tokens)
            self._prompt_end = len(tokens)
            self._gate_open = None  # a new request: the gate decides again
        else:
            self._prompt_end = int(self.n_tokens) + len(tokens)
        try:
            yield from super().generate(tokens, *args, **kwargs)
        finally:
            self._prompt_end = 0
            self._gate_open = None
            self.steering.phase(True)  # between requests llama.cpp holds what is set

    def eval(self, tokens) -> None:
        start = int(self.n_tokens)
        self._exact_len = min(self._exact_len, start)  # what this call evaluates is not from a prompt ...
        started = time.perf_counter()
        # outside generate() whatever is evaluated is a prompt; inside it, the prompt ends at _prompt_end
        prompt = self._prompt_end == 0 or start + len(tokens) == self._prompt_end
        schedule = self.steering.schedule
        if prompt and self.steering.gate is not None:
            start = self._gated_prompt(tokens, start)
        elif schedule == "prompt":
            self._phase(prompt)
            super().eval(tokens)
        elif schedule == "generation" and prompt and len(tokens) > 1:
            self._phase(False)  # the prompt's context unsteered, its last token steered
            super().eval(tokens[:-1])
            self._phase(True)
            super().eval(tokens[-1:])
        else:
            self._phase(True)
            super().eval(tokens)
        end = int(self.n_tokens)
        if self._prompt_len and end == self._prompt_len:
            self.last_prompt_n, self.last_prompt_ms = end - start, (time.perf_counter() - started) * 1000
            if start % self.prefix_unit == 0:
                # ... unless it is generate()'s prompt, from a boundary; under "generation" the last prompt
                # token was steered, which it is not as the context of a longer prompt
                self._exact_len = self._prompt_len - (schedule == "generation" and self._gate_open is not False)
        self._prompt_len = 0

    def _phase(self, on: bool) -> None:
        """The schedule's choice for the positions decoded next, unless a closed gate says unsteered."""
        on = on and self._gate_open is not False
        self.steering.phase(on)
        self._kv_steered = self._kv_steered or (on and not self.steering.state.off)

    def _gated_prompt(self, tokens, start: int) -> int:
        """Evaluate a prompt (or its uncached end) unsteered while reading the gate's neurons at its last
        token; steer it (and the reply) only if the gate fires. Returns where the evaluation started."""
        state = self.steering.state
        if self._kv_steered and start > 0:  # the gate reads the prompt unsteered: recompute a steered prefix
            tokens = self.input_ids[:start].tolist() + list(tokens)
            self.n_tokens = start = 0
            self._kv_steered = False
        if self._reader is None:
            self._reader = LastTokenReader(self.ctx, self.steering.shape.n_layer, self.steering.shape.n_ff)
        self._gate_open = None
        self.steering.phase(False)  # bit for bit unsteered, the same graph
        self._reader.start()
        try:
            super().eval(tokens)
            row = self._reader.last_row()
        finally:
            self._reader.stop()
        mask = state.masks[0]
        values = row[state.gate.columns(mask.layers, mask.neurons, self.steering.shape.n_ff)]
        score = float(state.gate.score(values))
        threshold = state.gate.threshold_for(state.multipliers[0])  # strengthening has its own, stricter one
        fired = score >= threshold
        self.last_gate = GateDecision(fired, score, threshold)
        self._gate_open = fired
        if fired:
            end = int(self.n_tokens)
            if state.schedule == "generation":  # only the last token is steered: evaluate it again
                self.n_tokens = end - 1
                self._phase(True)
                super().eval(self.input_ids[end - 1:end].tolist())
            else:  # the whole prompt under steering, from the start, as a fresh context evaluates it
                whole = self.input_ids[:end].tolist()
                self.n_tokens = start = 0
                self._phase(True)
                super().eval(whole)
        return start

    def reset(self) -> None:
        super().reset()
        self._exact_len = 0
        self._kv_steered = False

    def load_state(self, state) -> None:
        super().load_state(state)
        self._exact_len = 0  # computed who knows how

    def close(self) -> None:
        if hasattr(self, "_stack"):  # an __init__ that failed before Llama's own leaves nothing to close
            super().close()

    def set_mask(self, mask: MaskLike, multiplier: float | None = None, schedule: str | None = None,
                 gate: bool | None = None) -> None:
        self.steering.set_mask(load_mask(mask), multiplier, schedule, gate)

    @property
    def gate(self) -> bool:
        """Whether the mask's gate is in use (only prompts it fires on are steered); settable."""
        return self.steering.gate is not None

    @gate.setter
    def gate(self, on: bool) -> None:
        self.steering.set_gate(on)

    def set_masks(self, masks: Sequence[MaskLike], multipliers: Sequence[float | None] | None = None) -> None:
        """Several masks at once, composed (see `NeuronSteering.set_masks`)."""
        self.steering.set_masks([load_mask(m) for m in masks], multipliers)

    @property
    def multiplier(self) -> float | None:
        return self.steering.multiplier

    @property
    def schedule(self) -> str:
        """Which positions the mask applies at: all, prompt or generation (cna_local.schedules)."""
        return self.steering.schedule

    @schedule.setter
    def schedule(self, value: str) -> None:
        self.steering.set_schedule(value)

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self.steering.multiplier = value
