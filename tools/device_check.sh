#!/usr/bin/env bash
# The GPU path, proven by comparison: build the patched llama.cpp with CUDA, then run with every layer
# offloaded (CNA_TEST_GPU=1, see tests/backend.py) the suites that check the mask, the capture and the gate
# against PyTorch, and the torch backend's own CUDA tests.
#
#   bash tools/device_check.sh [BUILD_DIR]          # default: build-cuda/ in the repository
#
# Environment:
#   CUDA_ARCHS     CMAKE_CUDA_ARCHITECTURES (default native; 90 for an H100/H200)
#   BACKEND        cuda (default) or cpu: the same steps on a CPU build, to try this script without a GPU
#   CNA_SDIST_ROOT an extracted llama-cpp-python sdist (default: the one cna_local/vendor.py keeps in the cache;
#                  on an offline machine, point CNA_LOCAL_CACHE at a cache that holds it and the test tokenizers)
#   PYTHON, JOBS, PYTEST_ARGS
#
# FlashAttention's CUDA kernels are left out (GGML_CUDA_FA=OFF): the mask and the capture live in the FFN, and
# those kernels are most of the compile time. llama.cpp then runs attention without them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build-cuda}
py=${PYTHON:-python3}
backend=${BACKEND:-cuda}
sdist=${CNA_SDIST_ROOT:-$("$py" "$root/cna_local/vendor.py" --print-root)}

flags=()
if [[ $backend == cuda ]]; then
    flags=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-native}" -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF)
    export CNA_TEST_GPU=1
elif [[ $backend != cpu ]]; then
    echo "BACKEND must be cuda or cpu, not '$backend'" >&2
    exit 2
fi

t0=$SECONDS
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCNA_SDIST_ROOT="$sdist" \
    -DCMAKE_INSTALL_PREFIX="$build/site" "${flags[@]}"
cmake --build "$build" -j "${JOBS:-$(nproc)}"
cmake --install "$build" --component cna_local >/dev/null
echo "device_check: built in $((SECONDS - t0)) s ($backend)"

# the package from this checkout, llama-cpp-python's Python side and the libraries from the build
if [[ $backend == cuda ]]; then
    # With a CUDA torch imported first (the comparisons need both in one process), libllama's std::regex
    # crashed in the vocabulary load: a libstdc++ symbol bound to the wrong library (H200, torch 2.11+cu130,
    # CUDA 13.0; importing llama_cpp first or LD_BIND_NOW did not help). Preloading libstdc++ did.
    stdcxx=$(ldconfig -p | awk '/libstdc\+\+\.so\.6 / {print $NF; exit}')
    [[ -n $stdcxx ]] && export LD_PRELOAD="$stdcxx${LD_PRELOAD:+:$LD_PRELOAD}"
fi
export LLAMA_CPP_LIB_PATH="$build/site/cna_local/lib"
export PYTHONPATH="$root:$build/site${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
"$py" - <<'EOF'
import llama_cpp
from cna_local.runtime import binding
print(f"device_check: llama.cpp from {binding.library_path()}, GPU offload: {llama_cpp.llama_supports_gpu_offload()}")
EOF
# shellcheck disable=SC2086
"$py" -m pytest -p no:cacheprovider -q tests/test_runtime_exactness.py tests/test_capture.py \
    tests/test_runtime_gate.py tests/test_attribution_devices.py ${PYTEST_ARGS:-}
