"""Model fingerprints: equal for a model's HF weights and all its GGUF conversions, different between models."""

import gguf
import pytest

from cna_local.fingerprint import FingerprintError, fingerprint_from_gguf, fingerprint_from_model
from cna_local.loading import load_model


@pytest.mark.parametrize("arch, outtype", [("llama", "f32"), ("llama", "q8_0"), ("qwen2", "q8_0")])
def test_hf_weights_and_their_gguf_conversions_share_the_fingerprint(tiny_hf, tiny_gguf, arch, outtype):
    from_hf = fingerprint_from_model(load_model(tiny_hf(arch)).model)
    assert from_hf.arch == arch and (from_hf.n_layer, from_hf.n_ff, from_hf.n_embd) == (3, 128, 64)
    assert fingerprint_from_gguf(tiny_gguf(arch, outtype)) == from_hf


def test_quantized_gguf_keeps_norm_weights_in_f32(tiny_gguf):
    reader = gguf.GGUFReader(tiny_gguf("llama", "q8_0"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0  # the file really is quantized
    norms = [name for name in types if "norm" in name]
    assert norms and all(types[name] == gguf.GGMLQuantizationType.F32 for name in norms)


def test_transformers_dequantized_gguf_gives_the_same_fingerprint_as_gguf_reader(tiny_gguf):
    path = tiny_gguf("llama", "q8_0")
    assert fingerprint_from_model(load_model(path).model) == fingerprint_from_gguf(path)


def test_another_seed_of_the_same_shape_has_another_fingerprint(tiny_gguf, tiny_hf):
    a = fingerprint_from_gguf(tiny_gguf("llama", "f32", seed=0))
    b = fingerprint_from_model(load_model(tiny_hf("llama", seed=1)).model)
    assert (a.arch, a.n_layer, a.n_ff, a.n_embd) == (b.arch, b.n_layer, b.n_ff, b.n_embd)
    assert a.digest != b.digest


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(FingerprintError, match="model.gguf is not a readable GGUF model file"):
        fingerprint_from_gguf(junk)


def test_a_mask_file_is_not_a_model(tmp_path):
    from cna_local.maskfile import NeuronMask

    path = NeuronMask("llama", 2, 8, 4, "ab" * 32, "m", [0], [1], [1.0]).save(tmp_path / "mask.gguf")
    with pytest.raises(FingerprintError, match="mask.gguf has no 'llama.block_count' metadata"):
        fingerprint_from_gguf(path)


def test_a_gguf_fingerprint_is_read_once_per_file_version(tiny_gguf, tmp_path, monkeypatch):
    import os
    import shutil

    from cna_local import fingerprint as F

    path = tmp_path / "model.gguf"
    shutil.copy(tiny_gguf("llama", "f32"), path)
    first = fingerprint_from_gguf(path)
    monkeypatch.setattr(F, "_read_fingerprint", lambda p: pytest.fail("read the file again"))
    assert fingerprint_from_gguf(path) == first  # from the cache
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # the file changed: the cache entry no longer applies
    with pytest.raises(pytest.fail.Exception, match="read the file again"):
        fingerprint_from_gguf(path)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_hf_directory_is_fingerprinted_from_its_files_as_from_the_loaded_model(tiny_hf, arch):
    from cna_local.fingerprint import fingerprint_from_hf_dir

    assert fingerprint_from_hf_dir(tiny_hf(arch)) == fingerprint_from_model(load_model(tiny_hf(arch)).model)
