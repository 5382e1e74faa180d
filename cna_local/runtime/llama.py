"""`SteeredLlama`: a `llama_cpp.Llama` that carries a neuron mask.

Everything `Llama` offers (completion, chat completion, streaming, embeddings) works unchanged; the mask
is applied inside llama.cpp's FFN on whatever backend the layers run on (CPU, Metal, CUDA).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Union

import llama_cpp

from . import binding
from .steering import NeuronSteering

if TYPE_CHECKING:
    from ..maskfile import NeuronMask

MaskLike = Union["NeuronMask", str, os.PathLike]


class SteeredLlama(llama_cpp.Llama):
    """Open a GGUF model with an optional neuron mask.

    >>> llm = SteeredLlama("model.gguf", mask="refusal.mask.gguf", multiplier=0.0, n_ctx=2048)
    >>> llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}])
    >>> llm.multiplier = -1.0        # live: no reload, the cached prompt state is dropped
    >>> llm.steering.clear()         # back to the unsteered model, exactly

    Other keyword arguments go to `llama_cpp.Llama`.
    """

    def __init__(self, model_path: str, *, mask: MaskLike | None = None, multiplier: float | None = None, **kwargs):
        binding.lib()  # a stock libllama fails here, before the model is loaded
        kwargs.setdefault("verbose", False)
        super().__init__(model_path=str(model_path), **kwargs)
        self.steering = NeuronSteering(self)
        if mask is not None:
            self.set_mask(mask, multiplier)
        elif multiplier is not None:
            raise ValueError("a multiplier was given without a mask")

    def set_mask(self, mask: MaskLike, multiplier: float | None = None) -> None:
        if not hasattr(mask, "layers"):
            from ..maskfile import NeuronMask

            mask = NeuronMask.load(mask)
        self.steering.set_mask(mask, multiplier)

    @property
    def multiplier(self) -> float | None:
        return self.steering.multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self.steering.multiplier = value
