"""Attribution refuses, before loading, a model whose in-memory copy cannot fit, and says what to do: on a
16 GB laptop the torch backend would need 28 GB of float32 weights for a 7B GGUF, and the kernel's OOM
killer is no error message. The llama backend needs the GGUF and every prompt's captured row."""

import pytest
from click.testing import CliRunner

from cna_local import memory_check
from cna_local.cli import cli
from cna_local.loading import load_model
from cna_local.fingerprint import fingerprint_from_gguf
from cna_local.memory_check import (SKIP_ENV, NotEnoughMemoryError, check_fits, check_llama_fits, gguf_parameters,
                                    hf_parameters)


def unique_parameters(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def test_the_parameter_count_is_what_torch_loads(tiny_qwen2_hf, tiny_gguf):
    loaded = load_model(tiny_qwen2_hf)
    assert hf_parameters(tiny_qwen2_hf) == unique_parameters(loaded.model)
    assert gguf_parameters(tiny_gguf("qwen2")) == unique_parameters(load_model(tiny_gguf("qwen2")).model)


def test_the_bound_is_the_copy_against_what_is_available(tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"x")
    check_fits(source, 10, 4, is_gguf=True, available=40)  # exactly fits
    with pytest.raises(NotEnoughMemoryError, match=r"at least 0.0 GB"):
        check_fits(source, 10, 4, is_gguf=True, available=39)


@pytest.fixture
def small_machine(monkeypatch):
    """A machine with 1 kB available: every model is too large."""
    monkeypatch.setattr(memory_check, "available_bytes", lambda: 1000)


def test_a_gguf_too_large_points_to_the_llama_backend(tiny_gguf, small_machine):
    with pytest.raises(NotEnoughMemoryError, match=r"float32 in memory.*Fix: use the llama backend") as err:
        load_model(tiny_gguf("qwen2"))
    assert f"{SKIP_ENV}=1" in str(err.value)
    # --device-map places the model from the float32 cache, which the first load writes from memory
    with pytest.raises(NotEnoughMemoryError):
        load_model(tiny_gguf("qwen2"), device_map="auto")


def test_a_directory_too_large_points_to_device_map(tiny_qwen2_hf, small_machine):
    with pytest.raises(NotEnoughMemoryError, match=r"at 4 bytes each.*--device-map auto"):
        load_model(tiny_qwen2_hf)
    load_model(tiny_qwen2_hf, device_map="auto")  # accelerate places it from the files: not checked


def test_the_environment_variable_loads_anyway(tiny_gguf, small_machine, monkeypatch):
    monkeypatch.setenv(SKIP_ENV, "1")
    assert load_model(tiny_gguf("qwen2")).n_layer > 0


def test_attribute_says_it_before_loading_anything(tiny_gguf, small_machine, tmp_path):
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(cli, ["attribute", "--model", str(tiny_gguf("qwen2")), "--backend", "torch",
                                      "--multiplier", "-1", "--out", str(out)])
    assert result.exit_code != 0
    assert "Fix: use the llama backend" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_the_llama_backend_needs_the_file_and_every_prompts_row(tiny_gguf):
    path = tiny_gguf("qwen2")
    fp = fingerprint_from_gguf(path)
    need = path.stat().st_size + 10 * fp.n_layer * fp.n_ff * 4
    check_llama_fits(path, 10, available=need)
    with pytest.raises(NotEnoughMemoryError, match=r"captured rows for 10 prompts.*Fix: close other programs"):
        check_llama_fits(path, 10, available=need - 1)


def test_attribute_on_the_llama_backend_says_it_before_loading(tiny_gguf, small_machine, tmp_path):
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(cli, ["attribute", "--model", str(tiny_gguf("qwen2")), "--multiplier", "-1",
                                      "--out", str(out)])
    assert result.exit_code != 0
    assert "in llama.cpp holds its" in result.output and "Traceback" not in result.output
    assert not out.exists()
