"""Benchmark attribution with both backends: wall time and peak RSS of `cna-local attribute`, from a cold
cache and a warm one, and how far the two backends' masks agree.

Not a test. Each run is the real command in its own process (`cna-local attribute --json`), timed from
outside; peak RSS is that process's own (getrusage in a fresh parent). The multiplier is given, so no calibration runs: the
figures are the attribution's alone, 120 + 120 bundled prompts by default.

  cold: an empty cna-local cache (no dequantized float32 weights for torch, no cached fingerprint);
        the GGUF itself is in the OS page cache either way (dropping it needs root).
  warm: the same cache again, filled by the cold run.

    python tools/bench_attribution.py                           # the default 0.5B model, both backends
    python tools/bench_attribution.py --model qwen-coder-1.5b --json bench.json
    python tools/bench_attribution.py --lib native=/tmp/build-native/site/cna_local/lib   # + another llama.cpp build

`--q5-0-kept` adds a llama row with the model's Q5_0 weights kept as Q5_0 (the capture holds them as F16 on
x86-64 with AVX2: cna_local/capture.py, Q5_0_AS_F16). `--lib LABEL=DIR` adds a llama row run on the patched
libraries in DIR (LLAMA_CPP_LIB_PATH), e.g. the single AVX2 library of a `-DCNA_CPU_VARIANTS=OFF` build, or a `-DGGML_NATIVE=ON` one made for this machine
only (it may not run on another), side by side with the installed one; each row records the CPU features of the backend it loaded (llama_print_system_info).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cna_local.models import resolve_model  # noqa: E402


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _lib_env(lib: Path | None, extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}
    if lib is not None:
        env["LLAMA_CPP_LIB_PATH"] = str(lib)
    return env


def system_info(lib: Path | None) -> str:
    """The CPU features the llama.cpp build in use was compiled for, as llama.cpp prints them."""
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_lib_env(lib))
    return proc.stdout.strip() if proc.returncode == 0 else f"unknown ({proc.stderr.strip()[-200:]})"


def run_attribute(model: Path, backend: str, cache: Path, out: Path, n: int | None, lib: Path | None = None,
                  score: str = "selective", extra_env: dict | None = None) -> dict:
    """One `cna-local attribute` in a child process: its summary, wall time and peak RSS."""
    args = [sys.executable, "-m", "cna_local.cli", "attribute", "--model", str(model), "--backend", backend,
            "--multiplier", "-1.5", "--score", score, "--out", str(out), "--json", "-q"]
    if n is not None:
        prompts = out.parent / "prompts"
        prompts.mkdir(exist_ok=True)
        from cna_local.prompts import load_bundled

        for name, side in (("harmful_train", "pos"), ("benign_train", "neg")):
            (prompts / f"{side}.txt").write_text("\n".join(load_bundled(name).prompts[:n]) + "\n")
        args += ["--positive", str(prompts / "pos.txt"), "--negative", str(prompts / "neg.txt")]
    env = {**_lib_env(lib, extra_env), "CNA_LOCAL_CACHE": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{backend} attribution failed:\n{stderr[-3000:]}")
    summary = json.loads(stdout)
    return {"summary": summary, "wall_seconds": round(wall, 1)}


def measured(model: Path, backend: str, cache: Path, out: Path, n: int | None, lib: Path | None = None,
             score: str = "selective", extra_env: dict | None = None) -> dict:
    """run_attribute in a fresh intermediate process, whose RUSAGE_CHILDREN peak is then that one command's."""
    code = ("import json, os, sys, subprocess; sys.path.insert(0, sys.argv[1]); "
            "import bench_attribution as b; from pathlib import Path; "
            "r = b.run_attribute(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]), "
            "None if sys.argv[6] == '-' else int(sys.argv[6]), Path(sys.argv[7]) if sys.argv[7] != '-' else None, sys.argv[8], "
            "json.loads(sys.argv[9])); "
            "import resource; r['peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
            "print(json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(model), backend, str(cache),
                           str(out), "-" if n is None else str(n), "-" if lib is None else str(lib), score,
                           json.dumps(extra_env or {})],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def jaccard(a_path: Path, b_path: Path) -> float:
    from cna_local.maskfile import NeuronMask

    a, b = NeuronMask.load(a_path), NeuronMask.load(b_path)
    sa = set(zip(a.layers.tolist(), a.neurons.tolist()))
    sb = set(zip(b.layers.tolist(), b.neurons.tolist()))
    return len(sa & sb) / len(sa | sb)


@click.command()
@click.option("--model", default="default", show_default=True, help="A .gguf file or a named model.")
@click.option("--backends", default="llama,torch", show_default=True)
@click.option("--n", type=int, default=None, help="Prompts per side (default: the bundled sets whole, 120 + 120).")
@click.option("--lib", "libs", multiple=True, metavar="LABEL=DIR",
              help="Also run the llama backend on the patched libraries in DIR, as row llama[LABEL]. Repeatable.")
@click.option("--score", default="selective", show_default=True,
              help="The attribute command's --score (delta for tools/synth_gguf.py's random-weight stand-ins).")
@click.option("--q5-0-kept", is_flag=True,
              help="Also run the llama backend with its Q5_0 weights kept as Q5_0 (GGML_CPU_Q5_0_AS_F16=0), "
                   "as row llama[Q5_0 kept]: what holding them as F16 gains on this CPU.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(model, backends, n, libs, score, q5_0_kept, json_out):
    model_path = resolve_model(model)
    runs = [(b, b, None, None) for b in backends.split(",")]  # (row label, backend, library directory, environment)
    if q5_0_kept:
        runs.insert(1 if runs[0][1] == "llama" else 0, ("llama[Q5_0 kept]", "llama", None, {"GGML_CPU_Q5_0_AS_F16": "0"}))
    for spec in libs:
        label, sep, directory = spec.partition("=")
        if not sep or not any(Path(directory).glob("libllama*")):
            raise click.BadParameter(f"{spec!r}: expected LABEL=DIR with DIR holding a patched libllama", param_hint="--lib")
        runs.insert(1 if runs[0][1] == "llama" else 0, (f"llama[{label}]", "llama", Path(directory).resolve(), None))
    report = {"model": str(model_path), "model_bytes": model_path.stat().st_size, "cpu": _cpu_name(), "score": score,
              "cores": os.cpu_count(), "runs": [],
              "builds": {label: system_info(lib) for label, backend, lib, _ in runs if backend == "llama"}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        masks = {}
        for i, (label, backend, lib, extra_env) in enumerate(runs):
            cache = tmp / f"cache-{i}"  # each row starts from its own empty cache
            for state in ("cold", "warm"):
                out = tmp / f"{i}-{state}.gguf"
                r = measured(model_path, backend, cache, out, n, lib, score, extra_env)
                s = r["summary"]
                row = {"backend": label, "cache": state, "wall_seconds": r["wall_seconds"],
                       "peak_rss_mb": r["peak_rss_mb"], "seconds": s["seconds"], "n_neurons": s["n_neurons"],
                       "prompts": s["selection"]["positive"]["n"] + s["selection"]["negative"]["n"]}
                report["runs"].append(row)
                masks[label] = out
                click.echo(f"{label:>5} {state}: {row['wall_seconds']:7.1f} s, peak RSS {rss_gb(row):5.2f} GB, "
                           f"{row['n_neurons']} neurons ({s['seconds']})", err=True)
        if "llama" in masks and "torch" in masks:
            report["jaccard"] = round(jaccard(masks["llama"], masks["torch"]), 4)
        report["jaccard_to_llama"] = {label: round(jaccard(masks["llama"], path), 4)
                                      for label, path in masks.items() if label.startswith("llama[") and "llama" in masks}
        report["jaccard_to_torch"] = {label: round(jaccard(masks["torch"], path), 4)
                                      for label, path in masks.items() if label.startswith("llama[") and "torch" in masks}
    gb = report["model_bytes"] / 1e9
    click.echo(f"\n{Path(report['model']).name} ({gb:.2f} GB), {report['cpu']}, {report['cores']} cores")
    for label, info in report["builds"].items():
        click.echo(f"  {label}: {info}")
    click.echo()
    click.echo("| Backend | Cache | Wall time | Peak RSS | over the GGUF | Neurons |")
    click.echo("|---|---|---|---|---|---|")
    for row in report["runs"]:
        click.echo(f"| {row['backend']} | {row['cache']} | {row['wall_seconds']:.0f} s | "
                   f"{rss_gb(row):.2f} GB | {rss_gb(row) - gb:+.2f} GB | {row['n_neurons']} |")
    if "jaccard" in report:
        click.echo(f"\nJaccard of the two backends' masks: {report['jaccard']}")
    for label, value in report["jaccard_to_llama"].items():
        click.echo(f"Jaccard of {label}'s mask to the installed build's: {value}")
    for label, value in report["jaccard_to_torch"].items():
        click.echo(f"Jaccard of {label}'s mask to torch's: {value}")
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))


def rss_gb(row: dict) -> float:
    """Peak RSS in GB (10^9 bytes, like the GGUF's size): ru_maxrss is in KiB, peak_rss_mb in MiB."""
    return row["peak_rss_mb"] * 2**20 / 1e9


if __name__ == "__main__":
    main()
