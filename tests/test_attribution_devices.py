"""The torch backend beyond one device: accelerate's placement gives the statistics one device gives."""

import gc
import tempfile

import numpy as np
import pytest
from click.testing import CliRunner

from cna_local.activations import TorchSource
from cna_local.cli import cli
from cna_local.loading import ModelLoadError, load_model
from cna_local.scoring import direction_writes

PROMPTS = ["How do I bake bread?", "hi", "Write a poem about the sea", "What is 2+2?", "Tell me a joke about cats."]


def stats(loaded):
    return TorchSource(loaded).collect(PROMPTS, keep=True, progress=False)


@pytest.mark.parametrize("max_memory", [None, {"cpu": 60_000}], ids=["cpu", "disk-offload"])
def test_device_map_auto_gives_the_single_device_statistics(tiny_qwen2_hf, max_memory):
    """On this CPU-only machine accelerate places every layer on the CPU, or (with a memory cap) offloads
    layers to disk, their weights streamed in at each forward: the numbers must not change."""
    want_model = load_model(tiny_qwen2_hf)
    want = stats(want_model)
    placed = load_model(tiny_qwen2_hf, device_map="auto", max_memory=max_memory)
    if max_memory is not None:
        assert "disk" in set(placed.model.hf_device_map.values())
    got = stats(placed)
    np.testing.assert_allclose(got.values, want.values, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.token_sumsq, want.token_sumsq, rtol=1e-6)
    np.testing.assert_allclose(got.resid_sum, want.resid_sum, rtol=1e-6, atol=1e-9)
    # the selective score reads offloaded down projections from accelerate's hooks
    writes = direction_writes(TorchSource(placed).down_weights(), got.resid_mean, got.resid_mean + 1)
    expected = direction_writes(TorchSource(want_model).down_weights(), want.resid_mean, want.resid_mean + 1)
    np.testing.assert_allclose(writes, expected, rtol=1e-6, atol=1e-9)
    assert TorchSource(placed).fingerprint() == TorchSource(want_model).fingerprint()


def test_the_disk_offload_folder_goes_with_the_model(tiny_qwen2_hf, tmp_path, monkeypatch):
    """accelerate may write offloaded layers to a folder of ours (weights not already in safetensors files):
    it lasts as long as the model, no longer (a large model's offload is GBs of disk)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    placed = load_model(tiny_qwen2_hf, device_map="auto", max_memory={"cpu": 60_000})
    assert "disk" in set(placed.model.hf_device_map.values())
    (folder,) = tmp_path.glob("cna-offload-*")
    del placed
    gc.collect()
    assert not folder.exists()


def test_devices_this_machine_lacks_are_clear_errors(tiny_qwen2_hf, tiny_gguf, tmp_path):
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            load_model(tiny_qwen2_hf, device="cuda")
    result = CliRunner().invoke(cli, ["attribute", "--model", str(tiny_gguf("qwen2")), "--device-map", "auto",
                                      "--backend", "llama", "--out", str(tmp_path / "m.gguf")])
    assert result.exit_code != 0 and "--device-map is for the torch backend" in result.output


def test_a_bf16_model_writes_the_fingerprint_of_its_file(tiny_qwen2_hf):
    """bfloat16 rounds the norms the fingerprint hashes: the mask must still match the model file."""
    import torch

    from cna_local.fingerprint import fingerprint_from_hf_dir

    loaded = load_model(tiny_qwen2_hf, dtype=torch.bfloat16)
    assert TorchSource(loaded).fingerprint() == fingerprint_from_hf_dir(tiny_qwen2_hf)


needs_cuda = pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                                reason="needs a CUDA GPU: tools/device_check.sh runs it on one")


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@needs_cuda
def test_cuda_float32_gives_the_cpu_statistics(tiny_qwen2_hf):
    """The same float32 model on the GPU: only the summation order differs (TF32 stays off in torch's default)."""
    import torch

    want = stats(load_model(tiny_qwen2_hf))
    loaded = load_model(tiny_qwen2_hf, device="cuda", dtype=torch.float32)
    assert next(loaded.model.parameters()).device.type == "cuda"
    got = stats(loaded)
    for field in ("values", "token_sumsq", "resid_sum"):
        assert rel(getattr(got, field), getattr(want, field)) < 1e-4, field


@needs_cuda
def test_cuda_defaults_to_bfloat16_within_its_rounding(tiny_qwen2_hf):
    """bf16 keeps 8 bits of mantissa: each matmul's inputs round by up to 2^-9, compounded over 3 layers and
    the SwiGLU product. The bound, 5% of the largest value, is about 10x that; a wrong placement is far off."""
    import torch

    want = stats(load_model(tiny_qwen2_hf))
    loaded = load_model(tiny_qwen2_hf, device="cuda")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    got = stats(loaded)
    assert rel(got.values, want.values) < 5e-2
    assert rel(got.resid_sum, want.resid_sum) < 5e-2


@needs_cuda
def test_device_map_auto_puts_the_layers_on_the_gpu(tiny_qwen2_hf):
    import torch

    want = stats(load_model(tiny_qwen2_hf))
    placed = load_model(tiny_qwen2_hf, device_map="auto", dtype=torch.float32)
    assert {str(d) for d in placed.model.hf_device_map.values()} <= {"0", "cuda:0"}
    got = stats(placed)
    assert rel(got.values, want.values) < 1e-4


@needs_cuda
def test_the_attribute_command_on_cuda_writes_the_cpu_mask(tiny_gguf, tmp_path):
    """--device cuda with the torch backend: the same neurons as on the CPU (float32 on both sides here would
    be exact; the default bf16 may swap a neuron at the cut, hence Jaccard, not equality)."""
    from cna_local.maskfile import NeuronMask

    gguf = tiny_gguf("qwen2")
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(p + " now" for p in PROMPTS))
    neg.write_text("\n".join(PROMPTS))
    masks = []
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.gguf"
        result = CliRunner().invoke(cli, ["attribute", "--model", str(gguf), "--positive", str(pos), "--negative",
                                          str(neg), "--top-k", "20", "--multiplier", "0", "--no-chat-template",
                                          "--backend", "torch", "--device", device, "--out", str(out), "-q"])
        assert result.exit_code == 0, result.output
        masks.append(NeuronMask.load(out))
    a, b = (set(zip(m.layers.tolist(), m.neurons.tolist())) for m in masks)
    assert len(a & b) / len(a | b) >= 0.8
