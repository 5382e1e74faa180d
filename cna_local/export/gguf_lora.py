"""The llama.cpp LoRA GGUF: loaded by stock llama.cpp (`--lora`, `--lora-scaled FILE:SCALE`, llama-server's
per-request `"lora": [{"id", "scale"}]`), Ollama (`ADAPTER`) and LM Studio.

llama.cpp's loader (src/llama-adapter.cpp in the pinned tree) wants `general.type = adapter`,
`adapter.type = lora`, `general.architecture` = the model's, tensors `<weight>.lora_a` ({n_ff, r}) and
`<weight>.lora_b` ({r, n_embd}), and applies `scale * alpha / r` when `adapter.lora.alpha` is not 0, else
`scale` itself. Ranks differ per layer here, so alpha is 0: scale 1 means M0 in every layer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .lowrank import ExportError, LayerUpdate

if TYPE_CHECKING:
    from ..maskfile import NeuronMask

PREFIX = "cna_local."
SCALE_RULE = "multiplier = 1 + scale * (M0 - 1): scale 0 is off, 1 is M0"


def write_gguf_lora(path: Path, mask: "NeuronMask", updates: Sequence[LayerUpdate], m0: float,
                    dtype: str = "f32") -> Path:
    """Write the adapter whole or not at all: into a temporary file beside `path`, then renamed over it."""
    import gguf

    from .. import __version__

    if dtype not in ("f32", "f16"):
        raise ExportError(f"dtype {dtype!r}: choose f32 or f16.")
    np_dtype = np.float32 if dtype == "f32" else np.float16
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch=mask.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(f"{mask.meta.get('name') or 'neuron mask'} as LoRA at multiplier {m0:g}")
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # use the scale as given (ranks differ per layer)
        writer.add_string(PREFIX + "model_fingerprint", mask.fingerprint)
        writer.add_string(PREFIX + "model_name", mask.model_name)
        writer.add_float32(PREFIX + "multiplier_at_scale_1", float(m0))
        writer.add_string(PREFIX + "scale_rule", SCALE_RULE)
        writer.add_uint32(PREFIX + "n_neurons", sum(u.rank for u in updates))
        writer.add_string(PREFIX + "tool_version", __version__)
        for u in updates:
            writer.add_tensor(f"blk.{u.layer}.ffn_down.weight.lora_a", u.a.astype(np_dtype))
            writer.add_tensor(f"blk.{u.layer}.ffn_down.weight.lora_b", u.b.astype(np_dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except OSError as exc:
        raise ExportError(f"could not write {path} ({exc.strerror or exc}). Fix: choose a writable --out path.") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _temporary_beside(path: Path) -> Path:
    if not path.parent.is_dir():
        raise ExportError(f"the directory of {path} does not exist. Fix: create it or choose another --out.")
    if path.is_dir():
        raise ExportError(f"{path} is a directory; the gguf-lora format writes one file. Fix: --out FILE.lora.gguf")
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")
