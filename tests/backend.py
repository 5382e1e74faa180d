"""Where the tests run llama.cpp: on the CPU by default, or with every layer offloaded to the GPU when
CNA_TEST_GPU=1 (a CUDA or Metal build; `tools/device_check.sh` runs the suites that read this on one).

The suites that read it are the ones that prove the mask, the capture and the gate by comparison:
test_runtime_exactness, test_capture and test_runtime_gate. (test_attribution_devices' CUDA tests are the
torch backend's: they run wherever torch sees a GPU.)
"""

from __future__ import annotations

import os

ON_GPU = os.environ.get("CNA_TEST_GPU") == "1"
N_GPU_LAYERS = -1 if ON_GPU else 0
# the attribute command's --device for the llama backend
LLAMA_DEVICE = "cuda" if ON_GPU else "cpu"
