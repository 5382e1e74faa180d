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


def run_attribute(model: Path, backend: str, cache: Path, out: Path, n: int | None) -> dict:
    """One `cna-local attribute` in a child process: its summary, wall time and peak RSS."""
    args = [sys.executable, "-m", "cna_local.cli", "attribute", "--model", str(model), "--backend", backend,
            "--multiplier", "-1.5", "--out", str(out), "--json", "-q"]
    if n is not None:
        prompts = out.parent / "prompts"
        prompts.mkdir(exist_ok=True)
        from cna_local.prompts import load_bundled

        for name, side in (("harmful_train", "pos"), ("benign_train", "neg")):
            (prompts / f"{side}.txt").write_text("\n".join(load_bundled(name).prompts[:n]) + "\n")
        args += ["--positive", str(prompts / "pos.txt"), "--negative", str(prompts / "neg.txt")]
    env = {**os.environ, "CNA_LOCAL_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{backend} attribution failed:\n{stderr[-3000:]}")
    summary = json.loads(stdout)
    return {"summary": summary, "wall_seconds": round(wall, 1)}


def measured(model: Path, backend: str, cache: Path, out: Path, n: int | None) -> dict:
    """run_attribute in a fresh intermediate process, whose RUSAGE_CHILDREN peak is then that one command's."""
    code = ("import json, os, sys, subprocess; sys.path.insert(0, sys.argv[1]); "
            "import bench_attribution as b; from pathlib import Path; "
            "r = b.run_attribute(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]), "
            "None if sys.argv[6] == '-' else int(sys.argv[6])); "
            "import resource; r['peak_rss_mb'] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
            "print(json.dumps(r))")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(model), backend, str(cache),
                           str(out), "-" if n is None else str(n)], capture_output=True, text=True)
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
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(model, backends, n, json_out):
    model_path = resolve_model(model)
    backends = backends.split(",")
    report = {"model": str(model_path), "model_bytes": model_path.stat().st_size, "cpu": _cpu_name(),
              "cores": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        masks = {}
        for backend in backends:
            cache = tmp / f"cache-{backend}"  # each backend starts from its own empty cache
            for state in ("cold", "warm"):
                out = tmp / f"{backend}-{state}.gguf"
                r = measured(model_path, backend, cache, out, n)
                s = r["summary"]
                row = {"backend": backend, "cache": state, "wall_seconds": r["wall_seconds"],
                       "peak_rss_mb": r["peak_rss_mb"], "seconds": s["seconds"], "n_neurons": s["n_neurons"],
                       "prompts": s["selection"]["positive"]["n"] + s["selection"]["negative"]["n"]}
                report["runs"].append(row)
                masks[backend] = out
                click.echo(f"{backend:>5} {state}: {row['wall_seconds']:7.1f} s, peak RSS {row['peak_rss_mb'] / 1024:5.2f} GB, "
                           f"{row['n_neurons']} neurons ({s['seconds']})", err=True)
        if len(masks) == 2:
            report["jaccard"] = round(jaccard(*masks.values()), 4)
    gb = report["model_bytes"] / 1e9
    click.echo(f"\n{Path(report['model']).name} ({gb:.2f} GB), {report['cpu']}, {report['cores']} cores\n")
    click.echo("| Backend | Cache | Wall time | Peak RSS | Neurons |")
    click.echo("|---|---|---|---|---|")
    for row in report["runs"]:
        click.echo(f"| {row['backend']} | {row['cache']} | {row['wall_seconds']:.0f} s | "
                   f"{row['peak_rss_mb'] / 1024:.2f} GB | {row['n_neurons']} |")
    if "jaccard" in report:
        click.echo(f"\nJaccard of the two backends' masks: {report['jaccard']}")
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
