"""Several masks at once: the per-neuron factors of each mask at its multiplier, multiplied together.

Scaling a neuron by a and then by b is scaling it by a * b, so masks compose by multiplying their factors
where they overlap. A neuron whose composed factor is exactly 1 changes nothing and is left out, so
masks at multiplier 1 compose to the empty mask: exactly the unsteered model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from ..maskfile import NeuronMask

Entries = tuple[np.ndarray, np.ndarray, np.ndarray]  # layers int32, neurons int32, scales float32


def compose(masks: Sequence["NeuronMask"], multipliers: Sequence[float | None]) -> Entries:
    """The (layers, neurons, scales) that apply every mask at its multiplier (None: the mask's own),
    sorted by layer then neuron."""
    if len(masks) != len(multipliers):
        raise ValueError(f"{len(masks)} masks but {len(multipliers)} multipliers")
    factors: dict[tuple[int, int], float] = {}
    for mask, multiplier in zip(masks, multipliers):
        scales = mask.scales_for(multiplier)
        for layer, neuron, scale in zip(mask.layers.tolist(), mask.neurons.tolist(), scales.tolist()):
            key = (layer, neuron)
            # float32 products, as llama.cpp would compute two masks applied one after the other
            factors[key] = float(np.float32(factors.get(key, 1.0)) * np.float32(scale))
    kept = sorted((k, v) for k, v in factors.items() if v != 1.0)
    layers = np.fromiter((k[0] for k, _ in kept), np.int32, len(kept))
    neurons = np.fromiter((k[1] for k, _ in kept), np.int32, len(kept))
    scales = np.fromiter((v for _, v in kept), np.float32, len(kept))
    return layers, neurons, scales
