"""On x86-64 the wheel carries the CPU backend once per instruction-set level, and the one loaded is the
best this CPU runs: AVX-512 VNNI kernels on a Xeon or Zen 4, AVX-VNNI on an Alder Lake laptop, AVX2
elsewhere, plain x86-64 on anything older. Never ggml's AMX variant (its matmul crashes, llama.cpp #20824).
"""

import platform
from pathlib import Path

import pytest

from cna_local.runtime import binding

# patches/0006 + CMakeLists.txt: the variants built, with the /proc/cpuinfo flags each needs
# (ggml's own feature lists for these tags, ggml/src/CMakeLists.txt), best first (ggml's score order)
VARIANTS = {
    "icelake": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f", "avx512cd", "avx512vl", "avx512dq",
                "avx512bw", "avx512vbmi", "avx512_vnni"},
    "alderlake": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx_vnni"},
    "haswell": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"},
    "x64": set(),
}
# what llama_print_system_info must then say about the loaded backend (present, absent)
FEATURES = {
    "icelake": ({"AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX2"}, {"AMX_INT8"}),
    "alderlake": ({"AVX_VNNI", "AVX2"}, {"AVX512", "AMX_INT8"}),
    "haswell": ({"AVX2", "FMA", "F16C", "BMI2"}, {"AVX_VNNI", "AVX512", "AMX_INT8"}),
    "x64": (set(), {"AVX", "AVX2", "AVX512"}),
}


def expected_variant() -> str:
    """The best variant this CPU runs, from the kernel's own list of its flags."""
    text = Path("/proc/cpuinfo").read_text()
    line = next(line for line in text.splitlines() if line.startswith("flags"))
    flags = set(line.split(":", 1)[1].split())
    return next(name for name, needs in VARIANTS.items() if needs <= flags)


needs_variants = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64")
    or not binding.build_info()["cpu_variants"],
    reason="not an x86-64 Linux build with CPU variants (-DCNA_CPU_VARIANTS=OFF, a native or a GPU build)")


@needs_variants
def test_the_wheel_ships_four_variants_and_never_the_amx_one():
    assert set(binding.build_info()["cpu_variants"]) == set(VARIANTS)


@needs_variants
def test_the_loaded_variant_is_the_best_this_cpu_runs():
    expected = expected_variant()
    on = set(binding.build_info()["cpu_features"])
    present, absent = FEATURES[expected]
    assert present <= on, f"expected the {expected} variant on a CPU with {sorted(VARIANTS[expected])}: {sorted(on)}"
    assert not (absent & on), f"expected the {expected} variant, the loaded one has {sorted(absent & on)}"


@needs_variants
def test_version_names_the_build_and_the_kernels_it_runs():
    from click.testing import CliRunner

    from cna_local.cli import cli

    out = CliRunner().invoke(cli, ["--version"]).output
    assert "llama-cpp-python 0.3.36" in out and "the best of 4 variants" in out
    features = set(out.split("features:", 1)[1].split())
    present, absent = FEATURES[expected_variant()]
    assert present <= features and not (absent & features)


def test_version_prints_even_when_llama_cpp_cannot_load(monkeypatch):
    from click.testing import CliRunner

    from cna_local import __version__
    from cna_local.cli import cli

    def broken():
        raise OSError("libllama.so: cannot open shared object file")

    monkeypatch.setattr(binding, "build_info", broken)
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output.splitlines() == [f"cna-local {__version__}",
                                          "llama.cpp: could not be loaded (libllama.so: cannot open shared object file)"]
