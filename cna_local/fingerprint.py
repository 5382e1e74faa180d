"""Model fingerprint: which model a neuron mask belongs to.

Shape (architecture, n_layer, n_ff, n_embd) plus a sha256 over the RMSNorm
weights: per layer the attention norm then the FFN norm, in layer order, then the
final norm, as little-endian float32. Converters and quantizers keep norm weights
unquantized (F32 in GGUF), so the hash is the same for a model's HF weights and
every quantized GGUF of it, yet differs between two models of the same shape.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from .cache import cache_dir, file_key, write_atomic
from .errors import CnaLocalError

if TYPE_CHECKING:
    import torch

    from .maskfile import NeuronMask

# Gemma's HF RMSNorm multiplies by (1 + w); llama.cpp's converter stores 1 + w.
_NORM_PLUS_ONE_ARCHS = {"gemma", "gemma2", "gemma3", "gemma3_text"}

# HF model_type -> llama.cpp general.architecture where they differ.
_HF_TO_GGUF_ARCH = {"mistral": "llama", "qwen2_moe": "qwen2moe", "gemma3_text": "gemma3"}


class FingerprintError(CnaLocalError):
    """The fingerprint of a model could not be computed."""


@dataclass(frozen=True)
class Fingerprint:
    arch: str  # llama.cpp architecture name, e.g. "qwen2"
    n_layer: int
    n_ff: int
    n_embd: int
    digest: str  # hex sha256 of the norm weights

    def describe(self) -> str:
        return f"{self.arch}, {self.n_layer} layers, n_ff {self.n_ff}, n_embd {self.n_embd}, fingerprint {self.digest[:12]}"


def gguf_arch_name(hf_model_type: str) -> str:
    """The llama.cpp architecture name for a transformers model_type."""
    return _HF_TO_GGUF_ARCH.get(hf_model_type, hf_model_type)


def norm_digest(arrays: Iterable[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return digest.hexdigest()


def _hf_layer_norms(layer) -> tuple["torch.Tensor", "torch.Tensor"]:
    # Gemma 2/3 also have a post_attention_layernorm that is NOT the FFN input
    # norm; their FFN input norm is pre_feedforward_layernorm (llama.cpp: ffn_norm).
    attn = getattr(layer, "input_layernorm", None)
    ffn = getattr(layer, "pre_feedforward_layernorm", None) or getattr(layer, "post_attention_layernorm", None)
    if attn is None or ffn is None or not hasattr(attn, "weight") or not hasattr(ffn, "weight"):
        raise FingerprintError(
            f"{type(layer).__name__} has no input_layernorm/post_attention_layernorm weights; "
            "cna-local supports Llama-style decoder layers (Llama, Qwen2, Mistral, Gemma, Phi-3). "
            "Fix: use a model of one of those architectures."
        )
    return attn.weight, ffn.weight


def fingerprint_from_model(model, layers=None) -> Fingerprint:
    """Fingerprint of a loaded transformers causal LM (any dtype; hashed as float32)."""
    from .loading import decoder_layers, final_norm

    layers = decoder_layers(model) if layers is None else layers
    config = model.config
    model_type = getattr(config, "model_type", "") or ""
    offset = 1.0 if model_type in _NORM_PLUS_ONE_ARCHS else 0.0

    def as_f32(tensor) -> np.ndarray:
        return tensor.detach().to("cpu").float().numpy() + np.float32(offset)

    arrays = []
    for layer in layers:
        attn, ffn = _hf_layer_norms(layer)
        arrays += [as_f32(attn), as_f32(ffn)]
    arrays.append(as_f32(final_norm(model).weight))
    down = layers[0].mlp.down_proj
    return Fingerprint(
        arch=gguf_arch_name(model_type),
        n_layer=len(layers),
        n_ff=int(down.in_features),
        n_embd=int(down.out_features),
        digest=norm_digest(arrays),
    )


def fingerprint_from_hf_dir(directory: str | Path) -> Fingerprint:
    """Fingerprint of a Hugging Face model directory, read from config.json and the safetensors norms only
    (the same arrays fingerprint_from_model hashes, without loading the model)."""
    from safetensors import safe_open

    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
        config = config.get("text_config", config) if "num_hidden_layers" not in config else config
        model_type = config["model_type"]
        n_layer, n_ff, n_embd = int(config["num_hidden_layers"]), int(config["intermediate_size"]), int(config["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FingerprintError(f"{directory} has no readable config.json with num_hidden_layers, intermediate_size and "
                               f"hidden_size ({exc}). Fix: pass a Hugging Face model directory.") from exc
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            tensors.update({k: f for k in sf.keys() if "norm" in k})
    offset = 1.0 if model_type in _NORM_PLUS_ONE_ARCHS else 0.0

    def norm(*names: str) -> np.ndarray:
        for name in names:
            if name in tensors:
                with safe_open(str(tensors[name]), framework="pt") as sf:
                    return sf.get_tensor(name).float().numpy() + np.float32(offset)
        raise FingerprintError(f"{directory} has none of {', '.join(names)}; cna-local needs Llama-style RMSNorm layers.")

    arrays = []
    for il in range(n_layer):
        prefix = f"model.layers.{il}."
        arrays += [norm(prefix + "input_layernorm.weight"),
                   norm(prefix + "pre_feedforward_layernorm.weight", prefix + "post_attention_layernorm.weight")]
    arrays.append(norm("model.norm.weight"))
    return Fingerprint(arch=gguf_arch_name(model_type), n_layer=n_layer, n_ff=n_ff, n_embd=n_embd, digest=norm_digest(arrays))


def fingerprint_from_gguf(path: str | Path, use_cache: bool = True) -> Fingerprint:
    """Fingerprint of a GGUF model file (no weights are dequantized but the norms), cached per file (path,
    size and modification time) in the cna-local cache."""
    path = Path(path)
    entry = cache_dir() / "fingerprints" / f"{file_key(path)}.json" if use_cache and path.is_file() else None
    if entry is not None and entry.is_file():
        try:
            return Fingerprint(**json.loads(entry.read_text()))
        except (OSError, ValueError, TypeError):
            pass  # a damaged entry: compute it again
    fingerprint = _read_fingerprint(path)
    if entry is not None:
        try:
            write_atomic(entry, json.dumps(asdict(fingerprint)).encode())
        except OSError:
            pass  # a read-only cache costs time, not correctness
    return fingerprint


def _read_fingerprint(path: Path) -> Fingerprint:
    from .gguf_index import GGUFIndex, GGUFIndexError

    try:
        index = GGUFIndex(path)
    except GGUFIndexError as exc:
        raise FingerprintError(str(exc)) from exc

    def field(key: str):
        value = index.value(key)
        if value is None:
            raise FingerprintError(f"{path} has no '{key}' metadata; it is not a complete llama.cpp model file. Fix: re-convert the model with convert_hf_to_gguf.py.")
        return value

    arch = str(field("general.architecture"))
    n_layer = int(field(f"{arch}.block_count"))
    n_ff = field(f"{arch}.feed_forward_length")
    if isinstance(n_ff, list):  # per-layer FFN widths (e.g. OpenELM)
        raise FingerprintError(f"{path} has a different FFN width per layer; neuron masks need one n_ff for all layers.")
    n_ff = int(n_ff)
    n_embd = int(field(f"{arch}.embedding_length"))

    def norm(name: str) -> np.ndarray:
        if name not in index.tensors:
            raise FingerprintError(f"{path} has no tensor '{name}'; cna-local needs Llama-style RMSNorm layers (attn_norm, ffn_norm, output_norm).")
        return index.array(name).reshape(-1)

    arrays = []
    for il in range(n_layer):
        arrays += [norm(f"blk.{il}.attn_norm.weight"), norm(f"blk.{il}.ffn_norm.weight")]
    arrays.append(norm("output_norm.weight"))
    return Fingerprint(arch=arch, n_layer=n_layer, n_ff=n_ff, n_embd=n_embd, digest=norm_digest(arrays))


def check_mask_matches_gguf(mask: "NeuronMask", model_path: str | Path) -> None:
    """Raise MaskMismatchError unless the mask was made for this GGUF model."""
    mask.check_matches(fingerprint_from_gguf(model_path), model_label=Path(model_path).name)
