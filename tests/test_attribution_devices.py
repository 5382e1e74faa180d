"""The torch backend beyond one device: accelerate's placement gives the statistics one device gives."""

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
