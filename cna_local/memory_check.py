"""Will attribution's copy of the weights fit? Checked before loading, so a model too large for this machine
stops with the fix instead of swapping for minutes and then meeting the kernel's OOM killer.

transformers dequantizes a GGUF into float32 in memory (4 bytes per parameter: 28 GB for a 7B model)
before anything else can happen, whatever device the model is meant for; a Hugging Face directory is held
in memory at the dtype it loads in. Measured peaks are higher still (section 7 of REPORT.md: 1.5-2x the
float32 copy), so the check only refuses what cannot fit: the copy alone larger than the memory available.
The llama backend needs the GGUF's own size plus the captured rows (check_llama_fits).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .errors import CnaLocalError

SKIP_ENV = "CNA_LOCAL_SKIP_MEMORY_CHECK"


class NotEnoughMemoryError(CnaLocalError):
    """What attribution would hold (the torch backend's copy, the llama backend's GGUF and rows) is larger
    than the memory this machine has free."""


def available_bytes() -> int:
    """RAM available without swapping other programs out, plus free swap."""
    import psutil

    return int(psutil.virtual_memory().available + psutil.swap_memory().free)


def gguf_parameters(path: Path) -> int:
    """How many weights a GGUF holds, from its tensor table (no tensor data read)."""
    from .gguf_index import GGUFIndex

    return sum(math.prod(t.shape) for t in GGUFIndex(path).tensors.values())


def hf_parameters(directory: Path) -> int | None:
    """How many weights a Hugging Face directory's safetensors hold (headers only); None without safetensors."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def _available_unless_fits(need: int, available: int | None) -> int | None:
    """None when `need` bytes fit (or the check is switched off), else the bytes available, for the message."""
    if os.environ.get(SKIP_ENV):
        return None
    available = available_bytes() if available is None else available
    return None if need <= available else available


def _refusal(what: str, fix: str, available: int) -> NotEnoughMemoryError:
    return NotEnoughMemoryError(f"{what}, where this machine has {available / 1e9:.1f} GB available (RAM and swap). "
                                f"Fix: {fix}; or free memory. To load anyway, set {SKIP_ENV}=1.")


def check_fits(source: Path, n_params: int, bytes_per_param: int, *, is_gguf: bool, available: int | None = None) -> None:
    """Raise NotEnoughMemoryError when n_params x bytes_per_param exceeds the memory available."""
    need = n_params * bytes_per_param
    available = _available_unless_fits(need, available)
    if available is None:
        return
    what = ("dequantizes it to float32 in memory first" if is_gguf else
            f"holds its weights in memory at {bytes_per_param} bytes each")
    if is_gguf:
        fix = (f"use the llama backend (`--backend llama`, the default for a .gguf file): it attributes inside "
               f"llama.cpp in about the GGUF's own {source.stat().st_size / 1e9:.2f} GB plus well under 1 GB")
    else:
        fix = ("add `--device-map auto` (accelerate keeps what does not fit on the disk, slowly), or convert the "
               "model to GGUF and use the llama backend, which needs about the GGUF's size")
    raise _refusal(f"{source.name} has {n_params / 1e9:.2f}B parameters and the torch backend {what}: at least "
                   f"{need / 1e9:.1f} GB", fix, available)


def _q5_0_growth(index) -> int:
    """Bytes the capture's model grows by when its Q5_0 layer weights are held as F16 (capture.Q5_0_AS_F16)."""
    from .capture import q5_0_as_f16_applies

    if not q5_0_as_f16_applies():
        return 0
    q5_0 = 6  # ggml type
    # every Q5_0 matrix a matmul reads; the token embeddings only when tied to the output (no output.weight)
    tied = "output.weight" not in index.tensors
    return sum(2 * int(np.prod(t.shape)) - t.nbytes for t in index.tensors.values()
               if t.type == q5_0 and len(t.shape) == 2 and (t.name != "token_embd.weight" or tied))


def check_llama_fits(path: Path, n_prompts: int, available: int | None = None) -> None:
    """The llama backend reads the whole GGUF into memory (not mapped: the CPU backend repacks most weights
    into a copy of its own; Q5_0 ones as F16, larger) and keeps every prompt's captured row (n_layer x n_ff
    float32 values at its last token) for the scores and the gate; refuse when those alone exceed the memory
    available."""
    if os.environ.get(SKIP_ENV):  # before reading the file, too
        return
    from .gguf_index import GGUFIndex

    index = GGUFIndex(path)
    arch = index.value("general.architecture")
    n_layer, n_ff = index.value(f"{arch}.block_count"), index.value(f"{arch}.feed_forward_length")
    if not isinstance(n_layer, (int, np.integer)) or not isinstance(n_ff, (int, np.integer)):
        return  # the fingerprint's reader names what is wrong with such a file
    weights, rows = path.stat().st_size, int(n_prompts) * int(n_layer) * int(n_ff) * 4
    weights += _q5_0_growth(index)
    available = _available_unless_fits(weights + rows, available)
    if available is None:
        return
    raise _refusal(f"attributing {path.name} in llama.cpp holds its {weights / 1e9:.2f} GB of weights and "
                   f"{rows / 1e9:.2f} GB of captured rows for {n_prompts} prompts: at least "
                   f"{(weights + rows) / 1e9:.1f} GB",
                   "close other programs, use a smaller quantization or a smaller model, give fewer prompts, or "
                   "offload the layers to a GPU with --device cuda|mps", available)
