"""The gate: fitted to a stated false-positive rate on the mask's neurons (stored as format version 3) or on
neurons of its own (version 4), with a stricter threshold for strengthening (version 5), and refused with a
clear error where its data is bad."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cna_local.gate import Gate, GateError, auc, choose_threshold, fit_gate, fold_ids, top_by_t, top_by_t_folds
from cna_local.maskfile import FORMAT_VERSION, KEY_PREFIX, MaskFileError, read_mask, tensor_name

from test_maskfile import good_kv, good_tensors, make_mask, write_gguf


def separable(shift: float, n_pos=120, n_neg=100, n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(shift, 1.0, (n_pos, n)), rng.normal(0.0, 1.0, (n_neg, n))


# -- fitting

def test_the_threshold_keeps_the_out_of_fold_false_positive_rate_within_the_target():
    pos, neg = separable(0.15)  # overlapping sets: the rate binds
    for fpr in (0.0, 0.05, 0.2):
        gate = fit_gate(pos, neg, fpr=fpr)
        assert gate.info["out_of_fold"]["fpr"] <= fpr + 1e-9
        assert gate.info["fpr_target"] == fpr
    loose, tight = fit_gate(pos, neg, fpr=0.2), fit_gate(pos, neg, fpr=0.0)
    assert loose.info["out_of_fold"]["tpr"] >= tight.info["out_of_fold"]["tpr"]


def test_on_unseen_prompts_the_false_positive_rate_is_near_the_target():
    pos, neg = separable(0.2, seed=1)
    gate = fit_gate(pos, neg, fpr=0.1)
    new_pos, new_neg = separable(0.2, n_pos=2000, n_neg=2000, seed=2)
    assert gate.fires(new_neg).mean() < 0.1 + 0.06  # the out-of-fold threshold does not overfit the negatives
    assert gate.fires(new_pos).mean() > gate.fires(new_neg).mean() + 0.2


def test_well_separated_sets_get_a_threshold_in_the_gap():
    pos, neg = separable(2.0)
    gate = fit_gate(pos, neg, fpr=0.05)
    assert gate.fires(pos).all() and not gate.fires(neg).any()
    assert gate.info["out_of_fold"]["auc"] == 1.0


def test_choose_threshold_prefers_positives_then_fewer_negatives_then_the_widest_gap():
    s_pos, s_neg = np.array([5.0, 6.0, 9.0]), np.array([0.0, 1.0, 2.0])
    assert choose_threshold(s_pos, s_neg, 0.0) == pytest.approx(3.5)  # every positive, no negative, mid-gap
    assert choose_threshold(np.array([1.5]), s_neg, 0.34) == pytest.approx(1.25)  # one negative allowed


def test_the_rate_is_a_cap_a_lower_threshold_must_gain_more_positives_than_negatives():
    s_neg = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 10], float)  # each negative is 10% of the set
    s_pos = np.concatenate([[9.5], np.arange(20.0, 39.0)])  # each positive is 5%
    # letting one negative (10%) through would gain one positive (5%): not worth it, though the cap allows it
    assert choose_threshold(s_pos, s_neg, 0.1) == pytest.approx(15.0)
    s_pos = np.concatenate([[9.5, 9.6, 9.7], np.arange(20.0, 37.0)])  # now it gains three (15%): worth it
    assert choose_threshold(s_pos, s_neg, 0.1) == pytest.approx(8.75)


def test_auc_counts_ties_as_half():
    assert auc(np.array([1.0, 2.0]), np.array([0.0, 2.0])) == pytest.approx(0.625)


@pytest.mark.parametrize("args, message", [
    (dict(fpr=1.0), "false-positive rate"),
    (dict(folds=1), "folds"),
    (dict(method="svm"), "unknown gate method"),
])
def test_bad_fit_arguments_are_named(args, message):
    pos, neg = separable(1.0)
    with pytest.raises(GateError, match=message):
        fit_gate(pos, neg, **args)


def test_too_few_prompts_for_the_folds():
    with pytest.raises(GateError, match="needs at least 5 prompts in each set"):
        fit_gate(np.ones((3, 4)), np.zeros((10, 4)))


def test_always_and_never():
    x = np.random.default_rng(0).normal(size=(7, 3))
    assert Gate.always(3).fires(x).all()
    assert not Gate.never(3).fires(x).any()


# -- the file

def gated(**overrides):
    mask = make_mask(**overrides)
    return dataclasses.replace(mask, gate=Gate(np.array([0.5, -1.0, 2.0, 0.25]), 0.75, {"method": "lda", "fpr_target": 0.05}))


def test_a_gate_on_the_masks_neurons_is_version_3_and_round_trips(tmp_path):
    assert FORMAT_VERSION == 5
    mask = gated()
    path = mask.save(tmp_path / "g.gguf")
    back = read_mask(path)
    assert back.meta["version"] == 3
    np.testing.assert_array_equal(back.gate.weights, mask.gate.weights)
    assert back.gate.threshold == pytest.approx(0.75)
    assert back.gate.info["method"] == "lda"
    # the gate's weights stay with their neurons (entries are sorted by layer, then neuron)
    pairs = dict(zip(zip(mask.layers.tolist(), mask.neurons.tolist()), mask.gate.weights.tolist()))
    assert dict(zip(zip(back.layers.tolist(), back.neurons.tolist()), back.gate.weights.tolist())) == pairs


def test_weights_follow_their_neurons_when_the_entries_are_sorted():
    mask = make_mask(layers=[2, 0], neurons=[5, 9], scores=[1.0, 1.0], gate=Gate(np.array([7.0, 3.0]), 0.0))
    assert mask.layers.tolist() == [0, 2] and mask.gate.weights.tolist() == [3.0, 7.0]


def test_a_mask_without_a_gate_keeps_the_older_versions(tmp_path):
    assert read_mask(make_mask().save(tmp_path / "plain.gguf")).meta["version"] == 1
    assert read_mask(make_mask().save(tmp_path / "plain.gguf")).gate is None


def test_an_older_reader_refuses_a_gated_mask_by_name(tmp_path, monkeypatch):
    import cna_local.maskfile as maskfile

    path = gated().save(tmp_path / "g.gguf")
    monkeypatch.setattr(maskfile, "FORMAT_VERSION", 2)  # the reader of cna-local before gates
    with pytest.raises(MaskFileError, match="version 3 mask; this cna-local reads up to version 2.*upgrade"):
        read_mask(path)


def gate_tensor(values, layer=0):
    return {tensor_name(layer, "gate"): np.array(values, np.float32)}


V3 = {KEY_PREFIX + "version": 3, KEY_PREFIX + "gate_threshold": 0.5, KEY_PREFIX + "gate": '{"method": "lda"}'}


@pytest.mark.parametrize("kv, tensors, message", [
    (V3, gate_tensor([1.0, float("nan")]), "gate is damaged: gate weight 1 is nan"),
    ({**V3, KEY_PREFIX + "gate_threshold": float("inf")}, gate_tensor([1.0, 2.0]), "threshold is inf"),
    ({**V3, KEY_PREFIX + "gate_threshold": None}, gate_tensor([1.0, 2.0]), "no gate_threshold entry"),
    (V3, {}, "version 3 \\(gated\\) mask with no neuron_gate tensors"),
    ({**V3, KEY_PREFIX + "version": 2}, gate_tensor([1.0, 2.0]), "version 2 mask with gate entries"),
    (V3, gate_tensor([1.0, 2.0, 3.0]), "tensors of layer 0 differ in length"),
    ({**V3, KEY_PREFIX + "gate": "[1]"}, gate_tensor([1.0, 2.0]), "gate entry is list JSON"),
    (V3, {**gate_tensor([1.0, 2.0]), **good_tensors(layer=1), tensor_name(1, "idx"): np.array([1, 5], np.int32)},
     "some layers have neuron_gate tensors and others do not"),
])
def test_bad_gate_data_is_a_clear_error(tmp_path, kv, tensors, message):
    n = 4 if any(".1." in t for t in tensors) else 2
    path = write_gguf(tmp_path / "bad.gguf", good_kv(**{**kv, KEY_PREFIX + "n_neurons": n}), {**good_tensors(), **tensors})
    with pytest.raises(MaskFileError, match=message):
        read_mask(path)


# -- a gate over neurons of its own (version 4)

def rows_with_signal(n_layer=3, n_ff=20, signal=((1, 4), (2, 17), (0, 0)), shift=1.5, seed=0):
    rng = np.random.default_rng(seed)
    pos, neg = rng.normal(0, 1, (120, n_layer * n_ff)), rng.normal(0, 1, (100, n_layer * n_ff))
    for layer, neuron in signal:
        pos[:, layer * n_ff + neuron] += shift
    return pos, neg


def test_an_own_gate_reads_the_neurons_that_separate_the_sets_over_every_layer():
    pos, neg = rows_with_signal()
    gate = fit_gate(pos, neg, own=3, n_ff=20)
    assert gate.own and sorted(zip(gate.layers.tolist(), gate.neurons.tolist())) == [(0, 0), (1, 4), (2, 17)]
    assert gate.info["neurons"].startswith("own") and gate.info["n_neurons"] == 3
    cols = gate.columns(np.array([0]), np.array([9]), 20)  # the mask's neurons do not matter to it
    assert cols.tolist() == [0, 24, 57]
    assert gate.info["out_of_fold"]["auc"] > 0.9


def test_the_fit_reports_each_of_its_folds_and_the_final_fit_and_the_gate_is_the_same():
    """attribute's progress bar: one step per fold and one for the fit on all prompts."""
    pos, neg = rows_with_signal()
    steps = []
    gate = fit_gate(pos, neg, own=3, n_ff=20, folds=4, on_step=lambda: steps.append(1))
    assert len(steps) == 4 + 1
    quiet = fit_gate(pos, neg, own=3, n_ff=20, folds=4)
    assert quiet.threshold == gate.threshold and np.array_equal(quiet.weights, gate.weights)


def test_each_folds_neurons_come_from_its_moments_as_from_its_own_rows():
    """fit_gate chooses a fold's neurons from per-fold sums (no copy of the other folds' rows): the same
    neurons `top_by_t` picks on that fold's training rows, for every fold and for all prompts."""
    rng = np.random.default_rng(5)
    pos = rng.normal(0.3, 1.0, (37, 500)).astype(np.float32) * rng.uniform(0.1, 3.0, 500).astype(np.float32)
    neg = rng.normal(0.0, 1.0, (29, 500)).astype(np.float32)
    fold_pos, fold_neg = fold_ids(len(pos), len(neg), 5, 0)  # out_of_fold_scores' folds
    select = top_by_t_folds(pos, neg, 40, folds=5, seed=0)
    for f in range(5):
        assert select(f).tolist() == top_by_t(pos[fold_pos != f].astype(np.float64),
                                              neg[fold_neg != f].astype(np.float64), 40).tolist()
    assert select(None).tolist() == top_by_t(pos.astype(np.float64), neg.astype(np.float64), 40).tolist()


def test_float32_rows_give_the_gate_float64_rows_give():
    """The captured rows are float32; the gate fits them without a float64 copy and gets the same gate."""
    pos, neg = rows_with_signal()
    wide = fit_gate(pos, neg, own=3, n_ff=20)
    narrow = fit_gate(pos.astype(np.float32), neg.astype(np.float32), own=3, n_ff=20)
    assert narrow.layers.tolist() == wide.layers.tolist() and narrow.neurons.tolist() == wide.neurons.tolist()
    np.testing.assert_allclose(narrow.weights, wide.weights, rtol=1e-5)
    assert narrow.threshold == pytest.approx(wide.threshold, rel=1e-5)


def test_an_own_gate_chooses_its_neurons_inside_each_fold_so_noise_gets_no_credit():
    """On pure noise, neurons picked on all prompts would separate them in sample; picked inside each fold,
    the out-of-fold scores of the held fold are chance."""
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(0, 1, (60, 2000)), rng.normal(0, 1, (60, 2000))
    gate = fit_gate(pos, neg, own=20, n_ff=100)
    assert gate.info["out_of_fold"]["auc"] < 0.7
    assert gate.info["in_sample"]["tpr"] > gate.info["out_of_fold"]["tpr"]


def test_bad_own_gate_arguments_are_named():
    pos, neg = rows_with_signal()
    with pytest.raises(GateError, match="whole rows of n_ff values"):
        fit_gate(pos, neg, own=3, n_ff=7)
    with pytest.raises(GateError, match="at least 1 neuron"):
        fit_gate(pos, neg, own=0, n_ff=20)
    with pytest.raises(GateError, match="twice"):
        Gate(np.ones(2), 0.0, layers=[1, 1], neurons=[3, 3])
    with pytest.raises(GateError, match="both their layers and their indices"):
        Gate(np.ones(2), 0.0, layers=[1, 1])


def own_gated(**overrides):
    mask = make_mask(**overrides)
    gate = Gate(np.array([0.5, -1.0, 2.0]), 0.75, {"method": "lda", "neurons": "own"}, layers=[3, 0, 3], neurons=[9, 3, 1])
    return dataclasses.replace(mask, gate=gate)


def test_a_gate_on_its_own_neurons_is_version_4_and_round_trips(tmp_path):
    mask = own_gated()
    back = read_mask(mask.save(tmp_path / "g4.gguf"))
    assert back.meta["version"] == 4 and back.gate.own
    # sorted by layer, then neuron, each weight with its neuron, in layers the mask does not touch too
    assert list(zip(back.gate.layers.tolist(), back.gate.neurons.tolist(), back.gate.weights.tolist())) == \
        [(0, 3, -1.0), (3, 1, 2.0), (3, 9, 0.5)]
    assert back.gate.threshold == pytest.approx(0.75)
    np.testing.assert_array_equal(back.layers, mask.layers)  # the mask's own entries are untouched


def test_a_version_3_reader_refuses_a_version_4_mask_by_name(tmp_path, monkeypatch):
    import cna_local.maskfile as maskfile

    path = own_gated().save(tmp_path / "g4.gguf")
    monkeypatch.setattr(maskfile, "FORMAT_VERSION", 3)
    with pytest.raises(MaskFileError, match="version 4 mask; this cna-local reads up to version 3.*upgrade"):
        read_mask(path)


def own_gate_tensors(idx, weights, layer=3):
    return {tensor_name(layer, "gate_idx"): np.array(idx, np.int32), tensor_name(layer, "gate_weight"): np.array(weights, np.float32)}


V4 = {**V3, KEY_PREFIX + "version": 4}


@pytest.mark.parametrize("kv, tensors, message", [
    (V4, own_gate_tensors([1, 2], [1.0, float("inf")]), "gate weight 1 is inf"),
    (V4, own_gate_tensors([1, 2**20], [1.0, 2.0]), "reads neuron 1048576 of layer 3, which"),
    (V4, own_gate_tensors([2, 1], [1.0, 2.0]), "not strictly ascending"),
    (V4, own_gate_tensors([1, 2], [1.0]), "gate tensors of layer 3 differ in length"),
    (V4, {tensor_name(3, "gate_idx"): np.array([1], np.int32)}, "has only neuron_gate_idx"),
    (V4, {}, r"version 4 \(gated\) mask with no neuron_gate_idx tensors"),
    (V4, {**own_gate_tensors([1], [1.0]), **gate_tensor([1.0, 2.0])}, "neuron_gate tensors, which belong to a version 3"),
    (V3, {**own_gate_tensors([1], [1.0]), **gate_tensor([1.0, 2.0])}, "version 3 mask with neuron_gate_idx tensors"),
])
def test_bad_own_gate_data_is_a_clear_error(tmp_path, kv, tensors, message):
    path = write_gguf(tmp_path / "bad.gguf", good_kv(**{**kv, KEY_PREFIX + "n_neurons": 2}), {**good_tensors(), **tensors})
    with pytest.raises(MaskFileError, match=message):
        read_mask(path)


def test_a_gated_mask_keeps_a_static_default_for_when_the_gate_is_off(tmp_path):
    mask = dataclasses.replace(gated(multiplier=-4.0), static_multiplier=-1.5)
    back = read_mask(mask.save(tmp_path / "g.gguf"))
    assert back.multiplier == -4.0 and back.static_multiplier == -1.5
    assert back.default_multiplier(True) == -4.0 and back.default_multiplier(False) == -1.5
    assert make_mask(multiplier=-2.0).default_multiplier(False) == -2.0
    with pytest.raises(MaskFileError, match="belongs to a gated mask"):
        make_mask(static_multiplier=-1.0)


def test_the_inspect_command_shows_the_gate(tmp_path):
    from click.testing import CliRunner

    from cna_local.cli import cli

    path = dataclasses.replace(gated(multiplier=-4.0), static_multiplier=-1.5).save(tmp_path / "g.gguf")
    out = CliRunner().invoke(cli, ["inspect", str(path)]).output
    assert "gate        lda on the mask's neurons, threshold 0.75" in out
    assert "multiplier -4 through the gate, -1.5 on every prompt (gate off)" in out
    own = CliRunner().invoke(cli, ["inspect", str(own_gated().save(tmp_path / "g4.gguf"))]).output
    assert "gate        lda on 3 neurons of its own (layers 0-3), threshold 0.75" in own


# -- a second, stricter threshold for strengthening (version 5)

def test_strengthening_gets_a_threshold_under_a_lower_false_positive_cap():
    pos, neg = separable(0.3)  # overlapping sets: both caps bind
    gate = fit_gate(pos, neg, fpr=0.2, fpr_strengthen=0.02)
    st = gate.info["strengthen"]
    assert gate.threshold_strengthen > gate.threshold
    assert st["fpr_target"] == 0.02 and st["threshold"] == gate.threshold_strengthen
    assert st["out_of_fold"]["fpr"] <= 0.02 < gate.info["out_of_fold"]["fpr"]
    assert st["out_of_fold"]["tpr"] <= gate.info["out_of_fold"]["tpr"]
    # the same rule as the first threshold, under the lower cap
    alone = fit_gate(pos, neg, fpr=0.02, fpr_strengthen=None)
    assert gate.threshold_strengthen == pytest.approx(alone.threshold)
    assert alone.threshold_strengthen is None and "strengthen" not in alone.info


def test_the_strengthening_threshold_is_never_below_the_weakening_one():
    pos, neg = separable(0.3)
    gate = fit_gate(pos, neg, fpr=0.02, fpr_strengthen=0.2)  # a looser cap for strengthening
    assert gate.threshold_strengthen == gate.threshold
    with pytest.raises(GateError, match="strengthening threshold 1 is below its weakening threshold 2"):
        Gate(np.ones(3), 2.0, threshold_strengthen=1.0)
    with pytest.raises(GateError, match="false-positive rate for strengthening must be in"):
        fit_gate(pos, neg, fpr_strengthen=1.0)


def test_which_threshold_decides_follows_the_direction_of_the_multiplier():
    gate = Gate(np.array([1.0]), 1.0, threshold_strengthen=3.0)
    x = np.array([[0.5], [2.0], [4.0]])
    for m in (None, -1.0, 0.0, 0.5, 1.0):  # weakening (and 1, which steers nothing)
        assert gate.fires(x, m).tolist() == [False, True, True]
    for m in (1.25, 2.0):  # strengthening: the prompt at 2.0 is no longer steered
        assert gate.fires(x, m).tolist() == [False, False, True]
    one = Gate(np.array([1.0]), 1.0)  # without a strengthening threshold: the same in both directions
    assert one.fires(x, 2.0).tolist() == [False, True, True]


@pytest.mark.parametrize("own", [False, True])
def test_a_gate_with_a_strengthening_threshold_is_version_5_and_round_trips(tmp_path, own):
    mask = own_gated() if own else gated()
    mask = dataclasses.replace(mask, gate=dataclasses.replace(mask.gate, threshold_strengthen=1.5))
    back = read_mask(mask.save(tmp_path / "g5.gguf"))
    assert back.meta["version"] == 5 and back.gate.own == own
    assert back.gate.threshold == pytest.approx(0.75) and back.gate.threshold_strengthen == pytest.approx(1.5)
    np.testing.assert_array_equal(back.gate.weights, mask.gate.weights)


def test_a_version_4_reader_refuses_a_version_5_mask_by_name(tmp_path, monkeypatch):
    import cna_local.maskfile as maskfile

    mask = own_gated()
    path = dataclasses.replace(mask, gate=dataclasses.replace(mask.gate, threshold_strengthen=1.5)).save(tmp_path / "g5.gguf")
    monkeypatch.setattr(maskfile, "FORMAT_VERSION", 4)  # would otherwise strengthen through the looser threshold
    with pytest.raises(MaskFileError, match="version 5 mask; this cna-local reads up to version 4.*upgrade"):
        read_mask(path)


V5 = {**V3, KEY_PREFIX + "version": 5, KEY_PREFIX + "gate_threshold_strengthen": 0.75}


@pytest.mark.parametrize("kv, tensors, message", [
    ({**V4, KEY_PREFIX + "gate_threshold_strengthen": 0.75}, own_gate_tensors([1], [1.0]),
     "version 4 mask with a gate_threshold_strengthen entry"),
    ({**V5, KEY_PREFIX + "gate_threshold_strengthen": None}, own_gate_tensors([1], [1.0]), "no gate_threshold_strengthen entry"),
    ({**V5, KEY_PREFIX + "gate_threshold_strengthen": 0.25}, own_gate_tensors([1], [1.0]), "below its weakening threshold"),
    ({**V5, KEY_PREFIX + "gate_threshold_strengthen": float("nan")}, gate_tensor([1.0, 2.0]), "threshold is nan"),
    (V5, {}, r"version 5 \(gated\) mask with no gate tensors"),
    (V5, {**own_gate_tensors([1], [1.0]), **gate_tensor([1.0, 2.0])}, "both neuron_gate and neuron_gate_idx"),
])
def test_bad_strengthening_gate_data_is_a_clear_error(tmp_path, kv, tensors, message):
    path = write_gguf(tmp_path / "bad.gguf", good_kv(**{**kv, KEY_PREFIX + "n_neurons": 2}), {**good_tensors(), **tensors})
    with pytest.raises(MaskFileError, match=message):
        read_mask(path)
