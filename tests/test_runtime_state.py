"""What is set on a SteeredLlama is one record: masks and multipliers, raw entries, or nothing.

Every accessor (mask, multiplier, entries read back from llama.cpp) agrees with it after every
transition, and scaled() and evaluate() give back exactly what was set before them.
"""

from __future__ import annotations

import numpy as np
import pytest

from cna_local.errors import CnaLocalError
from cna_local.evaluation.runner import evaluate
from cna_local.runtime import SteeredLlama, SteeringError, compose

from test_runtime_llama import mask_for


@pytest.fixture(scope="module")
def model(tiny_gguf):
    return tiny_gguf("llama", "f32")


@pytest.fixture
def llm(model):
    llm = SteeredLlama(str(model), n_ctx=256, n_threads=2)
    yield llm
    llm.close()


def read_back(llm):
    layers, neurons, scales = llm.steering.entries()
    return [layers.tolist(), neurons.tolist(), scales.tolist()]


RAW = ([2, 0], [7, 3], [0.5, -1.0])  # unsorted on purpose
RAW_SORTED = ([0, 2], [3, 7], [-1.0, 0.5])


def test_set_mask_then_set_entries_describes_the_entries(llm, tmp_path):
    mask = mask_for(llm.model_path, tmp_path, multiplier=-1.0)
    llm.set_mask(mask)
    assert llm.steering.mask is mask and llm.multiplier == -1.0
    llm.steering.set_entries(*RAW)
    # the mask is gone: nothing may still claim it
    assert llm.steering.mask is None and llm.multiplier is None and llm.steering.masks == ()
    assert read_back(llm) == list(RAW_SORTED)
    with pytest.raises(SteeringError, match="no mask is set"):
        llm.multiplier = 0.0
    assert read_back(llm) == list(RAW_SORTED)


def test_scaled_restores_exactly_what_was_set(llm, tmp_path):
    mask = mask_for(llm.model_path, tmp_path, multiplier=-1.0)
    llm.set_mask(mask, 0.5)
    with llm.steering.scaled(2.0):
        assert llm.multiplier == 2.0 and set(read_back(llm)[2]) == {2.0}
    assert llm.steering.mask is mask and llm.multiplier == 0.5 and set(read_back(llm)[2]) == {0.5}
    llm.steering.set_entries(*RAW)
    with pytest.raises(SteeringError, match="no mask is set"):
        with llm.steering.scaled(2.0):
            pass
    assert read_back(llm) == list(RAW_SORTED)


@pytest.mark.parametrize("before", ["raw", "mask", "off"])
def test_evaluate_restores_what_was_set(llm, tmp_path, before):
    mask = mask_for(llm.model_path, tmp_path, multiplier=-1.0)
    other = mask_for(llm.model_path, tmp_path, name="other.gguf", multiplier=0.0)
    if before == "raw":
        llm.steering.set_entries(*RAW)
    elif before == "mask":
        llm.set_mask(other, 0.25)
    state = llm.steering.state
    entries = read_back(llm)
    evaluate(llm, mask, [1.0, -1.0], harmful=["Say hi"], benign=["Say bye"], capability=[],
             max_tokens=2, quality_tokens=2, progress=False)
    assert llm.steering.state is state and read_back(llm) == entries
    assert llm.steering.mask is (other if before == "mask" else None)


def test_clear_then_everything_reads_off(llm, tmp_path):
    llm.set_mask(mask_for(llm.model_path, tmp_path), 0.0)
    llm.steering.clear()
    assert llm.steering.state.off and not llm.steering.active
    assert llm.steering.mask is None and llm.multiplier is None and read_back(llm) == [[], [], []]


def test_two_masks_compose_by_multiplying_where_they_overlap(llm, tmp_path):
    a = mask_for(llm.model_path, tmp_path, name="a.gguf", multiplier=-1.0)
    b = mask_for(llm.model_path, tmp_path, name="b.gguf", multiplier=0.5)  # same neurons as a (same seed)
    llm.set_masks([a, b], [-1.0, 0.5])
    layers, neurons, scales = llm.steering.entries()
    assert np.allclose(scales, -0.5) and llm.steering.multipliers == (-1.0, 0.5) and llm.steering.mask is None
    want = compose([a, b], [-1.0, 0.5])
    assert np.array_equal(layers, want[0]) and np.array_equal(neurons, want[1]) and np.array_equal(scales, want[2])
    with pytest.raises(SteeringError, match="2 masks are set"):
        llm.multiplier = 0.0
    llm.steering.set_multipliers([2.0, 1.0])  # b at 1 changes nothing
    assert np.allclose(llm.steering.entries()[2], 2.0)


def test_masks_at_multiplier_one_compose_to_the_unsteered_model(llm, tmp_path):
    a = mask_for(llm.model_path, tmp_path, name="a.gguf", multiplier=-1.0)
    plain = llm.create_completion("Hello there", max_tokens=6, temperature=0.0)["choices"][0]["text"]
    llm.set_masks([a, a], [1.0, 1.0])
    assert not llm.steering.active and llm.steering.multipliers == (1.0, 1.0)
    assert llm.create_completion("Hello there", max_tokens=6, temperature=0.0)["choices"][0]["text"] == plain


def test_setting_what_is_already_set_keeps_the_cached_prompt(llm, tmp_path):
    mask = mask_for(llm.model_path, tmp_path, multiplier=-1.0)
    llm.set_mask(mask)
    llm.eval(llm.tokenize(b"Some prompt"))
    n = llm.n_tokens
    llm.set_mask(mask, -1.0)  # the same computation
    assert llm.n_tokens == n
    llm.multiplier = 0.0  # another one: the cached tokens were computed under -1
    assert llm.n_tokens == 0


def test_multiplier_without_a_mask_fails_before_the_model_loads(tmp_path):
    missing = tmp_path / "no-such-model.gguf"  # loading it would fail differently
    with pytest.raises(CnaLocalError, match="multiplier, schedule or gate was given without a mask"):
        SteeredLlama(str(missing), multiplier=0.0)


def test_a_bad_mask_file_fails_before_the_model_loads(tmp_path):
    with pytest.raises(CnaLocalError, match="does not exist"):
        SteeredLlama(str(tmp_path / "no-such-model.gguf"), mask=tmp_path / "no-such-mask.gguf")
