"""`cna-local demo` runs the whole job, attribution to side-by-side generations, in one command."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cna_local.cli import cli
from cna_local.maskfile import NeuronMask


def test_demo_end_to_end_on_a_tiny_model(tiny_gguf, tmp_path):
    model = tiny_gguf("llama", "f32")
    out = tmp_path / "demo"
    # --score delta: a random model has no neuron with a positive selective score on the bundled chat prompts
    result = CliRunner().invoke(
        cli, ["demo", "--model", str(model), "--out-dir", str(out), "--limit", "1", "--examples", "1", "--score", "delta", "-q"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    mask = NeuronMask.load(out / "refusal.mask.gguf")
    assert len(mask) == max(1, round(0.001 * mask.n_layer * mask.n_ff))
    cal = mask.meta["calibration"]  # the default multiplier was chosen on prompts the attribution did not see
    assert cal["chosen"] == mask.default_multiplier(False) and cal["n_prompts"] == 20 and cal["tried"]
    # with the gate the attribution fits, a default through it too (or the reason there is none)
    assert mask.gate is not None and ("chosen" in mask.gate.info["calibration"] or mask.gate.info["calibration"]["error"])
    assert mask.meta["selection"]["negative"]["n"] == 100
    report = json.loads((out / "eval.json").read_text())
    assert sorted(r["multiplier"] for r in report["rows"]) == sorted({0.0, 1.0, mask.multiplier})
    for png in ("eval.png", "frontier.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # the reference's mask beside the product's, against the same baseline
    reference = NeuronMask.load(out / "reference.mask.gguf")
    assert reference.meta["selection"]["score"] == "delta" and reference.meta["selection"]["layer_start"] == 2
    compare = json.loads((out / "compare.json").read_text())
    assert [[r["multiplier"] for r in m["rows"]] for m in compare["masks"]][1] == [0.0, -1.0]
    assert "(unsteered)" in result.output and "reference (delta" in result.output
    assert "unsteered (m=1)" in result.output and "wall time" in result.output


def test_demo_refuses_a_model_that_is_not_gguf(tiny_hf, tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--model", str(tiny_hf("llama")), "--out-dir", str(tmp_path)])
    assert result.exit_code != 0 and "Error: " in result.output and "not a .gguf file" in result.output
