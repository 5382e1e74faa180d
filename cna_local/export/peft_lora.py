"""A PEFT LoRA directory (`adapter_config.json` + `adapter_model.safetensors`) for transformers + peft and
vLLM's multi-LoRA serving.

Ranks differ per layer, and vLLM releases of 2024-2025 ignore `rank_pattern`/`alpha_pattern` (they scale
every module by `lora_alpha / r`; 0.33.0 honours them), as does llama.cpp's convert_lora_to_gguf.py. So every layer is padded to one
rank R with zero rows in A and zero columns in B (B A is unchanged), and `lora_alpha = r = R`: scaling 1
in PEFT, in every vLLM, and through convert_lora_to_gguf.py. Only the steered layers have tensors, named
in `target_modules` one by one (a layer list of `[]` would mean every layer to PEFT).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .gguf_lora import SCALE_RULE
from .lowrank import ExportError, LayerUpdate

if TYPE_CHECKING:
    from ..maskfile import NeuronMask

# vLLM's --max-lora-rank takes one of these (vllm/config/lora.py, MaxLoRARanks; default 16)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def module_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.down_proj"


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts for an adapter of this rank (None: above its limit)."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


def write_peft_lora(directory: Path, mask: "NeuronMask", updates: Sequence[LayerUpdate], m0: float,
                    base_model: str, force: bool = False) -> Path:
    """Write the adapter directory whole or not at all: built in a temporary directory, then renamed."""
    from safetensors.numpy import save_file

    from .. import __version__

    directory = Path(directory)
    if not directory.parent.is_dir():
        raise ExportError(f"the directory {directory.parent} does not exist. Fix: create it or choose another --out.")
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"{directory} is a file; the peft format writes a directory. Fix: --out DIR")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise ExportError(f"{directory} exists and is not empty. Fix: choose another --out, or pass --force to replace it.")
    rank = max(u.rank for u in updates)
    tensors, targets = {}, []
    for u in updates:
        a = np.zeros((rank, u.a.shape[1]), np.float32)
        b = np.zeros((u.b.shape[0], rank), np.float32)
        a[: u.rank], b[:, : u.rank] = u.a, u.b
        name = module_name(u.layer)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        targets.append(name)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": rank,  # scaling alpha / r = 1 in PEFT and vLLM
        "target_modules": targets, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "bias": "none", "lora_dropout": 0.0, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }
    note = {"model_fingerprint": mask.fingerprint, "model_name": mask.model_name, "multiplier_at_scale_1": m0,
            "scale_rule": SCALE_RULE, "ranks": {str(u.layer): u.rank for u in updates}, "padded_rank": rank,
            "vllm_max_lora_rank": vllm_max_lora_rank(rank), "tool_version": __version__}
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    except OSError as exc:
        raise ExportError(f"could not write in {directory.parent} ({exc.strerror or exc}). Fix: choose a writable --out.") from exc
    try:
        save_file(tensors, str(staging / "adapter_model.safetensors"),
                  metadata={"format": "pt", "cna_local": json.dumps(note)})
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "cna_local_export.json").write_text(json.dumps(note, indent=2) + "\n")
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.rename(directory, old / "x")
            os.rename(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, directory)
    except OSError as exc:
        raise ExportError(f"could not write {directory} ({exc.strerror or exc}). Fix: choose a writable --out.") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
