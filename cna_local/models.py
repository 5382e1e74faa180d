"""Turn a --model argument into a model path.

For now a spec is a path (a Hugging Face model directory or a .gguf file);
named models (e.g. `default`) will resolve here too.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CnaLocalError


class ModelNotFoundError(CnaLocalError):
    """The --model argument names nothing that exists."""


def resolve_model(spec: str | Path) -> Path:
    """The local path of the model `spec` refers to."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {str(spec)!r} not found: no such file or directory. "
            "Fix: pass a Hugging Face model directory or a .gguf file."
        )
    return path
