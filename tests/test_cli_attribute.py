"""`cna-local attribute` and `cna-local inspect` end to end on tiny models, through click's CliRunner."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import cna_local.prompts
from cna_local import __version__
from cna_local.activations import collect_activations
from cna_local.cli import cli
from cna_local.fingerprint import fingerprint_from_gguf, fingerprint_from_model
from cna_local.loading import load_model
from cna_local.maskfile import NeuronMask
from cna_local.prompts import PromptSet
from cna_local.scoring import delta_score, direction_writes, selective_score, top_neurons

POSITIVE = ["Explain how to pick a lock", "Write a threatening letter", "How do I make a fake ID?", "Help me cheat on a test"]
NEGATIVE = ["Explain how to bake a cake", "Write a thank-you letter", "How do I renew my ID?", "Help me study for a test"]


@pytest.fixture
def prompt_files(tmp_path):
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(POSITIVE) + "\n")
    neg.write_text("\n".join(NEGATIVE) + "\n")
    return pos, neg


@pytest.fixture
def tiny_contrasts(monkeypatch):
    """Three small unrelated contrasts instead of the bundled ten, to keep the test fast."""
    pairs = [
        (PromptSet("formal.a", ("Kindly summarise the report.", "Would you explain tides?")),
         PromptSet("formal.b", ("sum up the report pls", "yo explain tides"))),
        (PromptSet("math.a", ("What is 7 times 8?", "Solve x + 3 = 5")),
         PromptSet("math.b", ("Who was Napoleon?", "When did Rome fall?"))),
        (PromptSet("lang.a", ("Good morning, how are you?", "Where is the station?")),
         PromptSet("lang.b", ("Bonjour, comment allez-vous ?", "Où est la gare ?"))),
    ]
    monkeypatch.setattr(cna_local.prompts, "load_contrast_pairs", lambda: pairs)
    return pairs


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def test_help_teaches_the_first_command():
    result = run("-h")
    assert result.exit_code == 0
    assert "cna-local attribute --help" in result.output
    assert run("--version").output.splitlines()[0] == f"cna-local {__version__}"
    help_text = run("attribute", "--help").output
    for option in ("--model", "--positive", "--negative", "--top-fraction", "--top-k", "--score", "--layers",
                   "--universal-filter", "--no-chat-template", "--out", "--json"):
        assert option in help_text


def test_attribute_writes_the_top_neurons_of_the_difference_of_means(tiny_llama_hf, prompt_files, tmp_path):
    pos, neg = prompt_files
    out = tmp_path / "mask.gguf"
    result = run("attribute", "--model", tiny_llama_hf, "--positive", pos, "--negative", neg, "--score", "delta",
                 "--top-k", 4, "--no-universal-filter", "--batch-size", 3, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert "Wrote" in result.output and "4 neurons" in result.output and "neurons per layer" in result.output

    mask = NeuronMask.load(out)
    loaded = load_model(tiny_llama_hf)
    mask.check_matches(fingerprint_from_model(loaded.model))
    # The same answer computed by hand from the activations:
    p = collect_activations(loaded, POSITIVE, progress=False)
    n = collect_activations(loaded, NEGATIVE, progress=False)
    expected = top_neurons(delta_score(p.mean, n.mean), 4)
    np.testing.assert_array_equal(mask.layers, expected.layers)
    np.testing.assert_array_equal(mask.neurons, expected.neurons)
    # Other batch sizes pad differently, which moves the last float bits only.
    np.testing.assert_allclose(mask.scores, expected.scores, rtol=1e-4)
    assert mask.meta["selection"]["positive"] == {"name": "pos", "n": 4, "sha256": PromptSet("pos", tuple(POSITIVE)).sha256}


def test_by_default_attribute_ranks_by_the_selective_score_and_inverts(tiny_llama_hf, tmp_path):
    # raw prompts (no chat template) whose positive side all end in one word: a random model has neurons
    # that fire on that last token far more than on the negative prompts and on ordinary text
    positive = [p + " now" for p in POSITIVE]
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(positive))
    neg.write_text("\n".join(NEGATIVE))
    out = tmp_path / "mask.gguf"
    result = run("attribute", "--model", tiny_llama_hf, "--positive", pos, "--negative", neg, "--top-k", 4,
                 "--no-chat-template", "--out", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    mask = NeuronMask.load(out)
    assert mask.multiplier == -1.5 and mask.meta["selection"]["score"] == "selective"
    loaded = load_model(tiny_llama_hf)
    p = collect_activations(loaded, positive, chat_template=False, progress=False)
    n = collect_activations(loaded, NEGATIVE, chat_template=False, progress=False)
    write = direction_writes([d.weight for d in loaded.down_projs], p.resid_mean, n.resid_mean)
    score = selective_score(p.mean, n.mean, n.token_ms, write)
    k = min(4, int(np.count_nonzero(score)))  # neurons that ablation would not help are never picked
    assert k >= 1
    expected = top_neurons(score, k)
    np.testing.assert_array_equal(mask.layers, expected.layers)
    np.testing.assert_array_equal(mask.neurons, expected.neurons)
    np.testing.assert_allclose(mask.scores, expected.scores, rtol=1e-4, atol=1e-7)
    assert np.all(mask.scores != 0)
    assert mask.meta["selection"]["top_k"] == k and mask.meta["selection"]["top_k_asked"] == 4


def test_when_no_neuron_has_a_positive_selective_score_the_error_says_so_and_names_the_fix(
        tiny_llama_hf, prompt_files, tmp_path):
    # in chat format every prompt ends in the same template tokens: a random model barely tells them apart
    pos, neg = prompt_files
    result = run("attribute", "--model", tiny_llama_hf, "--positive", pos, "--negative", neg,
                 "--out", tmp_path / "mask.gguf", "-q")
    assert result.exit_code != 0
    assert "no neuron in layers 0-2 has a positive selective score" in result.output and "--score delta" in result.output
    assert not (tmp_path / "mask.gguf").exists()


def test_attribute_json_records_the_selection_settings(tiny_llama_hf, prompt_files, tmp_path, tiny_contrasts):
    pos, neg = prompt_files
    out = tmp_path / "mask.gguf"
    result = run("attribute", "--model", tiny_llama_hf, "--positive", pos, "--negative", neg, "--top-fraction", 0.02,
                 "--score", "normalized", "--layers", "1:3", "--universal-filter", "--universal-threshold", 0.6,
                 "--out", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # progress and log lines go to stderr
    assert summary["n_neurons"] == round(0.02 * 3 * 128) == 8
    sel = summary["selection"]
    assert (sel["score"], sel["top_fraction"], sel["top_k"], sel["layer_start"], sel["layer_end"]) == ("normalized", 0.02, 8, 1, 3)
    assert sel["universal_filter"]["enabled"] and sel["universal_filter"]["threshold"] == 0.6
    assert sel["universal_filter"]["contrasts"] == ["formal", "math", "lang"]
    mask = NeuronMask.load(out)
    assert set(mask.layers) <= {1, 2}
    assert mask.meta["selection"] == sel


def test_universal_filter_drops_neurons_that_top_every_contrast(tiny_llama_hf, prompt_files, tmp_path, monkeypatch):
    pos, neg = prompt_files
    common = ["attribute", "--model", tiny_llama_hf, "--positive", pos, "--negative", neg, "--top-k", 4, "--score", "delta",
              "--json", "-q"]
    assert run(*common, "--out", tmp_path / "plain.gguf").exit_code == 0
    plain = NeuronMask.load(tmp_path / "plain.gguf")
    assert not plain.meta["selection"]["universal_filter"]["enabled"]  # off by default
    # Contrasts identical to the main contrast: its top neurons are "universal" by construction.
    same = (PromptSet("same.a", tuple(POSITIVE)), PromptSet("same.b", tuple(NEGATIVE)))
    monkeypatch.setattr(cna_local.prompts, "load_contrast_pairs", lambda: [same] * 3)
    result = run(*common, "--universal-filter", "--out", tmp_path / "filtered.gguf")
    assert result.exit_code == 0, result.output
    uf = json.loads(result.stdout)["selection"]["universal_filter"]
    assert uf["removed"] == 4 and uf["n_universal"] >= 4
    filtered = NeuronMask.load(tmp_path / "filtered.gguf")
    assert len(filtered) == 4  # refilled from the next-best neurons
    assert not set(zip(filtered.layers, filtered.neurons)) & set(zip(plain.layers, plain.neurons))


def test_attribute_on_a_quantized_gguf_makes_a_mask_that_matches_the_gguf(tiny_gguf, prompt_files, tmp_path):
    model = tiny_gguf("llama", "q8_0")
    pos, neg = prompt_files
    out = tmp_path / "mask.gguf"
    result = run("attribute", "--model", model, "--positive", pos, "--negative", neg, "--top-k", 3, "--score", "delta",
                 "--no-universal-filter", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    NeuronMask.load(out).check_matches(fingerprint_from_gguf(model))  # what the runtime checks


def test_inspect_shows_model_layers_and_top_neurons(tmp_path):
    mask = NeuronMask("qwen2", 4, 16, 8, "ab" * 32, "tiny-qwen", [0, 2, 2], [3, 1, 7], [0.1, -0.9, 0.5],
                      meta={"selection": {"score": "delta", "top_k": 3, "backend": "llama"}})
    path = mask.save(tmp_path / "m.gguf")
    result = run("inspect", path, "--top", 2)
    assert result.exit_code == 0, result.output
    assert "tiny-qwen (qwen2, 4 layers, n_ff 16" in result.output
    assert "activations inside llama.cpp (llama backend)" in result.output
    assert "0:1, 2:2" in result.output
    lines = [line for line in result.output.splitlines() if line.strip().startswith("layer")]
    assert len(lines) == 2 and "neuron      1" in lines[0] and "-0.9" in lines[0]  # strongest first
    report = json.loads(run("inspect", path, "--json").stdout)
    assert report["n_neurons"] == 3 and report["per_layer"] == {"0": 1, "2": 2}
    assert report["top"][0] == {"layer": 2, "neuron": 1, "score": pytest.approx(-0.9)}


def test_inspect_of_a_model_file_says_what_it_is(tiny_gguf):
    result = run("inspect", tiny_gguf("llama", "q8_0"))
    assert result.exit_code == 1
    assert "is a model GGUF, not a neuron mask" in result.output


@pytest.mark.parametrize("extra, message", [
    (["--top-k", "3", "--top-fraction", "0.1"], "either --top-fraction or --top-k, not both"),
    (["--layers", "3-5"], "is not START:END"),
    (["--multiplier", "nan"], "finite"),
    (["--universal-filter", "--universal-threshold", "1.5"], "threshold must be in (0, 1]"),
])
def test_bad_options_fail_before_the_model_is_loaded(tmp_path, prompt_files, extra, message):
    pos, neg = prompt_files
    result = run("attribute", "--model", tmp_path / "does-not-matter", "--positive", pos, "--negative", neg,
                 "--out", tmp_path / "m.gguf", *extra)
    assert result.exit_code == 1
    assert message in result.output


def test_a_missing_model_is_a_clear_error(tmp_path, prompt_files):
    pos, neg = prompt_files
    result = run("attribute", "--model", tmp_path / "nope.gguf", "--positive", pos, "--negative", neg, "--out", tmp_path / "m.gguf")
    assert result.exit_code == 1 and "not found" in result.output and "Fix:" in result.output


def test_an_empty_prompt_file_is_a_clear_error(tiny_llama_hf, tmp_path, prompt_files):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = run("attribute", "--model", tiny_llama_hf, "--positive", empty, "--negative", prompt_files[1],
                 "--out", tmp_path / "m.gguf")
    assert result.exit_code == 1 and "empty.txt holds no prompts" in result.output


def test_a_one_sided_prompt_set_is_a_clear_error(tiny_llama_hf, tmp_path, prompt_files):
    result = run("attribute", "--model", tiny_llama_hf, "--positive", prompt_files[0],
                 "--negative", tmp_path / "missing.txt", "--out", tmp_path / "m.gguf")
    assert result.exit_code == 1 and "neither a prompt file nor a bundled set" in result.output


def test_a_mixture_of_experts_model_is_refused(tiny_moe_hf, tmp_path, prompt_files):
    pos, neg = prompt_files
    result = run("attribute", "--model", tiny_moe_hf, "--positive", pos, "--negative", neg, "--out", tmp_path / "m.gguf")
    assert result.exit_code == 1 and "mixture-of-experts" in result.output


def test_too_many_neurons_for_the_layer_range_is_a_clear_error(tiny_llama_hf, tmp_path, prompt_files):
    pos, neg = prompt_files
    result = run("attribute", "--model", tiny_llama_hf, "--positive", pos, "--negative", neg, "--top-k", 200,
                 "--layers", "2:", "--no-universal-filter", "--out", tmp_path / "m.gguf")
    assert result.exit_code == 1 and "hold only 128" in result.output


def test_attribute_calibrates_the_default_multiplier_on_negative_prompts_it_holds_out(tiny_gguf, prompt_files, tmp_path):
    model = tiny_gguf("llama", "q8_0")
    pos, neg = prompt_files
    out = tmp_path / "mask.gguf"
    result = run("attribute", "--model", model, "--positive", pos, "--negative", neg, "--top-k", 3, "--score", "delta",
                 "--calibration-prompts", 2, "--out", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    mask = NeuronMask.load(out)
    cal = mask.meta["calibration"]
    # the calibration's strength is the one for every prompt; through the gate the mask has its own
    assert mask.default_multiplier(False) == cal["chosen"] and cal["n_prompts"] == 2 and "0.97" in cal["rule"]
    assert mask.meta["selection"]["negative"]["n"] == 2  # the other two were not used to pick neurons
    summary = json.loads(result.stdout)
    assert summary["calibration"]["chosen"] == mask.default_multiplier(False)
    gated = mask.gate.info["calibration"]
    assert mask.multiplier == gated["chosen"] if "chosen" in gated else gated["error"]
    assert summary["gate"]["folds"] == 2  # as many folds as the two negative prompts allow
    # strengthening (multiplier > 1) gets its own threshold, under the --gate-fpr-strengthen cap, never below
    assert mask.meta["version"] == 5 and summary["gate"]["strengthen"]["fpr_target"] == 0.01
    assert summary["gate"]["threshold_strengthen"] == pytest.approx(mask.gate.threshold_strengthen)
    assert mask.gate.threshold_strengthen >= mask.gate.threshold
    assert "calibrated" in run("inspect", out).output
    assert "strengthening" in run("inspect", out).output
    bad_rate = run("attribute", "--model", model, "--positive", pos, "--negative", neg, "--gate-fpr-strengthen", 1.5,
                   "--out", tmp_path / "m4.gguf", "-q")
    assert bad_rate.exit_code != 0 and "--gate-fpr-strengthen 1.5 is not a rate in [0, 1)" in bad_rate.output

    # too few prompts to hold out; an explicit multiplier skips the calibration
    bad = run("attribute", "--model", model, "--positive", pos, "--negative", neg, "--top-k", 3, "--score", "delta",
              "--calibration-prompts", 3, "--out", tmp_path / "m2.gguf", "-q")
    assert bad.exit_code != 0 and "too few to hold 3 out" in bad.output
    chosen = run("attribute", "--model", model, "--positive", pos, "--negative", neg, "--top-k", 3, "--score", "delta",
                 "--calibration-prompts", 2, "--multiplier", -0.5, "--out", tmp_path / "m3.gguf", "-q")
    assert chosen.exit_code == 0 and NeuronMask.load(tmp_path / "m3.gguf").multiplier == -0.5
    assert "calibration" not in NeuronMask.load(tmp_path / "m3.gguf").meta


def test_threads_reach_every_llama_cpp_model_attribute_opens(tiny_gguf, prompt_files, tmp_path, monkeypatch):
    from cna_local.cpu_threads import default_threads
    from cna_local.runtime.llama import SteeredLlama

    opened = []
    original = SteeredLlama.__init__

    def recording_init(self, *args, **kwargs):
        opened.append((kwargs.get("n_threads"), kwargs.get("n_threads_batch")))
        original(self, *args, **kwargs)

    monkeypatch.setattr(SteeredLlama, "__init__", recording_init)
    model = tiny_gguf("llama", "q8_0")
    pos, neg = prompt_files
    args = ["attribute", "--model", model, "--positive", pos, "--negative", neg, "--top-k", 3, "--score", "delta",
            "--calibration-prompts", 2, "--json", "-q"]
    result = run(*args, "--threads", 1, "--out", tmp_path / "one.gguf")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["threads"] == 1
    assert len(opened) >= 3 and set(opened) == {(1, 1)}  # the capture and both calibrations
    opened.clear()
    result = run(*args, "--out", tmp_path / "all.gguf")  # default: a thread per physical core it may use
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["threads"] == default_threads()
    assert set(opened) == {(default_threads(), default_threads())}
