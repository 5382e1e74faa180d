"""The pinned llama.cpp source tree, taken from the llama-cpp-python sdist.

One pinned sdist gives everyone the same llama.cpp: the tests convert tiny
models with its ``convert_hf_to_gguf.py`` and the build patches a copy of it.

The build runs this file by path (``python cna_local/vendor.py --print-root``) before the package is
installed, so it imports only ``cache.py``, which imports nothing from the package either.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

try:
    from .cache import cache_dir, sha256_file
except ImportError:  # run by path from the build: cna_local/ is sys.path[0]
    from cache import cache_dir, sha256_file

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"


class VendorError(RuntimeError):
    """The pinned llama.cpp sources could not be fetched or verified."""


def _download_sdist(dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps",
        "--no-binary=llama-cpp-python",
        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
        "-d", str(dest_dir),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdist = dest_dir / SDIST_NAME
    if proc.returncode != 0 or not sdist.exists():
        raise VendorError(
            f"could not download llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist "
            f"(command: {' '.join(cmd)}):\n{proc.stderr.strip()[-2000:]}\n"
            f"Fix: check network access to PyPI, or place {SDIST_NAME} in {dest_dir} by hand."
        )
    return sdist


def sdist_path(cache: Path | None = None) -> Path:
    """The verified sdist archive, downloading it once if missing."""
    downloads = (cache or cache_dir()) / "downloads"
    sdist = downloads / SDIST_NAME
    if not sdist.exists():
        sdist = _download_sdist(downloads)
    actual = sha256_file(sdist)
    if actual != SDIST_SHA256:
        raise VendorError(
            f"{sdist} has sha256 {actual}, expected {SDIST_SHA256}. "
            f"Fix: delete the file and run again to re-download it."
        )
    return sdist


def sdist_root(cache: Path | None = None) -> Path:
    """The extracted sdist directory (contains vendor/llama.cpp), extracting once."""
    root_parent = (cache or cache_dir()) / "vendor"
    root = root_parent / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    marker = root / ".cna-local-extracted"
    if marker.exists():
        return root
    archive = sdist_path(cache)
    root_parent.mkdir(parents=True, exist_ok=True)
    # Extract into a private temp dir and rename, so a concurrent build and
    # test run never see a half-extracted tree.
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=root_parent))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # The "data" filter refuses absolute paths, ".." and links escaping the tree.
            tar.extractall(staging, filter="data")
        extracted = staging / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
        if not (extracted / "vendor" / "llama.cpp").is_dir():
            raise VendorError(f"{archive} has no vendor/llama.cpp directory; the sdist is not what was pinned.")
        (extracted / ".cna-local-extracted").write_text(SDIST_SHA256 + "\n")
        if root.exists() and not marker.exists():
            shutil.rmtree(root)  # leftover of an interrupted run
        try:
            os.rename(extracted, root)
        except OSError:
            if not marker.exists():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def llama_cpp_tree(cache: Path | None = None) -> Path:
    """The pinned llama.cpp source tree (``<sdist>/vendor/llama.cpp``)."""
    return sdist_root(cache) / "vendor" / "llama.cpp"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--print-root", action="store_true", help="print the extracted sdist root")
    group.add_argument("--print-tree", action="store_true", help="print the vendored llama.cpp tree")
    args = parser.parse_args(argv)
    try:
        path = sdist_root() if args.print_root else llama_cpp_tree()
    except VendorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
