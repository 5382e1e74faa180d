"""Load a causal LM + tokenizer for attribution, and find its MLP down projections.

Accepts a local Hugging Face directory or a single .gguf file. A GGUF is
dequantized by transformers, which is slow (about a minute for 0.5B on 2 cores),
so the dequantized float32 weights are cached as safetensors, keyed by the
file's path, size and modification time.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CnaLocalError
from .cache import cache_dir, file_key

log = logging.getLogger(__name__)

# Keep this much disk free after writing a dequantized cache entry.
_CACHE_DISK_MARGIN = 2 << 30


class ModelLoadError(CnaLocalError):
    """The model path cannot be loaded."""


class UnsupportedModelError(CnaLocalError):
    """The model loads, but its layout is not one cna-local can attribute (e.g. mixture-of-experts)."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: Path
    name: str
    down_projs: list[nn.Linear]  # one per decoder layer, in layer order

    @property
    def n_layer(self) -> int:
        return len(self.down_projs)

    @property
    def n_ff(self) -> int:
        return self.down_projs[0].in_features


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers: the longest nn.ModuleList whose entries all have an `.mlp`."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            if all(hasattr(layer, "mlp") for layer in module):
                best = list(module)
    if not best:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no list of decoder layers with an `.mlp`; cna-local supports "
            "Llama-style decoders (Llama, Qwen2, Mistral, Gemma, Phi-3). Fix: use one of those architectures."
        )
    return best


def final_norm(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", model)
    norm = getattr(base, "norm", None)
    if norm is None or not hasattr(norm, "weight"):
        raise UnsupportedModelError(f"{type(model).__name__} has no final RMSNorm at model.norm; it is not a Llama-style decoder.")
    return norm


def _is_moe(mlp: nn.Module) -> bool:
    return any(hasattr(mlp, attr) for attr in ("experts", "router")) or type(mlp).__name__.lower().find("moe") >= 0


def down_projections(model: nn.Module) -> list[nn.Linear]:
    """Each decoder layer's `mlp.down_proj` (its input is the per-neuron activation act(gate)*up)."""
    layers = decoder_layers(model)
    projs = []
    for il, layer in enumerate(layers):
        mlp = layer.mlp
        if _is_moe(mlp):
            raise UnsupportedModelError(
                f"layer {il} of this {model.config.model_type} model is a mixture-of-experts block "
                f"({type(mlp).__name__}); neuron masks support dense MLPs only. "
                "Fix: use a dense model (Llama, Qwen2, Mistral, Gemma, Phi-3)."
            )
        down = getattr(mlp, "down_proj", None)
        if not isinstance(down, nn.Linear):
            raise UnsupportedModelError(
                f"layer {il}'s MLP ({type(mlp).__name__}) has no `down_proj` linear layer; "
                "cna-local supports Llama-style gated MLPs. Fix: use a Llama, Qwen2, Mistral, Gemma or Phi-3 model."
            )
        projs.append(down)
    widths = {p.in_features for p in projs}
    if len(widths) != 1:
        raise UnsupportedModelError(
            f"the MLP width differs between layers ({sorted(widths)}); a neuron mask needs one n_ff for all layers."
        )
    return projs


def dequantized_cache_dir() -> Path:
    """Where dequantized GGUF weights are cached (float32: 4 bytes per parameter on disk)."""
    return cache_dir() / "dequantized"


def _gguf_cache_entry(gguf_path: Path) -> Path:
    return dequantized_cache_dir() / file_key(gguf_path)


def _load_hf_dir(directory: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype, use_cache: bool, progress: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .progress import step

    entry = _gguf_cache_entry(path)
    if use_cache and (entry / "complete.json").is_file():
        log.info("loading dequantized weights of %s from cache %s", path, entry)
        with step(f"loading the cached float32 weights of {path.name}", progress):
            return _load_hf_dir(entry, dtype)
    # transformers parses the GGUF's metadata (a 150k-token vocabulary: ~10 s on 2 cores) for the tokenizer,
    # again for the config and again for the tensors, silently: say what runs and for how long
    once = " (first load only)" if use_cache else ""
    with step(f"reading the tokenizer from {path.name}{once}", progress):
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    with step(f"converting {path.name} to float32 torch weights{once}", progress), _quiet_transformers_bars(progress):
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    if use_cache:
        with step("caching the float32 weights for later runs", progress):
            _write_cache(entry, path, model, tokenizer)
    return model.to(dtype), tokenizer


@contextlib.contextmanager
def _quiet_transformers_bars(enabled: bool):
    """Silence transformers' own bars inside a step that shows its own line: they start half-way through
    the step (after ~20 s of silent metadata parsing) and would interleave with it."""
    if not enabled:
        yield
        return
    import functools
    from unittest import mock

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights"
    try:
        if hasattr(gguf_utils, "tqdm"):  # "Converting and de-quantizing GGUF tensors..."
            with mock.patch.object(gguf_utils, "tqdm", functools.partial(tqdm, disable=True)):
                yield
        else:
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _save_dequantized(model: nn.Module, directory: Path) -> None:
    # save_pretrained refuses models loaded from GGUF (they carry a GGUF
    # "quantizer" although the weights are plain float32), so write the
    # safetensors and a config without quantization_config by hand.
    from safetensors.torch import save_file

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied weight (lm_head = embed_tokens): the config re-ties it
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.contiguous()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _write_cache(entry: Path, source: Path, model: nn.Module, tokenizer) -> None:
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    entry.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(entry.parent).free < need + _CACHE_DISK_MARGIN:
        log.warning("not caching dequantized weights of %s: less than %d MB free in %s", source, need >> 20, entry.parent)
        return
    # Written to a temp dir and renamed, so a crash never leaves a half cache entry.
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        _save_dequantized(model, staging)
        tokenizer.save_pretrained(staging)
        st = source.stat()
        (staging / "complete.json").write_text(
            json.dumps({"source": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        )
        if entry.exists():
            shutil.rmtree(entry)
        os.rename(staging, entry)
    except OSError as exc:
        log.warning("could not cache dequantized weights of %s: %s", source, exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, use_cache: bool = True,
               progress: bool = False) -> LoadedModel:
    """Load a causal LM for attribution from a HF directory or a .gguf file (CPU, float32 by default).

    progress: show each slow step of a GGUF load on stderr, with its elapsed time.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory without config.json, so not a Hugging Face model. Fix: pass the model directory or a .gguf file.")
        is_gguf, name = False, path.resolve().name
    elif path.is_file() and path.suffix.lower() == ".gguf":
        is_gguf, name = True, path.stem
    elif path.exists():
        raise ModelLoadError(f"{path} is neither a Hugging Face model directory nor a .gguf file. Fix: pass one of those.")
    else:
        raise ModelLoadError(f"{path} does not exist. Fix: pass a Hugging Face model directory or a .gguf file.")
    try:
        model, tokenizer = _load_gguf(path, dtype, use_cache, progress) if is_gguf else _load_hf_dir(path, dtype)
    except CnaLocalError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"could not load {path}: {exc}. Fix: check that it is a complete causal-LM checkpoint that transformers can read.") from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=path, name=name, down_projs=down_projections(model))
