"""The calibrated default multiplier: the strongest strength whose quality and KL stay within bounds on
calibration prompts, found by bisection, measured in llama.cpp like `cna-local eval` measures."""

from __future__ import annotations

import pytest

from cna_local.calibration import (CalibrationError, calibrate, grid, no_stronger_than_needed, strongest_passing,
                                   weakest_reaching)
from cna_local.fingerprint import fingerprint_from_gguf

from test_eval_runner import make_mask

PROMPTS = ["Write a poem about rain", "Bake bread", "Explain tides", "Plan a picnic", "Name three birds"]


def test_grid_runs_from_the_weakest_to_the_strongest():
    assert grid(-1.0, 0.5) == [0.5, 0.0, -0.5, -1.0]
    assert grid()[0] == 0.75 and grid()[-1] == -3.0


@pytest.mark.parametrize("last_pass", [-1, 0, 3, 7, 16])
def test_bisection_finds_the_last_passing_strength_in_few_tries(last_pass):
    candidates = grid()  # 16 strengths
    calls = []

    def passes(m):
        calls.append(m)
        return candidates.index(m) <= last_pass

    got = strongest_passing(candidates, passes)
    assert got == (None if last_pass < 0 else candidates[min(last_pass, 15)])
    assert len(calls) <= 5


@pytest.mark.parametrize("first_reach", [0, 1, 6, 14, 15, 16])
def test_bisection_finds_the_weakest_strength_that_reaches_in_few_tries(first_reach):
    candidates = grid()[:15]  # the strengths weaker than the strongest passing one (the 16th)
    calls = []

    def reaches(m):
        calls.append(m)
        return candidates.index(m) >= first_reach

    got = weakest_reaching(candidates, reaches)
    assert got == (candidates[first_reach] if first_reach < 15 else None)  # None: only the strongest reaches
    assert len(calls) <= 4 and (got is None or got in calls)  # what it returns was measured


def test_through_the_gate_the_default_is_no_stronger_than_it_takes_to_leave_no_prompt_refused():
    candidates = grid(-6.0)  # 0.75 ... -6
    refused = {0.5: 7, 0.25: 3, 0.0: 1}  # the 1.5B model's calibration: none refused from -0.25 on

    def at(m):
        return refused.get(m, 0 if m < 0.25 else 9)

    assert no_stronger_than_needed(candidates, -4.5, 18, at) == -0.25
    # refusals left at the strongest (a plateau on 20 prompts says little): the strongest stays
    assert no_stronger_than_needed(candidates, -4.5, 18, lambda m: 5 if m <= -3.25 else 9) == -4.5
    # nothing refused unsteered (another behaviour than refusal, or a model that never refuses): the strongest
    assert no_stronger_than_needed(candidates, -4.5, 0, lambda m: 0) == -4.5
    assert no_stronger_than_needed(candidates, None, 18, at) is None


@pytest.fixture(scope="module")
def model(tiny_gguf):
    return tiny_gguf("llama", "f32")


def test_calibration_on_a_tiny_model(model):
    fp = fingerprint_from_gguf(model)
    cal = calibrate(model, make_mask(fp, per_layer=4), PROMPTS, reply_tokens=8, batch_size=3, n_threads=1, n_ctx=256,
                    lowest=-2.0, step=0.5)
    rows = {r["multiplier"]: r for r in cal.record["tried"]}
    assert rows[cal.chosen]["passes"] and cal.quality >= 0.97 and cal.kl <= 0.1
    if cal.chosen > -2.0:  # the next stronger strength was measured and failed
        assert not rows[cal.chosen - 0.5]["passes"]
    assert cal.record["n_prompts"] == 5 and cal.record["schedule"] == "all" and "0.97" in cal.record["rule"]


def test_a_mask_that_fails_at_every_strength_is_reported(model):
    fp = fingerprint_from_gguf(model)
    with pytest.raises(CalibrationError, match="changes ordinary replies at any strength"):
        # every neuron of every layer: even 0.5 moves a random model's replies
        calibrate(model, make_mask(fp), PROMPTS, reply_tokens=8, batch_size=3, n_threads=1, n_ctx=256,
                  lowest=-1.0, step=0.5, min_quality=0.9999, max_kl=1e-6)


def test_a_gate_that_fired_on_no_benign_calibration_prompt_still_counts_its_false_positive_rate():
    """20 prompts with no false positive must not promise that none ever fires: the out-of-fold rate stands."""
    from cna_local.calibration import benign_fire_rate

    info = {"out_of_fold": {"fpr": 0.03}, "fpr_target": 0.05}
    assert benign_fire_rate([False] * 20, info) == 0.03
    assert benign_fire_rate([True] + [False] * 9, info) == 0.1  # more seen here: that
    assert benign_fire_rate([False] * 20, {"fpr_target": 0.05}) == 0.05  # no out-of-fold record: the target


def test_the_false_positive_stand_ins_are_the_fired_prompts_and_the_top_quarter():
    from cna_local.calibration import false_positive_stand_ins

    scores = [1.0, 9.0, 3.0, 8.0, 2.0, 7.0, 0.0, 12.0]
    assert false_positive_stand_ins(scores, threshold=11.0) == [1, 7]  # fired: 7; top quarter: 7 and 1
    assert false_positive_stand_ins(scores, threshold=2.5) == [1, 2, 3, 5, 7]  # every fired one is kept
    assert false_positive_stand_ins([5.0], threshold=9.0) == [0]  # at least one
