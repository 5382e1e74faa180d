"""The pinned llama.cpp tree: where it is cached and how a bad download is caught."""

import pytest

from cna_local import cache, vendor


def test_cache_dir_prefers_cna_local_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("CNA_LOCAL_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("CNA_LOCAL_CACHE")
    assert cache.cache_dir() == tmp_path / "xdg" / "cna-local"
    assert vendor.cache_dir is cache.cache_dir  # the build's copy of the sources goes to the same place


def test_a_corrupt_sdist_is_refused_with_the_fix(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / vendor.SDIST_NAME).write_bytes(b"not the pinned archive")
    with pytest.raises(vendor.VendorError, match=f"expected {vendor.SDIST_SHA256}.*delete the file"):
        vendor.sdist_path(tmp_path)


def test_the_tree_holds_the_converter_and_gguf_py():
    from tiny_models import llama_cpp_tree

    tree = llama_cpp_tree()
    assert (tree / "convert_hf_to_gguf.py").is_file() and (tree / "gguf-py" / "gguf").is_dir()


def test_cli_prints_the_sdist_root(capsys, monkeypatch):
    from tiny_models import CACHE

    monkeypatch.setenv("CNA_LOCAL_CACHE", str(CACHE))  # the already-extracted tree, not the empty test cache
    assert vendor.main(["--print-root"]) == 0
    assert capsys.readouterr().out.strip() == str(vendor.sdist_root(CACHE))
