"""Scoring and selection rules, on synthetic [n_layer, n_ff] arrays with known answers."""

import numpy as np
import pytest

from cna_local.scoring import (
    ScoringError,
    delta_score,
    direction_writes,
    normalized_score,
    parse_layer_range,
    pooled_std,
    resolve_k,
    selective_score,
    top_neurons,
    universal_neurons,
)


def test_delta_is_positive_mean_minus_negative_mean():
    pos = np.array([[3.0, 1.0], [0.0, -2.0]])
    neg = np.array([[1.0, 1.0], [2.0, -2.5]])
    np.testing.assert_allclose(delta_score(pos, neg), [[2.0, 0.0], [-2.0, 0.5]])


def test_delta_refuses_arrays_of_different_shapes():
    with pytest.raises(ScoringError, match="differ in shape"):
        delta_score(np.zeros((2, 3)), np.zeros((3, 2)))


def test_normalized_score_divides_by_pooled_sample_std():
    pos_vals = np.array([1.0, 2.0, 3.0, 4.0])
    neg_vals = np.array([0.0, 0.0, 1.0, 3.0])
    expected_pooled = np.sqrt((3 * pos_vals.var(ddof=1) + 3 * neg_vals.var(ddof=1)) / 6)
    score = normalized_score(
        np.array([[pos_vals.mean()]]), np.array([[neg_vals.mean()]]),
        np.array([[pos_vals.var(ddof=1)]]), np.array([[neg_vals.var(ddof=1)]]), 4, 4,
    )
    assert score[0, 0] == pytest.approx((pos_vals.mean() - neg_vals.mean()) / expected_pooled)


def test_normalized_score_prefers_a_consistent_neuron_over_a_noisy_one_with_bigger_delta():
    mean_pos, mean_neg = np.array([[1.0, 5.0]]), np.array([[0.0, 0.0]])
    var = np.array([[0.01, 100.0]])  # neuron 0: small but consistent; neuron 1: large but noisy
    score = normalized_score(mean_pos, mean_neg, var, var, 10, 10)
    assert abs(score[0, 0]) > abs(score[0, 1])
    assert abs(delta_score(mean_pos, mean_neg)[0, 1]) > abs(delta_score(mean_pos, mean_neg)[0, 0])


def test_normalized_score_stays_finite_for_constant_neurons():
    zero = np.zeros((1, 2))
    score = normalized_score(zero, zero, zero, zero, 5, 5)
    assert np.isfinite(score).all() and (score == 0).all()


def test_selective_score_is_what_ablation_fixes_minus_the_activity_it_disturbs_times_the_write_along_the_difference():
    # neuron: 0 fires only on positive prompts; 1 differs as much but sits high on negative prompts too
    # (zeroing it moves the positive mean past the negative one); 2 is like 0 but busy on all other tokens;
    # 3 is like 0 but more active on the negative side (negative delta); 4 is like 0 with a 2x larger write
    # along the direction in which the positive prompts' residual stream differs
    pos = np.array([[2.0, 5.0, 2.0, 0.0, 2.0]])
    neg = np.array([[0.0, 3.0, 0.0, 2.0, 0.0]])
    token_ms = np.array([[0.01, 0.01, 1.0, 0.01, 0.01]])  # rms 0.1, 0.1, 1.0, 0.1, 0.1
    write = np.array([[1.0, 1.0, 1.0, 1.0, 2.0]])
    score = selective_score(pos, neg, token_ms, write)
    np.testing.assert_allclose(score, [[1.9, 0.0, 1.0, 0.0, 3.8]])
    # the reference's delta ranks neuron 1 with the best, though ablating it overshoots the negative mean
    assert abs(delta_score(pos, neg)[0, 1]) == abs(delta_score(pos, neg)[0, 0])


def test_selective_score_cost_weight_scales_only_the_activity_on_ordinary_text():
    # the same neurons as above: neuron 2 (busy on every token, rms 1.0) gains what the weight takes off
    pos = np.array([[2.0, 5.0, 2.0, 0.0, 2.0]])
    neg = np.array([[0.0, 3.0, 0.0, 2.0, 0.0]])
    token_ms = np.array([[0.01, 0.01, 1.0, 0.01, 0.01]])
    write = np.array([[1.0, 1.0, 1.0, 1.0, 2.0]])
    np.testing.assert_array_equal(selective_score(pos, neg, token_ms, write, cost_weight=1.0),
                                  selective_score(pos, neg, token_ms, write))
    np.testing.assert_allclose(selective_score(pos, neg, token_ms, write, cost_weight=0.5), [[1.95, 0.0, 1.5, 0.0, 3.9]])
    np.testing.assert_allclose(selective_score(pos, neg, token_ms, write, cost_weight=0.0), [[2.0, 0.0, 2.0, 0.0, 4.0]])


def test_selective_score_keeps_the_sign_of_the_difference():
    # a neuron firing more on the negative side carries the behaviour when its write points against it
    score = selective_score(np.array([[-2.0]]), np.array([[0.0]]), np.zeros((1, 1)), -np.ones((1, 1)))
    assert score[0, 0] == -2.0


def test_selective_score_ignores_neurons_whose_difference_pushes_against_the_behaviour_direction():
    pos, neg, ms = np.array([[2.0, -2.0]]), np.array([[0.0, 0.0]]), np.zeros((1, 2))
    np.testing.assert_array_equal(selective_score(pos, neg, ms, np.array([[-1.0, 1.0]])), [[0.0, 0.0]])


def test_direction_writes_project_each_column_on_the_unit_difference_of_the_residual_means():
    w = [np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 2.0]]), np.array([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0]])]
    pos = np.array([[4.0, 0.0], [0.0, 5.0]])
    neg = np.array([[1.0, 0.0], [0.0, 1.0]])  # layer 0 differs along x, layer 1 along y
    np.testing.assert_allclose(direction_writes(w, pos, neg), [[1.0, 0.0, 2.0], [1.0, -1.0, 0.0]])
    # identical sets have no direction: every write is 0, so nothing is selected rather than NaN
    assert not direction_writes(w, neg, neg).any()


def test_selective_score_refuses_mismatched_inputs():
    with pytest.raises(ScoringError, match="differ in shape"):
        selective_score(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((3, 2)))


def test_pooled_std_needs_three_prompts():
    with pytest.raises(ScoringError, match="at least 3 prompts"):
        pooled_std(np.zeros(1), np.zeros(1), 1, 1)


@pytest.mark.parametrize("n_total, fraction, expected", [
    (24 * 4864, 0.001, 117),  # Qwen2.5-0.5B: 0.1% of 116736 neurons
    (384, 0.001, 1),  # rounds to 0, but at least one neuron
    (1000, 0.0025, 2),  # rounds half to even like Python's round
    (1000, 1.0, 1000),
])
def test_k_from_fraction_of_all_neurons(n_total, fraction, expected):
    assert resolve_k(n_total, top_fraction=fraction) == expected


def test_k_defaults_to_a_tenth_of_a_percent():
    assert resolve_k(100_000) == 100


def test_k_as_count():
    assert resolve_k(100, top_k=7) == 7


@pytest.mark.parametrize("kwargs, message", [
    ({"top_fraction": 0.1, "top_k": 3}, "not both"),
    ({"top_fraction": 0.0}, r"\(0, 1\]"),
    ({"top_fraction": 1.5}, r"\(0, 1\]"),
    ({"top_fraction": float("nan")}, r"\(0, 1\]"),
    ({"top_k": 0}, "between 1"),
    ({"top_k": 101}, "between 1"),
])
def test_bad_k_parameters_are_rejected(kwargs, message):
    with pytest.raises(ScoringError, match=message):
        resolve_k(100, **kwargs)


def test_top_neurons_ranks_by_magnitude_over_all_layers():
    scores = np.zeros((3, 4))
    scores[0, 2] = 0.5
    scores[1, 1] = -3.0  # most negative counts as strongest
    scores[2, 3] = 2.0
    scores[2, 0] = 0.1
    sel = top_neurons(scores, 3)
    assert list(zip(sel.layers, sel.neurons)) == [(0, 2), (1, 1), (2, 3)]  # sorted by (layer, neuron)
    np.testing.assert_allclose(sel.scores, [0.5, -3.0, 2.0])
    assert sel.layers.dtype == np.int32 and sel.neurons.dtype == np.int32 and sel.scores.dtype == np.float32


def test_top_neurons_breaks_ties_by_lower_layer_then_neuron():
    scores = np.ones((2, 3))
    sel = top_neurons(scores, 2)
    assert list(zip(sel.layers, sel.neurons)) == [(0, 0), (0, 1)]


def test_layer_range_limits_the_candidates():
    scores = np.zeros((4, 2))
    scores[0, 0] = 10.0  # strongest, but outside 1:3
    scores[3, 1] = 9.0  # outside too (END is exclusive)
    scores[1, 1] = 1.0
    scores[2, 0] = 2.0
    sel = top_neurons(scores, 2, layer_range=(1, 3))
    assert list(zip(sel.layers, sel.neurons)) == [(1, 1), (2, 0)]


def test_excluded_neurons_are_skipped_and_the_next_ones_fill_up():
    scores = np.array([[5.0, 4.0, 3.0, 2.0]])
    exclude = np.array([[True, False, False, False]])
    sel = top_neurons(scores, 2, exclude=exclude)
    assert list(sel.neurons) == [1, 2]


def test_top_neurons_refuses_nan_scores():
    with pytest.raises(ScoringError, match="NaN"):
        top_neurons(np.array([[1.0, np.nan]]), 1)


def test_top_neurons_refuses_more_than_the_candidates():
    with pytest.raises(ScoringError, match="only 2 are candidates"):
        top_neurons(np.ones((2, 2)), 3, layer_range=(0, 1))


def _contrasts_where(neuron_hits: dict[int, int], n_contrasts: int = 10, n_ff: int = 50) -> list[np.ndarray]:
    """Scores for n_contrasts contrasts; neuron j is the strongest in its first neuron_hits[j] contrasts."""
    rng = np.random.default_rng(0)
    contrasts = []
    for c in range(n_contrasts):
        s = rng.uniform(-0.1, 0.1, size=(1, n_ff))
        for j, hits in neuron_hits.items():
            if c < hits:
                s[0, j] = 10.0 + j
        contrasts.append(s)
    return contrasts


def test_universal_neurons_are_those_in_the_top_set_of_at_least_80_percent_of_contrasts():
    contrasts = _contrasts_where({3: 8, 7: 7, 11: 10})  # k=3 leaves room for all three
    universal = universal_neurons(contrasts, k=3, threshold=0.8)
    assert set(np.flatnonzero(universal[0])) == {3, 11}  # 8/10 and 10/10 qualify; 7/10 does not


def test_universal_threshold_is_an_option():
    contrasts = _contrasts_where({3: 8, 7: 7, 11: 10})
    assert set(np.flatnonzero(universal_neurons(contrasts, k=3, threshold=0.7)[0])) == {3, 7, 11}
    assert set(np.flatnonzero(universal_neurons(contrasts, k=3, threshold=1.0)[0])) == {11}


def test_universal_filter_uses_the_same_k_and_layer_range():
    contrasts = [np.array([[5.0, 4.0], [9.0, 0.0]])] * 5
    # With k=1 over all layers only (1, 0) is ever top; within layer 0 it is (0, 0).
    assert universal_neurons(contrasts, k=1)[1, 0]
    restricted = universal_neurons(contrasts, k=1, layer_range=(0, 1))
    assert restricted[0, 0] and not restricted[1, 0]


@pytest.mark.parametrize("threshold", [0.0, 1.5])
def test_universal_threshold_must_be_a_fraction(threshold):
    with pytest.raises(ScoringError, match="threshold"):
        universal_neurons([np.ones((1, 2))], 1, threshold=threshold)


def test_universal_filter_needs_contrasts():
    with pytest.raises(ScoringError, match="at least one contrast"):
        universal_neurons([], 1)


@pytest.mark.parametrize("spec, expected", [
    (None, (0, 24)), ("", (0, 24)), (":", (0, 24)),
    ("4:20", (4, 20)), ("8:", (8, 24)), (":12", (0, 12)),
    ("-4:", (20, 24)), (":-1", (0, 23)),
])
def test_layer_range_is_start_inclusive_end_exclusive(spec, expected):
    assert parse_layer_range(spec, 24) == expected


@pytest.mark.parametrize("spec, message", [
    ("5", "START:END"), ("1:2:3", "START:END"), ("a:b", "integers"),
    ("20:4", "empty or outside"), ("0:25", "empty or outside"), ("3:3", "empty or outside"),
])
def test_bad_layer_ranges_are_rejected(spec, message):
    with pytest.raises(ScoringError, match=message):
        parse_layer_range(spec, 24)
