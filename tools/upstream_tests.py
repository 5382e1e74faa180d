"""Run the upstream projects' own test suites on the patched tree, offline, and print their counts.

    python tools/upstream_tests.py            # everything below
    python tools/upstream_tests.py --ci       # the subset CI runs (tests/test_upstream_suites.py)
    python tools/upstream_tests.py --only c|python|archs

c       llama.cpp's own CPU tests, built from the pinned tree with patches/ applied (the same sources the
        wheel compiles, at its AVX2 level): test-backend-ops in CPU mode (optimized kernels
        against the reference implementation) for MUL, the op the mask adds, and with --full for every op;
        the tokenizer tests that need only the vocab files in the tree (test-tokenizer-0 on 15 vocabularies,
        test-tokenizer-1-spm); test-llama-archs (every architecture, dense and MoE, built from random
        weights, run and saved and reloaded).
python  llama-cpp-python's own test suite (tests/ of the pinned sdist) against the installed patched
        library. Its hub downloads are answered from local files (tests/upstream_conftest.py): the default
        model, SmolLM2 and a tiny Mamba stand in; tests that assert a hub model's exact tokens are deselected
        and listed.
archs   which layers a neuron mask reaches in every architecture of the pinned tree: test-llama-archs writes
        a random model per architecture, and SteeredLlama probes each (docs/architectures.md).

The build goes to <cna-local cache>/upstream-build/<hash of the sources and patches>, so a second run
only runs. Needs the test extras (`pip install ".[test]"`) and cmake, a C++ compiler, and ccache if present.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

C_TARGETS = ["test-backend-ops", "test-tokenizer-0", "test-tokenizer-1-spm", "test-llama-archs"]
# the AVX2 level (the single library of -DCNA_CPU_VARIANTS=OFF; the variant an AVX2-only CPU loads)
CPU_FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"]


def sh(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], text=True, capture_output=True, **kw)


def say(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------- c

def patched_tree() -> Path:
    """The pinned llama.cpp with the C patches applied, built once per (sdist, patches)."""
    from cna_local import vendor
    from cna_local.cache import cache_dir

    patches = sorted((ROOT / "patches").glob("*.patch"))
    c_patches = [p for p in patches if "vendor/llama.cpp/" in p.read_text()]
    key = hashlib.sha256((vendor.SDIST_SHA256 + "".join(p.read_text() for p in c_patches)).encode()).hexdigest()[:16]
    base = cache_dir() / "upstream-build" / key
    src = base / "llama.cpp"
    if not (base / "patched").is_file():
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        shutil.copytree(vendor.llama_cpp_tree(), src, symlinks=True)
        for p in c_patches:
            # only the hunks under vendor/llama.cpp/ (patch 0004 is llama-cpp-python's)
            proc = sh(["patch", "-p3", "--forward", "--batch", "-i", p], cwd=src)
            if proc.returncode != 0:
                raise SystemExit(f"{p.name} does not apply:\n{proc.stdout}{proc.stderr}")
        (base / "patched").write_text(key)
    return base


def build(base: Path, targets: list[str]) -> Path:
    out = base / "build"
    launcher = ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"] if shutil.which("ccache") else []
    if not (out / "CMakeCache.txt").is_file():
        proc = sh(["cmake", "-S", base / "llama.cpp", "-B", out, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=ON",
                   "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                   "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", *CPU_FLAGS, *launcher])
        if proc.returncode != 0:
            raise SystemExit(f"cmake configure failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    t0 = time.perf_counter()
    proc = sh(["cmake", "--build", out, "-j", str(os.cpu_count() or 2), "--target", *targets])
    if proc.returncode != 0:
        raise SystemExit(f"build failed:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
    say(f"built {', '.join(targets)} in {time.perf_counter() - t0:.0f} s ({out})")
    return out / "bin"


def run_backend_ops(bin_dir: Path, ops: str | None) -> dict:
    cmd = [bin_dir / "test-backend-ops", "test", "-b", "CPU"] + (["-o", ops] if ops else [])
    proc = sh(cmd)
    text = proc.stdout + proc.stderr
    m = re.search(r"(\d+)/(\d+) tests passed", text)
    passed, total = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    ok = proc.returncode == 0 and m is not None and passed == total
    say(f"test-backend-ops -b CPU{' -o ' + ops if ops else ''}: {passed}/{total} passed{'' if ok else ' (FAILED)'}")
    if not ok:
        say(text[-3000:])
    return {"name": f"test-backend-ops CPU {ops or 'all ops'}", "passed": passed, "total": total, "ok": ok}


def run_tokenizers(base: Path, bin_dir: Path) -> dict:
    models = base / "llama.cpp" / "models"
    vocabs = sorted(p for p in models.glob("ggml-vocab-*.gguf") if p.with_suffix(".gguf.inp").is_file())
    results = []
    for vocab in vocabs:
        proc = sh([bin_dir / "test-tokenizer-0", vocab])
        results.append((vocab.name, proc.returncode == 0))
    spm = sh([bin_dir / "test-tokenizer-1-spm", models / "ggml-vocab-llama-spm.gguf"])
    results.append(("test-tokenizer-1-spm llama-spm", spm.returncode == 0))
    passed = sum(ok for _, ok in results)
    failed = [name for name, ok in results if not ok]
    say(f"tokenizer tests (test-tokenizer-0 on {len(vocabs)} vocabularies, test-tokenizer-1-spm): "
        f"{passed}/{len(results)} passed{'; failed: ' + ', '.join(failed) if failed else ''}")
    return {"name": "tokenizers", "passed": passed, "total": len(results), "ok": not failed}


def run_llama_archs(bin_dir: Path, arch: str | None) -> dict:
    proc = sh([bin_dir / "test-llama-archs", "-s", "1"] + (["-a", arch] if arch else []))
    text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    m = re.search(r"Summary: all (\d+) test\(s\) passed", text)
    m2 = re.search(r"Summary: (\d+) test\(s\) executed, (\d+) failed", text)
    if m:
        passed = total = int(m.group(1))
    elif m2:
        total, passed = int(m2.group(1)), int(m2.group(1)) - int(m2.group(2))
    else:
        passed = total = 0
    ok = proc.returncode == 0 and total > 0 and passed == total
    say(f"test-llama-archs{' -a ' + arch if arch else ''} (every architecture, dense and MoE, CPU): {passed}/{total} passed"
        f"{'' if ok else ' (FAILED)'}")
    if not ok:
        say(text[-3000:])
    return {"name": "test-llama-archs", "passed": passed, "total": total, "ok": ok}


# -------------------------------------------------------------------------------------------- python

# tests that assert the exact tokens or text of a hub model no local model can stand in for
MODEL_SPECIFIC = {
    "test_real_model": "asserts Qwen3.5-0.8B's token ids",
    "test_real_llama": "asserts Qwen3.5-0.8B's exact completions",
    "test_real_llama_repeated_prompt_cache": "asserts Qwen3.5-0.8B's exact completion",
    "test_real_llama_embeddings": "needs bge-small-en-v1.5 (an embedding model)",
    "test_hybrid_model_prompt_cache_reset": "needs Falcon-H1 (a hybrid attention/SSM model)",
    "hybrid": "needs Falcon-H1 (a hybrid attention/SSM model)",
}


def run_python_suite(ci: bool) -> dict:
    from cna_local import vendor
    from cna_local.models import resolve_model
    from tiny_models import build_tiny_hf, smollm2_gguf_path, to_gguf

    sdist = vendor.sdist_root()
    work = Path(tempfile.mkdtemp(prefix="cna-upstream-py-"))
    mamba = to_gguf(build_tiny_hf("mamba", work / "mamba-hf"), "f32", work / "tiny-mamba.gguf")
    local = {
        "Qwen3.5-0.8B-Q8_0.gguf": str(resolve_model("default")),
        "tinyllamas/stories15M-q4_0.gguf": str(smollm2_gguf_path()),
        "mamba-130m-hf.Q2_K.gguf": str(mamba),
    }
    tests = work / "tests"
    shutil.copytree(sdist / "tests", tests)
    (work / "vendor").symlink_to(sdist / "vendor")  # the suite opens ./vendor/llama.cpp/models/... (not the sdist's
    # own llama_cpp/ package, which has no library: the installed one, patched, is what is tested)
    shutil.copy(ROOT / "tests" / "upstream_conftest.py", tests / "conftest.py")
    deselect = " or ".join(MODEL_SPECIFIC)
    env = dict(os.environ, CNA_UPSTREAM_MODELS=json.dumps(local), HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # the installed llama_cpp, with the patched library
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), "-k", f"not ({deselect})",
           "-o", "addopts=", "--rootdir", str(tests)]
    proc = subprocess.run(cmd, cwd=work, env=env, text=True, capture_output=True)
    text = proc.stdout + proc.stderr
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped|deselected)", text.splitlines()[-1] if text.strip() else "")}
    passed, failed = counts.get("passed", 0), counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    ok = proc.returncode == 0 and failed == 0 and passed > 0
    say(f"llama-cpp-python {vendor.LLAMA_CPP_PYTHON_VERSION} test suite on the patched library: {passed} passed, "
        f"{failed} failed, {counts.get('skipped', 0)} skipped, {counts.get('deselected', 0)} deselected "
        f"(hub-model specific: {'; '.join(f'{k}: {v}' for k, v in MODEL_SPECIFIC.items())})")
    if not ok:
        say(text[-4000:])
    shutil.rmtree(work, ignore_errors=True)
    return {"name": "llama-cpp-python tests", "passed": passed, "total": passed + failed, "ok": ok}


# --------------------------------------------------------------------------------------------- archs

def survey_archs(bin_dir: Path, out_md: Path | None) -> dict:
    """Probe every architecture's random model for the layers a mask reaches."""
    models = Path(tempfile.mkdtemp(prefix="cna-archs-"))
    proc = sh([bin_dir / "test-llama-archs", "-s", "1", "-o", models])
    files = sorted(models.glob("*.gguf"))
    if not files:
        raise SystemExit(f"test-llama-archs wrote no models:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rows = []
    for f in files:
        code = ("import json, sys\nfrom cna_local.runtime import SteeredLlama\n"
                "llm = SteeredLlama(sys.argv[1], n_ctx=64, n_threads=1)\n"
                "r = llm.steering.reachable().tolist()\n"
                "print(json.dumps({'arch': llm.steering.shape.arch, 'n_expert': llm.steering.shape.n_expert, 'reach': r}))\n")
        p = sh([sys.executable, "-c", code, f], env={**os.environ, "PYTHONPATH": ""}, timeout=300)
        if p.returncode != 0:
            rows.append({"file": f.name, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:160]})
            continue
        rows.append({"file": f.name, **json.loads(p.stdout.strip().splitlines()[-1])})
    shutil.rmtree(models, ignore_errors=True)
    full = [r for r in rows if "reach" in r and all(r["reach"])]
    partial = [r for r in rows if "reach" in r and any(r["reach"]) and not all(r["reach"])]
    none = [r for r in rows if "reach" in r and not any(r["reach"])]
    errors = [r for r in rows if "error" in r]
    say(f"architectures probed: {len(rows)} random models; every layer reachable: {len(full)}, "
        f"some layers: {len(partial)}, none: {len(none)}, would not load: {len(errors)}")
    if out_md is not None:
        out_md.write_text(_arch_markdown(full, partial, none, errors))
        say(f"wrote {out_md}")
    return {"name": "architecture survey", "passed": len(rows) - len(errors), "total": len(rows), "ok": True}


# From reading the pinned tree (src/models/*.cpp): architectures whose FFN never reaches build_ffn with a
# down weight of width n_ff (custom FFNs, experts only, no FFN). The survey checks those test-llama-archs
# builds; the rest are listed from the source.
SOURCE_NONE = ("apertus", "gemma3n", "graniteswitch", "kimi-k3", "rwkv6", "rwkv7", "bitnet", "dbrx", "olmoe", "gpt-oss",
               "minimax-01", "minimax-m2", "smallthinker", "llada-moe", "rnd1", "qwen3moe", "qwen3vlmoe", "phimoe",
               "maple", "mellum", "grovemoe", "mamba", "mamba2", "clip", "qwen2moe", "qwen3next", "qwen35moe",
               "qwen4exp", "deepseek4", "bailingmoe", "hunyuan-moe", "nemotron_h_moe")


def _arch_markdown(full, partial, none, errors) -> str:
    def names(rs):
        return ", ".join(sorted({r["file"].removesuffix(".gguf") for r in rs})) or "(none)"

    lines = [
        "# Which architectures a neuron mask reaches",
        "",
        "Made by `python tools/upstream_tests.py --only archs`: llama.cpp's own `test-llama-archs` writes a random",
        "model for every architecture of the pinned tree (dense and, where the architecture has one, MoE), and",
        "`SteeredLlama(...).steering.reachable()` probes each: llama.cpp builds a one-token graph with every layer",
        "steered and reports the layers whose FFN went through `build_ffn` with no experts in the layer.",
        "A mask that names another layer is refused when it is set, by architecture and layer.",
        "",
        f"**Every layer reachable** ({len(full)}): {names(full)}",
        "",
        f"**Some layers reachable** ({len(partial)}):",
        "",
        "| model | reachable layers | of |",
        "|---|---|---|",
    ]
    for r in sorted(partial, key=lambda r: r["file"]):
        idx = [i for i, ok in enumerate(r["reach"]) if ok]
        lines.append(f"| {r['file'].removesuffix('.gguf')} | {', '.join(map(str, idx))} | {len(r['reach'])} |")
    lines += ["", f"**No layer reachable** ({len(none)}; refused with the architecture's name): {names(none)}", ""]
    probed = {r["file"].rsplit("-", 1)[0] for r in full + partial + none + errors}
    unprobed = [a for a in SOURCE_NONE if a not in probed]
    lines += [f"**Not built by test-llama-archs; from reading the source, no dense FFN a mask can reach** "
              f"({len(unprobed)}): {', '.join(unprobed)}. The probe refuses them the same way when a model is loaded.",
              "",
              "Caveats from the source: in MoE layers with a shared expert built by `build_ffn` (DeepSeek-style),",
              "the layer still counts as unreachable (its output is not one dense FFN); `qwen` (v1) feeds `n_ff/2`",
              "values to its down projection, so no mask of width `n_ff` applies; `bitnet` normalizes before a down",
              "projection of its own. Architectures whose FFN width differs by layer (deci, openelm, gemma4, plamo3)",
              "are steered in the C API, but cna-local's mask file and attribution need one `n_ff`.", ""]
    if errors:
        lines += [f"**Not loadable by llama-cpp-python here** ({len(errors)}):", ""]
        lines += [f"- {r['file']}: {r['error']}" for r in errors]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ci", action="store_true", help="the subset CI runs: MUL, tokenizers, the Python suite")
    parser.add_argument("--only", choices=["c", "python", "archs"], default=None)
    parser.add_argument("--full", action="store_true", help="test-backend-ops for every op, not only MUL (long)")
    parser.add_argument("--arch-doc", type=Path, default=ROOT / "docs" / "architectures.md")
    args = parser.parse_args()

    started = time.perf_counter()
    results = []
    if args.only in (None, "c", "archs"):
        base = patched_tree()
        targets = C_TARGETS if not args.ci else ["test-backend-ops", "test-tokenizer-0", "test-tokenizer-1-spm"]
        bin_dir = build(base, targets)
        if args.only in (None, "c"):
            results.append(run_backend_ops(bin_dir, None if args.full else "MUL"))
            results.append(run_tokenizers(base, bin_dir))
            if not args.ci:
                results.append(run_llama_archs(bin_dir, None))
        if args.only in (None, "archs") and not args.ci:
            results.append(survey_archs(bin_dir, args.arch_doc))
    if args.only in (None, "python"):
        results.append(run_python_suite(args.ci))
    ok = all(r["ok"] for r in results)
    say(f"\nupstream suites: {'all passed' if ok else 'FAILURES'} in {time.perf_counter() - started:.0f} s")
    for r in results:
        say(f"  {r['name']:40s} {r['passed']}/{r['total']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
