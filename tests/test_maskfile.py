"""The neuron-mask GGUF file: round trip, layout, and clear errors for every kind of bad file."""

import gguf
import numpy as np
import pytest

from cna_local.fingerprint import Fingerprint
from cna_local.maskfile import FORMAT_VERSION, KEY_PREFIX, MaskFileError, MaskMismatchError, NeuronMask, read_mask, tensor_name
from cna_local.multipliers import MultiplierError

FP = "ab" * 32


def make_mask(**overrides) -> NeuronMask:
    fields = dict(
        arch="qwen2", n_layer=4, n_ff=16, n_embd=8, fingerprint=FP, model_name="tiny-qwen",
        layers=[2, 0, 0, 3], neurons=[5, 9, 1, 15], scores=[0.5, -1.25, 2.0, 0.125], multiplier=0.0,
        meta={"prompts_sha256": "cd" * 32, "selection": {"score": "delta", "top_k": 4}},
    )
    fields.update(overrides)
    return NeuronMask(**fields)


def test_entries_are_kept_sorted_by_layer_then_neuron():
    m = make_mask(scales=[10, 20, 30, 40])
    assert list(zip(m.layers, m.neurons)) == [(0, 1), (0, 9), (2, 5), (3, 15)]
    np.testing.assert_array_equal(m.scores, np.float32([2.0, -1.25, 0.5, 0.125]))
    np.testing.assert_array_equal(m.scales, np.float32([30, 20, 10, 40]))  # scales move with their neurons


def test_save_then_load_gives_the_same_mask(tmp_path):
    m = make_mask(scales=[1.0, 2.0, 3.0, 4.0], multiplier=1.5)
    loaded = NeuronMask.load(m.save(tmp_path / "m.gguf"))
    for attr in ("arch", "n_layer", "n_ff", "n_embd", "fingerprint", "model_name", "multiplier"):
        assert getattr(loaded, attr) == getattr(m, attr), attr
    for attr in ("layers", "neurons", "scores", "scales"):
        np.testing.assert_array_equal(getattr(loaded, attr), getattr(m, attr))
        assert getattr(loaded, attr).dtype == getattr(m, attr).dtype
    assert loaded.meta["selection"] == {"score": "delta", "top_k": 4}
    assert loaded.meta["prompts_sha256"] == "cd" * 32
    assert loaded.meta["version"] == 1 and loaded.meta["tool_version"]


def test_file_layout_follows_the_llama_cpp_adapter_conventions(tmp_path):
    path = make_mask().save(tmp_path / "m.gguf")
    r = gguf.GGUFReader(path)
    assert r.get_field("general.type").contents() == "adapter"
    assert r.get_field("adapter.type").contents() == "neuron_mask"
    assert r.get_field("general.architecture").contents() == "qwen2"
    assert r.get_field(KEY_PREFIX + "version").contents() == 1
    assert r.get_field(KEY_PREFIX + "n_neurons").contents() == 4
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == {tensor_name(layer, kind) for layer in (0, 2, 3) for kind in ("idx", "score")}
    idx = tensors["blk.0.ffn_down.weight.neuron_idx"]
    assert idx.tensor_type == gguf.GGMLQuantizationType.I32 and list(idx.data) == [1, 9]
    assert tensors["blk.0.ffn_down.weight.neuron_score"].tensor_type == gguf.GGMLQuantizationType.F32


def test_a_0_1_percent_mask_of_a_half_billion_model_is_a_few_kilobytes(tmp_path):
    rng = np.random.default_rng(0)
    flat = rng.choice(24 * 4864, 117, replace=False)
    layers, neurons = np.divmod(flat, 4864)
    m = make_mask(n_layer=24, n_ff=4864, n_embd=896, layers=layers, neurons=neurons, scores=rng.normal(size=117))
    size = m.save(tmp_path / "m.gguf").stat().st_size
    assert size < 8 * 1024


def test_a_plain_mask_scales_every_neuron_by_the_multiplier():
    m = make_mask(multiplier=0.5)
    np.testing.assert_array_equal(m.scales_for(), np.full(4, 0.5, np.float32))
    np.testing.assert_array_equal(m.scales_for(2.0), np.full(4, 2.0, np.float32))


def test_per_neuron_scales_are_the_targets_at_multiplier_0_and_the_multiplier_moves_along_the_line_to_1():
    t = np.float32([0.0, 0.5, -1.0, 2.0])
    m = make_mask(layers=[0, 0, 2, 3], neurons=[1, 9, 5, 15], scales=t, multiplier=0.0)
    np.testing.assert_array_equal(m.scales_for(), t)  # the mask's own multiplier, 0: exactly the targets
    np.testing.assert_array_equal(m.scales_for(1.0), np.ones(4, np.float32))  # exactly unsteered
    np.testing.assert_allclose(m.scales_for(0.5), (1 + t) / 2)
    np.testing.assert_allclose(m.scales_for(-1.0), 2 * t - 1)  # twice as far from 1 as the targets
    # a plain mask is the special case of all targets 0
    np.testing.assert_array_equal(make_mask(scales=np.zeros(4)).scales_for(-0.5), make_mask().scales_for(-0.5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "strong"])
def test_a_non_finite_multiplier_is_an_error(bad):
    with pytest.raises(MultiplierError, match="multiplier must be a"):
        make_mask().scales_for(bad)


def test_per_layer_counts():
    assert make_mask().per_layer_counts() == {0: 2, 2: 1, 3: 1}


def test_check_matches_accepts_the_same_model():
    make_mask().check_matches(Fingerprint("qwen2", 4, 16, 8, FP))


def test_check_matches_names_both_models_and_the_fix_for_another_shape():
    with pytest.raises(MaskMismatchError) as err:
        make_mask().check_matches(Fingerprint("llama", 32, 11008, 4096, "ef" * 32), model_label="big.gguf")
    message = str(err.value)
    assert "tiny-qwen" in message and "qwen2, 4 layers" in message
    assert "big.gguf" in message and "llama, 32 layers" in message
    assert "different shape" in message and "re-run `cna-local attribute" in message


def test_check_matches_rejects_the_same_shape_with_other_weights():
    with pytest.raises(MaskMismatchError, match="same shape but different weights.*re-run"):
        make_mask().check_matches(Fingerprint("qwen2", 4, 16, 8, "ef" * 32))


# -- bad masks, built in memory


@pytest.mark.parametrize("overrides, message", [
    ({"layers": [0, 4], "neurons": [1, 2], "scores": [1, 1]}, "layer 4 does not exist in a 4-layer model"),
    ({"layers": [0, -1], "neurons": [1, 2], "scores": [1, 1]}, "layer -1 does not exist"),
    ({"layers": [0, 1], "neurons": [1, 16], "scores": [1, 1]}, "neuron 16 of layer 1 is out of range 0-15"),
    ({"layers": [0, 1], "neurons": [-2, 3], "scores": [1, 1]}, "neuron -2 of layer 0 is out of range"),
    ({"layers": [1, 1], "neurons": [3, 3], "scores": [1, 1]}, "neuron 3 of layer 1 appears twice"),
    ({"layers": [1], "neurons": [3], "scores": [np.nan]}, "score of neuron 3 in layer 1 is nan"),
    ({"layers": [], "neurons": [], "scores": []}, "names no neuron"),
    ({"layers": [1], "neurons": [3], "scores": [1.0], "scales": [np.inf]}, "scales must be finite"),
])
def test_invalid_entries_are_rejected(overrides, message):
    with pytest.raises(MaskFileError, match=message):
        make_mask(**overrides)


# -- bad files


def write_gguf(path, kv: dict, tensors: dict, general_type="adapter", arch="qwen2"):
    """A GGUF with exactly these string/uint32/float32 keys and tensors, bypassing NeuronMask's checks."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    if general_type is not None:
        w.add_type(general_type)
    for key, value in kv.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def good_kv(**overrides):
    kv = {
        "adapter.type": "neuron_mask", KEY_PREFIX + "version": 1, KEY_PREFIX + "multiplier": 0.0,
        KEY_PREFIX + "n_layer": 4, KEY_PREFIX + "n_ff": 16, KEY_PREFIX + "n_embd": 8,
        KEY_PREFIX + "model_fingerprint": FP, KEY_PREFIX + "model_name": "m", KEY_PREFIX + "prompts_sha256": "",
        KEY_PREFIX + "selection": "{}", KEY_PREFIX + "tool_version": "0", KEY_PREFIX + "n_neurons": 2,
    }
    kv.update(overrides)
    return {k: v for k, v in kv.items() if v is not None}


def good_tensors(idx=(1, 5), score=(0.5, -0.5), layer=0):
    return {
        tensor_name(layer, "idx"): np.array(idx, np.int32),
        tensor_name(layer, "score"): np.array(score, np.float32),
    }


def test_the_handmade_helper_file_is_valid(tmp_path):
    m = read_mask(write_gguf(tmp_path / "ok.gguf", good_kv(), good_tensors()))
    assert list(m.neurons) == [1, 5]


def test_a_model_gguf_is_named_as_such(tiny_gguf):
    with pytest.raises(MaskFileError, match="is a model GGUF, not a neuron mask. Fix: pass it as --model"):
        read_mask(tiny_gguf("llama", "q8_0"))


def test_a_lora_adapter_is_named_as_such(tmp_path):
    path = write_gguf(tmp_path / "lora.gguf", {"adapter.type": "lora", "adapter.lora.alpha": 16.0},
                      {"blk.0.attn_q.weight.lora_a": np.zeros((2, 8), np.float32)})
    with pytest.raises(MaskFileError, match="is a lora adapter .* not a neuron mask"):
        read_mask(path)


def test_a_random_file_is_not_gguf(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(MaskFileError, match=r"random.gguf is not a neuron-mask file: it is not GGUF at all"):
        read_mask(path)


def test_a_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(MaskFileError, match="does not exist.*cna-local attribute"):
        read_mask(tmp_path / "nope.gguf")


@pytest.mark.parametrize("keep", [8, 64, 300, -1])
def test_a_truncated_mask_is_an_error_naming_the_file(tmp_path, keep):
    data = make_mask().save(tmp_path / "full.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(MaskFileError, match=r"cut.gguf is (a damaged or truncated GGUF file|truncated)"):
        read_mask(cut)


@pytest.mark.parametrize("missing", ["model_fingerprint", "n_layer", "n_ff", "n_embd", "version", "n_neurons", "multiplier"])
def test_missing_keys_are_named(tmp_path, missing):
    path = write_gguf(tmp_path / "m.gguf", good_kv(**{KEY_PREFIX + missing: None}), good_tensors())
    with pytest.raises(MaskFileError, match=f"no '{KEY_PREFIX}{missing}' entry"):
        read_mask(path)


def test_informational_strings_may_be_missing(tmp_path):
    kv = good_kv(**{KEY_PREFIX + k: None for k in ("model_name", "prompts_sha256", "selection", "tool_version")})
    m = read_mask(write_gguf(tmp_path / "m.gguf", kv, good_tensors()))
    assert m.model_name == "" and m.meta["selection"] == {}


def test_a_newer_format_version_asks_for_an_upgrade(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", good_kv(**{KEY_PREFIX + "version": FORMAT_VERSION + 1}), good_tensors())
    with pytest.raises(MaskFileError, match=f"version {FORMAT_VERSION + 1} mask.*upgrade cna-local"):
        read_mask(path)


def test_version_2_carries_a_schedule_and_version_1_may_not(tmp_path):
    path = write_gguf(tmp_path / "v2.gguf", good_kv(**{KEY_PREFIX + "version": 2, KEY_PREFIX + "schedule": "prompt"}),
                      good_tensors())
    assert read_mask(path).schedule == "prompt"
    assert read_mask(write_gguf(tmp_path / "v1.gguf", good_kv(), good_tensors())).schedule == "all"
    bad = write_gguf(tmp_path / "v1s.gguf", good_kv(**{KEY_PREFIX + "schedule": "prompt"}), good_tensors())
    with pytest.raises(MaskFileError, match="only version 2 has"):
        read_mask(bad)
    odd = write_gguf(tmp_path / "odd.gguf", good_kv(**{KEY_PREFIX + "version": 2, KEY_PREFIX + "schedule": "never"}),
                     good_tensors())
    with pytest.raises(MaskFileError, match="schedule entry is 'never'"):
        read_mask(odd)
    cal = write_gguf(tmp_path / "cal.gguf", good_kv(**{KEY_PREFIX + "calibration": "[1, 2]"}), good_tensors())
    with pytest.raises(MaskFileError, match="calibration entry is list JSON"):
        read_mask(cal)


def test_an_index_tensor_without_a_score_tensor(tmp_path):
    tensors = good_tensors()
    del tensors[tensor_name(0, "score")]
    with pytest.raises(MaskFileError, match="layer 0 has a neuron_idx tensor but no neuron_score tensor"):
        read_mask(write_gguf(tmp_path / "m.gguf", good_kv(), tensors))


@pytest.mark.parametrize("tensors, kv, message", [
    (good_tensors(idx=(1, 16)), {}, "neuron 16 of layer 0 is out of range 0-15"),
    (good_tensors(layer=4), {}, "layer 4 does not exist in a 4-layer model"),
    (good_tensors(idx=(5, 5)), {}, "neuron 5 of layer 0 appears twice"),
    (good_tensors(idx=(5, 1)), {}, "not sorted ascending"),
    (good_tensors(score=(0.5, np.nan)), {}, "is nan"),
    (good_tensors(), {KEY_PREFIX + "n_neurons": 3}, "says it holds 3 neurons but its tensors hold 2"),
    ({**good_tensors(), "blk.0.ffn_up.weight": np.zeros(2, np.float32)}, {}, "unexpected tensor 'blk.0.ffn_up.weight'"),
    ({tensor_name(0, "idx"): np.array([1, 2], np.float32), tensor_name(0, "score"): np.zeros(2, np.float32)}, {},
     "is F32, expected I32"),
])
def test_inconsistent_files_are_rejected_with_the_file_named(tmp_path, tensors, kv, message):
    path = write_gguf(tmp_path / "bad.gguf", good_kv(**kv), tensors)
    with pytest.raises(MaskFileError, match=message) as err:
        read_mask(path)
    assert "bad.gguf" in str(err.value)
