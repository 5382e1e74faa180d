"""compose(): several masks at their multipliers as one set of per-neuron factors (no llama.cpp needed)."""

from __future__ import annotations

import numpy as np
import pytest

from cna_local.maskfile import NeuronMask
from cna_local.runtime.composition import compose


def mask(layers, neurons, multiplier=0.0, scales=None) -> NeuronMask:
    return NeuronMask(arch="llama", n_layer=4, n_ff=16, n_embd=8, fingerprint="f" * 64, model_name="t",
                      layers=layers, neurons=neurons, scores=np.ones(len(layers)), multiplier=multiplier,
                      scales=scales)


def as_dict(entries):
    return {(int(l), int(n)): float(s) for l, n, s in zip(*entries)}


def test_factors_multiply_where_masks_overlap_and_stand_alone_elsewhere():
    a = mask([0, 1, 2], [3, 4, 5])
    b = mask([1, 2, 3], [4, 6, 7])
    got = as_dict(compose([a, b], [-1.0, 2.0]))
    assert got == {(0, 3): -1.0, (1, 4): -2.0, (2, 5): -1.0, (2, 6): 2.0, (3, 7): 2.0}


def test_a_mask_at_one_adds_nothing_and_all_at_one_is_empty():
    a, b = mask([0, 1], [3, 4]), mask([1], [4])
    assert as_dict(compose([a, b], [0.5, 1.0])) == {(0, 3): 0.5, (1, 4): 0.5}
    layers, neurons, scales = compose([a, b], [1.0, 1.0])
    assert len(layers) == len(neurons) == len(scales) == 0


def test_factors_that_cancel_to_one_are_dropped():
    a, b = mask([0], [3]), mask([0], [3])
    assert as_dict(compose([a, b], [2.0, 0.5])) == {}


def test_none_means_the_masks_own_multiplier_and_per_neuron_scales_are_honoured():
    a = mask([0, 0], [1, 2], multiplier=-1.5)
    t = mask([0, 0], [1, 2], multiplier=0.0, scales=[0.5, 0.0])  # m + (1 - m) t
    got = as_dict(compose([a, t], [None, 0.0]))
    assert got == pytest.approx({(0, 1): -1.5 * 0.5, (0, 2): 0.0})


def test_one_mask_gives_exactly_its_own_scales():
    a = mask([2, 0, 1], [1, 9, 3], multiplier=-1.5)
    layers, neurons, scales = compose([a], [None])
    assert layers.tolist() == [0, 1, 2] and neurons.tolist() == [9, 3, 1]
    assert np.array_equal(scales, a.scales_for(-1.5))
    assert scales.dtype == np.float32


def test_a_multiplier_per_mask():
    with pytest.raises(ValueError):
        compose([mask([0], [1])], [0.0, 1.0])
