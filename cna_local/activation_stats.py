"""Per-[layer, neuron] statistics of MLP activations, whichever backend collected them (no torch here, so
the llama backend runs without importing it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CnaLocalError


class ActivationError(CnaLocalError):
    """Activations cannot be collected for this input."""


@dataclass
class ActivationStats:
    """Running statistics of last-token activations, arrays shaped [n_layer, n_ff]."""

    n: int
    sum: np.ndarray  # float64
    sumsq: np.ndarray  # float64
    values: np.ndarray | None = None  # float32 [n, n_layer, n_ff] in prompt order, only with keep=True
    n_tokens: int = 0  # real (non-padding) prompt tokens, all positions
    token_sumsq: np.ndarray | None = None  # float64 [n_layer, n_ff]: sum of squares over all n_tokens positions
    resid_sum: np.ndarray | None = None  # float64 [n_layer, n_embd]: sum of each layer's output at the last token
    resid_values: np.ndarray | None = None  # float32 [n, n_layer, n_embd] in prompt order, only with keep_residual=True

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.n

    @property
    def var(self) -> np.ndarray:
        """Sample variance (n - 1 in the denominator); zero for a single prompt."""
        if self.n < 2:
            return np.zeros_like(self.sum)
        centered = self.sumsq - self.sum * self.sum / self.n
        return np.maximum(centered, 0.0) / (self.n - 1)  # rounding can make it slightly negative

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    @property
    def token_ms(self) -> np.ndarray:
        """Mean square activation over all prompt tokens (not only the last)."""
        if self.token_sumsq is None or self.n_tokens == 0:
            raise ActivationError("these statistics hold no all-token activations; collect them with collect_activations().")
        return self.token_sumsq / self.n_tokens

    @property
    def resid_mean(self) -> np.ndarray:
        """Mean residual stream after each layer at the last token, [n_layer, n_embd]."""
        if self.resid_sum is None:
            raise ActivationError("these statistics hold no residual-stream sums; collect them with collect_activations().")
        return self.resid_sum / self.n

    @property
    def shape(self) -> tuple[int, int]:
        return self.sum.shape


def as_source(model):
    """An attribution source: a LoadedModel (torch) becomes a TorchSource; a source stays as it is."""
    if hasattr(model, "collect"):
        return model
    from .activations import TorchSource

    return TorchSource(model)
