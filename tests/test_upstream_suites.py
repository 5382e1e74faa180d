"""The upstream projects' own tests on the patched tree (tools/upstream_tests.py --ci): llama.cpp's
test-backend-ops in CPU mode for MUL (the op the mask adds) and its tokenizer tests, and llama-cpp-python's
own test suite against the patched library, offline. The full run (every architecture, every op) is
`python tools/upstream_tests.py`; its counts are in the README.

The C tests are built once per (pinned sources, patches) into the cna-local cache; the first run compiles
llama.cpp's common library and the test programs (about 6 minutes on 2 cores, less with ccache).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tiny_models import CACHE

TOOL = Path(__file__).resolve().parent.parent / "tools" / "upstream_tests.py"


def run_tool(*args) -> str:
    env = dict(os.environ, CNA_LOCAL_CACHE=str(CACHE))  # the shared cache: built once, not per test
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, str(TOOL), "--ci", *args], capture_output=True, text=True, env=env,
                          timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_llama_cpp_cpu_tests_pass_on_the_patched_tree():
    out = run_tool("--only", "c")
    passed, total = map(int, re.search(r"test-backend-ops -b CPU -o MUL: (\d+)/(\d+) passed", out).groups())
    assert passed == total >= 100
    passed, total = map(int, re.search(r"tokenizer tests .*: (\d+)/(\d+) passed", out).groups())
    assert passed == total == 16


def test_llama_cpp_python_own_suite_passes_on_the_patched_library():
    out = run_tool("--only", "python")
    m = re.search(r"test suite on the patched library: (\d+) passed, (\d+) failed", out)
    assert m and int(m.group(2)) == 0 and int(m.group(1)) >= 15, out
