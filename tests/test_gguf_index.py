"""A GGUF's header read by ggml's C parser says what gguf-py's reader says, and reads the same weights."""

import gguf
import numpy as np
import pytest

from cna_local.gguf_index import GGUFIndex, GGUFIndexError


@pytest.mark.parametrize("arch, outtype", [("llama", "f32"), ("llama", "f16"), ("qwen2", "q8_0")])
def test_ggml_parser_and_gguf_py_agree_on_every_value_and_tensor(tiny_gguf, arch, outtype):
    path = tiny_gguf(arch, outtype)
    fast, slow = GGUFIndex(path), GGUFIndex(path, use_library=False)
    assert fast.values == slow.values and fast.values[f"{arch}.block_count"] == 3
    assert fast.tensors == slow.tensors
    reader = gguf.GGUFReader(path)
    for t in reader.tensors:  # every tensor, dequantized, equals gguf-py's own reading of it
        expected = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        got = fast.array(t.name)
        assert got.shape == fast.tensors[t.name].shape
        np.testing.assert_array_equal(got.reshape(expected.shape), expected)
    assert fast.array("blk.0.ffn_down.weight").shape == (64, 128)  # [n_embd, n_ff], numpy order


def test_string_arrays_are_skipped_and_scalars_are_plain_python(tiny_gguf):
    index = GGUFIndex(tiny_gguf("llama", "f32"))
    assert "tokenizer.ggml.tokens" not in index.values  # the slow part of a header: not needed here
    assert index.value("general.architecture") == "llama"
    assert isinstance(index.value("llama.embedding_length"), int)
    assert index.value("no.such.key") is None


@pytest.mark.parametrize("use_library", [True, False])
def test_junk_and_truncated_files_are_named_errors(tiny_gguf, tmp_path, use_library):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFIndexError, match="junk.gguf is not a readable GGUF model file"):
        GGUFIndex(junk, use_library=use_library)
    cut = tmp_path / "cut.gguf"
    data = tiny_gguf("llama", "f32").read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFIndexError, match="cut.gguf"):
        GGUFIndex(cut, use_library=use_library)
    with pytest.raises(GGUFIndexError, match="does not exist"):
        GGUFIndex(tmp_path / "missing.gguf", use_library=use_library)
