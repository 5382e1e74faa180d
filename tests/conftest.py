"""Shared fixtures: tiny random models (HF directories and GGUF files), built once per test session."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from tiny_models import build_tiny_hf, to_gguf


@pytest.fixture(autouse=True, scope="session")
def gpu_build_when_asked():
    """CNA_TEST_GPU=1 must run on a GPU build: a CPU build would quietly pass the suites on the CPU."""
    from backend import ON_GPU

    if ON_GPU:
        import llama_cpp

        assert llama_cpp.llama_supports_gpu_offload(), (
            "CNA_TEST_GPU=1 but this llama.cpp cannot offload to a GPU. Fix: build it with "
            "CMAKE_ARGS=\"-DGGML_CUDA=ON\" (tools/device_check.sh does), or unset CNA_TEST_GPU.")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own empty cna-local cache, so no test reads or fills the user's."""
    cache = tmp_path / "cna-local-cache"
    monkeypatch.setenv("CNA_LOCAL_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Callable[..., Path]:
    """Factory: tiny_hf(arch, seed=0) -> HF directory of a tiny random model, cached for the session."""
    cache: dict[tuple[str, int], Path] = {}

    def make(arch: str, seed: int = 0) -> Path:
        key = (arch, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}-seed{seed}") / "hf"
            cache[key] = build_tiny_hf(arch, out, seed=seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf) -> Callable[..., Path]:
    """Factory: tiny_gguf(arch, outtype="f32", seed=0) -> GGUF converted by llama.cpp's converter, cached."""
    cache: dict[tuple[str, str, int], Path] = {}

    def make(arch: str, outtype: str = "f32", seed: int = 0) -> Path:
        key = (arch, outtype, seed)
        if key not in cache:
            hf_dir = tiny_hf(arch, seed)
            cache[key] = to_gguf(hf_dir, outtype, hf_dir.parent / f"tiny-{arch}-seed{seed}-{outtype}.gguf")
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_hf(tiny_hf) -> Path:
    return tiny_hf("llama")


@pytest.fixture(scope="session")
def tiny_qwen2_hf(tiny_hf) -> Path:
    return tiny_hf("qwen2")


@pytest.fixture(scope="session")
def tiny_moe_hf(tiny_hf) -> Path:
    return tiny_hf("qwen2moe")
