"""Where cna-local keeps what it makes once and reuses: downloads, assembled models, dequantized weights,
contrast statistics, model fingerprints.

This module imports nothing from ``cna_local``: the build runs ``vendor.py`` by path, before the package
is installed, and vendor.py takes its cache location from here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """$CNA_LOCAL_CACHE, else $XDG_CACHE_HOME/cna-local, else ~/.cache/cna-local."""
    explicit = os.environ.get("CNA_LOCAL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "cna-local"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_key(path: Path) -> str:
    """A short key for a file as it is now: its resolved path, size and modification time.

    Not a content hash: hashing a multi-GB model would cost seconds on every use, and a changed file
    changes its mtime.
    """
    st = Path(path).stat()
    key = f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def write_atomic(path: Path, data: bytes) -> None:
    """Write the whole file or nothing: into a temp file beside it, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic_with(path: Path, write) -> Path:
    """Whole or nothing, for writers that take a path: `write(tmp)` beside `path`, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
