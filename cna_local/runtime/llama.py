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
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Sequence, Union

import llama_cpp
import numpy as np

from . import binding
from .steering import NeuronSteering, SteeringError

if TYPE_CHECKING:
    from ..maskfile import NeuronMask

MaskLike = Union["NeuronMask", str, os.PathLike]


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

    Other keyword arguments go to `llama_cpp.Llama`.
    """

    def __init__(self, model_path: str, *, mask: MaskLike | None = None, multiplier: float | None = None, **kwargs):
        if mask is None and multiplier is not None:
            raise SteeringError("a multiplier was given without a mask. Fix: pass mask=PATH with it, or drop multiplier.")
        binding.lib()  # a stock libllama fails here, before the model is loaded
        mask = None if mask is None else load_mask(mask)  # a bad mask file fails before the model loads too
        kwargs.setdefault("verbose", False)
        self._exact_len = 0  # leading cached tokens evaluated as prompt, in micro-batches from a boundary
        self._prompt_len = 0  # the prompt generate() is evaluating, until it is
        self.last_reused = 0  # prompt tokens the last generate() took from the KV cache ...
        self.last_prompt_n = 0  # ... and how many it evaluated, in how long
        self.last_prompt_ms = 0.0
        super().__init__(model_path=str(model_path), **kwargs)
        # micro-batches start at every n_batch chunk and every n_ubatch inside it
        self.prefix_unit = self.n_batch if self.n_batch % self.context_params.n_ubatch else self.context_params.n_ubatch
        self.steering = NeuronSteering(self)
        if mask is not None:
            self.steering.set_mask(mask, multiplier)

    # -- prompt-prefix reuse that does not change answers (see the module docstring)

    def reusable_prefix(self, tokens) -> int:
        """How many leading tokens of `tokens` the next generate() takes from the KV cache."""
        n = int(self.n_tokens)
        if n == 0:
            return 0
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
        yield from super().generate(tokens, *args, **kwargs)

    def eval(self, tokens) -> None:
        start = int(self.n_tokens)
        self._exact_len = min(self._exact_len, start)  # what this call evaluates is not from a prompt ...
        started = time.perf_counter()
        super().eval(tokens)
        if self._prompt_len and start + len(tokens) == self._prompt_len:
            self.last_prompt_n, self.last_prompt_ms = len(tokens), (time.perf_counter() - started) * 1000
            if start % self.prefix_unit == 0:
                self._exact_len = self._prompt_len  # ... unless it is generate()'s prompt, from a boundary
        self._prompt_len = 0

    def reset(self) -> None:
        super().reset()
        self._exact_len = 0

    def load_state(self, state) -> None:
        super().load_state(state)
        self._exact_len = 0  # computed who knows how

    def close(self) -> None:
        if hasattr(self, "_stack"):  # an __init__ that failed before Llama's own leaves nothing to close
            super().close()

    def set_mask(self, mask: MaskLike, multiplier: float | None = None) -> None:
        self.steering.set_mask(load_mask(mask), multiplier)

    def set_masks(self, masks: Sequence[MaskLike], multipliers: Sequence[float | None] | None = None) -> None:
        """Several masks at once, composed (see `NeuronSteering.set_masks`)."""
        self.steering.set_masks([load_mask(m) for m in masks], multipliers)

    @property
    def multiplier(self) -> float | None:
        return self.steering.multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self.steering.multiplier = value
