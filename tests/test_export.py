"""`cna-local export`: a mask as a LoRA adapter that stock runtimes load, and that computes what the mask
computes.

(a) llama.cpp's own LoRA path (no neuron mask set) at adapter scale c equals the neuron mask at
    1 + c (M0 - 1), within the runtime exactness tolerance of test_runtime_exactness (3x the model's
    llama.cpp-vs-torch floor): the two differ only in where llama.cpp rounds (Q8_0 quantizes the
    unscaled activation for W x, the mask path the scaled one; the adapter adds B (A x) in F32).
(b) transformers + peft with the PEFT adapter equals the torch model with the neurons scaled by a
    forward pre-hook on down_proj, within float32 rounding.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cna_local.cli import cli
from cna_local.export import multiplier_at_scale
from cna_local.fingerprint import fingerprint_from_gguf, fingerprint_from_hf_dir
from cna_local.maskfile import NeuronMask
from cna_local.runtime import SteeredLlama

from test_runtime_exactness import TOKENS, TOL_ABS, TOL_FACTOR, ffn_heavy_gguf, llama_logits, torch_logits  # noqa: F401

M0 = -1.5
SCALES = [0.0, 0.5, 1.0, 2.0]


def make_mask(fp, path, m0=M0, scales=None, digest=None, per_layer=16, seed=0) -> NeuronMask:
    rng = np.random.default_rng(seed)
    layers = np.repeat(np.arange(fp.n_layer), per_layer)
    neurons = np.concatenate([np.sort(rng.choice(fp.n_ff, per_layer, replace=False)) for _ in range(fp.n_layer)])
    if scales == "random":
        scales = rng.uniform(-1, 1, len(layers)).astype(np.float32)
    mask = NeuronMask(arch=fp.arch, n_layer=fp.n_layer, n_ff=fp.n_ff, n_embd=fp.n_embd, fingerprint=digest or fp.digest,
                      model_name="tiny", layers=layers, neurons=neurons, scores=np.ones(len(layers)), multiplier=m0,
                      scales=scales, meta={"name": "test mask"})
    mask.save(path)
    return mask


def export(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module", params=[("llama", "f32"), ("llama", "q8_0")], ids=lambda p: "-".join(p))
def case(request, ffn_heavy_gguf, tmp_path_factory):  # noqa: F811
    from transformers import AutoModelForCausalLM

    arch, outtype = request.param
    path = ffn_heavy_gguf(arch, outtype)
    d = tmp_path_factory.mktemp(f"export-{arch}-{outtype}")
    mask = make_mask(fingerprint_from_gguf(path), d / "mask.gguf")
    result = export(d / "mask.gguf", "--model", path, "--out", d / "mask.lora.gguf")
    assert result.exit_code == 0, result.output
    # the floor this model's runtimes disagree by with no steering at all, as in test_runtime_exactness
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    plain = SteeredLlama(str(path), n_ctx=64, logits_all=True, n_threads=2)
    base = llama_logits(plain, TOKENS)
    floor = np.abs(base - torch_logits(model, TOKENS)).max()
    plain.close()
    return {"model": path, "mask": mask, "mask_path": d / "mask.gguf", "lora": d / "mask.lora.gguf", "base": base,
            "tol": TOL_FACTOR * floor + TOL_ABS}


@pytest.mark.parametrize("scale", SCALES)
def test_the_adapter_at_scale_c_is_the_mask_at_1_plus_c_times_m0_minus_1(case, scale):
    with_lora = SteeredLlama(str(case["model"]), n_ctx=64, logits_all=True, n_threads=2, lora_path=str(case["lora"]),
                             lora_scale=scale)
    with_mask = SteeredLlama(str(case["model"]), n_ctx=64, logits_all=True, n_threads=2)
    try:
        assert not with_lora.steering.active  # llama.cpp's LoRA code path alone
        with_mask.set_mask(case["mask"], multiplier_at_scale(scale, M0))
        got, want = llama_logits(with_lora, TOKENS), llama_logits(with_mask, TOKENS)
    finally:
        with_lora.close()
        with_mask.close()
    if scale == 0.0:  # llama.cpp drops an adapter at scale 0; the mask at 1 is cleared: both exactly unsteered
        assert np.array_equal(got, case["base"]) and np.array_equal(want, case["base"])
        return
    err = np.abs(got - want).max()
    assert err <= case["tol"], f"scale {scale}: max |LoRA - mask| {err:.3g} > {case['tol']:.3g}"
    assert np.abs(want - case["base"]).max() > 3 * case["tol"]  # the steering shows well above the tolerance


def test_per_neuron_scales_follow_the_same_rule(ffn_heavy_gguf, tmp_path):  # noqa: F811
    path = ffn_heavy_gguf("llama", "f32")
    mask = make_mask(fingerprint_from_gguf(path), tmp_path / "m.gguf", scales="random", m0=0.0)
    assert export(tmp_path / "m.gguf", "--model", path, "--out", tmp_path / "m.lora.gguf").exit_code == 0
    for scale in (0.5, 1.5):
        a = SteeredLlama(str(path), n_ctx=64, logits_all=True, lora_path=str(tmp_path / "m.lora.gguf"), lora_scale=scale)
        b = SteeredLlama(str(path), n_ctx=64, logits_all=True)
        b.set_mask(mask, multiplier_at_scale(scale, 0.0))
        assert np.abs(llama_logits(a, TOKENS) - llama_logits(b, TOKENS)).max() < 1e-3
        a.close()
        b.close()


def test_f16_halves_the_file_and_stays_close(case, tmp_path):
    result = export(case["mask_path"], "--model", case["model"],
                    "--out", tmp_path / "f16.lora.gguf", "--dtype", "f16")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "f16.lora.gguf").stat().st_size < 0.6 * case["lora"].stat().st_size
    a = SteeredLlama(str(case["model"]), n_ctx=64, logits_all=True, lora_path=str(tmp_path / "f16.lora.gguf"))
    b = SteeredLlama(str(case["model"]), n_ctx=64, logits_all=True, lora_path=str(case["lora"]))
    err = np.abs(llama_logits(a, TOKENS) - llama_logits(b, TOKENS)).max()
    a.close()
    b.close()
    assert err <= case["tol"]


def test_the_gguf_adapter_says_what_it_is(case):
    import gguf

    r = gguf.GGUFReader(case["lora"])
    field = lambda k: r.get_field(k).contents()  # noqa: E731
    assert (field("general.type"), field("adapter.type"), field("adapter.lora.alpha")) == ("adapter", "lora", 0.0)
    assert field("general.architecture") == case["mask"].arch
    assert field("cna_local.model_fingerprint") == case["mask"].fingerprint
    assert field("cna_local.multiplier_at_scale_1") == M0 and "1 + scale * (M0 - 1)" in field("cna_local.scale_rule")
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    fp = case["mask"]
    assert shapes["blk.0.ffn_down.weight.lora_a"] == (fp.n_ff, 16)  # ggml order: {n_ff, r}
    assert shapes["blk.0.ffn_down.weight.lora_b"] == (16, fp.n_embd)  # {r, n_embd}


# ------------------------------------------------------------------------------------------------ PEFT

def test_the_peft_adapter_in_transformers_equals_the_down_proj_pre_hook(tiny_hf, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = tiny_hf("llama")
    mask = make_mask(fingerprint_from_hf_dir(hf), tmp_path / "m.gguf", per_layer=12)
    result = export(tmp_path / "m.gguf", "--model", hf, "--format", "peft", "--out", tmp_path / "adapter")
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    want = torch_logits(model, TOKENS, mask.layers, mask.neurons, M0)
    plain = torch_logits(model, TOKENS)
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = peft_model(torch.tensor([TOKENS])).logits[0].double().numpy()
    err = np.abs(got - want).max()
    assert err < 1e-4 * np.abs(want).max(), err  # float32 rounding: B (A x) summed apart from W x
    assert np.abs(want - plain).max() > 100 * err  # and the steering is real


def test_the_peft_config_is_one_vllm_accepts(tiny_hf, tmp_path):
    """vLLM (vllm/lora/peft_helper.py, lora_model.py): r and lora_alpha and target_modules required, bias
    "none", no DoRA, rank <= --max-lora-rank (1, 8, 16, ... 512), only supported modules in the tensors;
    without rank_pattern every module is scaled by lora_alpha / r, so padding makes that 1."""
    from safetensors import safe_open

    hf = tiny_hf("llama")
    make_mask(fingerprint_from_hf_dir(hf), tmp_path / "m.gguf", per_layer=5)
    assert export(tmp_path / "m.gguf", "--model", hf, "--format", "peft", "--out", tmp_path / "a").exit_code == 0
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 5 and not config["rank_pattern"] and not config["alpha_pattern"]
    assert config["bias"] == "none" and not config["use_dora"] and not config["use_rslora"]
    assert config["target_modules"] == [f"model.layers.{i}.mlp.down_proj" for i in range(3)]
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), framework="np") as sf:
        keys = sorted(sf.keys())
        assert all(k.endswith(("down_proj.lora_A.weight", "down_proj.lora_B.weight")) for k in keys)
        assert sf.get_tensor("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight").shape == (5, 128)
        assert sf.get_tensor("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight").shape == (64, 5)


# ------------------------------------------------------------------------------------------------ errors

@pytest.fixture(scope="module")
def tiny(tiny_gguf, tmp_path_factory):
    path = tiny_gguf("llama", "f32")
    d = tmp_path_factory.mktemp("export-errors")
    fp = fingerprint_from_gguf(path)
    make_mask(fp, d / "mask.gguf")
    make_mask(fp, d / "other.gguf", digest="0" * 64)
    return {"model": path, "dir": d, "mask": d / "mask.gguf", "other": d / "other.gguf"}


def test_a_mask_for_another_model_is_refused(tiny, tmp_path):
    result = export(tiny["other"], "--model", tiny["model"], "--out", tmp_path / "x.gguf")
    assert result.exit_code == 1 and "different weights" in result.output and not (tmp_path / "x.gguf").exists()


def test_a_model_without_dense_down_weights_is_refused_by_layer(tiny_gguf, tmp_path):
    path = tiny_gguf("mixtral", "f32")
    make_mask(fingerprint_from_gguf(path), tmp_path / "m.gguf")
    result = export(tmp_path / "m.gguf", "--model", path, "--out", tmp_path / "x.gguf")
    assert result.exit_code == 1
    assert "no tensor blk.0.ffn_down.weight: it is a mixture-of-experts layer" in result.output
    assert not (tmp_path / "x.gguf").exists()


def test_an_unwritable_directory_is_an_error_not_a_partial_file(tiny):
    # /proc takes no new files, not even from root (who may write into a chmod 555 directory)
    result = export(tiny["mask"], "--model", tiny["model"], "--out", "/proc/x.lora.gguf")
    assert result.exit_code == 1 and "Fix: choose a writable --out" in result.output
    assert not os.path.exists("/proc/x.lora.gguf")


def test_a_failure_mid_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    import gguf

    out = tmp_path / "out"
    out.mkdir()
    (out / "x.gguf").write_bytes(b"the previous adapter")

    def boom(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    result = export(tiny["mask"], "--model", tiny["model"], "--out", out / "x.gguf")
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["x.gguf"]  # no temporary file left behind ...
    assert (out / "x.gguf").read_bytes() == b"the previous adapter"  # ... and the old adapter intact


@pytest.mark.parametrize("out, message", [
    ("no-such-dir/x.gguf", "does not exist"),
])
def test_bad_paths_and_values(tiny, tmp_path, out, message):
    result = export(tiny["mask"], "--model", tiny["model"], "--out", tmp_path / out)
    assert result.exit_code == 1 and message in result.output
    result = export(tiny["mask"], "--model", tiny["model"], "--out", tmp_path / "y.gguf", "--multiplier", "1")
    assert result.exit_code == 1 and "changes nothing" in result.output
    result = export(tiny["mask"], "--model", tiny["model"], "--out", tmp_path / "y.gguf", "--multiplier", "nan")
    assert result.exit_code == 1 and "finite number" in result.output
    result = export(tiny["mask"], "--model", tiny["model"].parent, "--out", tmp_path / "y.gguf")
    assert result.exit_code == 1


def test_an_existing_peft_directory_is_replaced_only_with_force(tiny_hf, tmp_path):
    hf = tiny_hf("llama")
    make_mask(fingerprint_from_hf_dir(hf), tmp_path / "m.gguf")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep.txt").write_text("mine")
    result = export(tmp_path / "m.gguf", "--model", hf, "--format", "peft", "--out", tmp_path / "a")
    assert result.exit_code == 1 and "not empty" in result.output and (tmp_path / "a" / "keep.txt").exists()
    result = export(tmp_path / "m.gguf", "--model", hf, "--format", "peft", "--out", tmp_path / "a", "--force")
    assert result.exit_code == 0 and sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "cna_local_export.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directories left
