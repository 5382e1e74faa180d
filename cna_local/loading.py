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
import weakref
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


def module_weight(module: nn.Module) -> torch.Tensor:
    """A layer's weight, also where accelerate offloaded it (the parameter is then on the meta device and
    the real tensor sits in the layer's hook)."""
    weight = module.weight
    if weight.device.type == "meta":
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights_map is not None:
            return weights_map["weight"]
    return weight


def input_device(model: nn.Module) -> torch.device:
    """Where the token ids go: the device of the first layer accelerate placed (not the disk), else the
    model's."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        first = next(iter(device_map.values()))
        if isinstance(first, int):
            return torch.device("cuda", first)
        if first not in ("disk", "meta"):
            return torch.device(first)
        return torch.device("cpu")
    return next(model.parameters()).device


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


DEVICES = ("cpu", "cuda", "mps")


def resolve_dtype(device: str, dtype: torch.dtype | None) -> torch.dtype:
    """float32 on the CPU (the reference: exact against llama.cpp's F32 path, and CPU bf16 matmuls are slow);
    bfloat16 where the accelerator computes in it natively (CUDA with bf16, MPS): half the memory."""
    if dtype is not None:
        return dtype
    if device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device == "mps":
        return torch.bfloat16
    return torch.float32


def check_device(device: str, device_map: str | None) -> None:
    """A clear error for a device this machine does not have, before anything loads."""
    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}. Fix: use one of {', '.join(DEVICES)}.")
    if device_map not in (None, "auto"):
        raise ModelLoadError(f"--device-map {device_map!r} is not supported. Fix: use --device-map auto (accelerate "
                             "places the layers over every GPU, then the CPU, then the disk).")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda, but this PyTorch sees no CUDA GPU (a CPU-only build, or no driver). "
                             "Fix: install a CUDA build of torch, or use --device cpu.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("--device mps, but Apple's Metal backend is not available here. Fix: use --device cpu.")


def _load_hf_dir(directory: Path, dtype: torch.dtype, device_map: str | None = None, max_memory: dict | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if device_map is None:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype), tokenizer
    # accelerate fills the GPUs first, then CPU memory, then offloads the rest to disk
    offload = Path(tempfile.mkdtemp(prefix="cna-offload-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, device_map=device_map,
                                                     offload_folder=str(offload), max_memory=max_memory)
    except BaseException:
        shutil.rmtree(offload, ignore_errors=True)
        raise
    # the offloaded weights (GBs for a large model) live as long as the model: removed when it is collected,
    # or at exit
    weakref.finalize(model, shutil.rmtree, offload, ignore_errors=True)
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


def check_memory(path: Path, is_gguf: bool, dtype: torch.dtype, use_cache: bool, device_map: str | None) -> None:
    """Refuse, with the fix, a model whose in-memory copy cannot fit (cna_local/memory_check.py).

    Where the copy lives: a GGUF not yet in the dequantized cache is converted to float32 in memory, even
    under --device-map (which then places it from the cache that conversion writes); from the cache, or from
    a Hugging Face directory, it is held at `dtype` on the CPU before it moves to a device; under
    --device-map accelerate places it from files, so nothing is checked."""
    from .memory_check import check_fits, gguf_parameters, hf_parameters

    cached = is_gguf and use_cache and (_gguf_cache_entry(path) / "complete.json").is_file()
    if is_gguf and not cached:
        check_fits(path, gguf_parameters(path), 4, is_gguf=True)
    elif device_map is None:
        n = gguf_parameters(path) if is_gguf else hf_parameters(path)
        if n is not None:
            check_fits(path, n, dtype.itemsize, is_gguf=is_gguf)


def load_model(path: str | Path, dtype: torch.dtype | None = None, use_cache: bool = True,
               progress: bool = False, device: str = "cpu", device_map: str | None = None,
               max_memory: dict | None = None) -> LoadedModel:
    """Load a causal LM for attribution from a HF directory or a .gguf file (CPU, float32 by default).

    progress: show each slow step of a GGUF load on stderr, with its elapsed time.
    device: cpu, cuda or mps (dtype then defaults to bfloat16 where the device has it, see resolve_dtype);
    device_map="auto": accelerate spreads the layers over the GPUs, the CPU and the disk, for a model larger
    than one device (a GGUF is dequantized into the cache first and loaded from there); max_memory (per
    device, accelerate's) bounds what it puts where.
    """
    check_device(device, device_map)
    dtype = resolve_dtype(device if device_map is None else ("cuda" if torch.cuda.is_available() else "cpu"), dtype)
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
    if device_map is not None and is_gguf and not use_cache:
        raise ModelLoadError("--device-map loads a GGUF from its dequantized cache. Fix: drop --no-cache.")
    check_memory(path, is_gguf, dtype, use_cache, device_map)
    try:
        if is_gguf:
            model, tokenizer = _load_gguf(path, dtype if device_map is None else torch.float32, use_cache, progress)
            if device_map is not None:  # placed from the float32 safetensors the first load cached
                del model
                if not (_gguf_cache_entry(path) / "complete.json").is_file():
                    raise ModelLoadError(f"the dequantized cache of {path.name} could not be written (see the warning "
                                         "above), and --device-map loads from it. Fix: free disk space in the cache.")
                model, tokenizer = _load_hf_dir(_gguf_cache_entry(path), dtype, device_map, max_memory)
        else:
            model, tokenizer = _load_hf_dir(path, dtype, device_map, max_memory)
        if device_map is None and device != "cpu":
            model = model.to(device)
    except CnaLocalError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"could not load {path}: {exc}. Fix: check that it is a complete causal-LM checkpoint that transformers can read.") from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=path, name=name, down_projs=down_projections(model))
