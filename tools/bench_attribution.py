"""Benchmark attribution: load time (with and without the dequantized-weights cache), activation
time and peak memory for N positive + N negative prompts.

Not a test. Default model: the named model `default` (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF,
see cna_local.models), fetched once.

    python tools/bench_attribution.py                    # the 0.5B model, 100 + 100 prompts
    python tools/bench_attribution.py --model DIR_OR_GGUF --n 20

Each phase runs in a fresh subprocess so its peak RSS (resource.getrusage) is its own.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cna_local.models import resolve_model  # noqa: E402

# -- phases, each run in its own process


def _phase_load(model: str, use_cache: bool) -> dict:
    from cna_local.loading import load_model

    t0 = time.perf_counter()
    loaded = load_model(model, use_cache=use_cache)
    return {"seconds": time.perf_counter() - t0, "n_layer": loaded.n_layer, "n_ff": loaded.n_ff}


def _phase_attribute(model: str, n: int, batch_size: int, universal_filter: bool) -> dict:
    from cna_local.attribution import AttributionOptions, attribute
    from cna_local.loading import load_model
    from cna_local.prompts import PromptSet, load_bundled

    t0 = time.perf_counter()
    loaded = load_model(model)
    load_seconds = time.perf_counter() - t0
    pos, neg = load_bundled("harmful_train"), load_bundled("benign_train")
    pos, neg = PromptSet(pos.name, pos.prompts[:n]), PromptSet(neg.name, neg.prompts[:n])
    result = attribute(loaded, pos, neg, AttributionOptions(batch_size=batch_size, universal_filter=universal_filter, progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        size = result.mask.save(Path(tmp) / "mask.gguf").stat().st_size
    return {
        "load_seconds": load_seconds, "n_prompts": len(pos) + len(neg), **result.seconds,
        "n_neurons": len(result.mask), "mask_bytes": size,
        "n_universal": result.n_universal, "n_universal_removed": result.n_universal_removed,
        "per_layer": result.mask.per_layer_counts(),
    }


def _run_phase(name: str, **kwargs) -> dict:
    """Run one phase in a subprocess and add its wall time and peak RSS."""
    code = (f"import json, resource, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import bench_attribution as b; r = b._phase_{name}(**json.loads(sys.argv[1])); "
            "r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; print(json.dumps(r))")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - t0
    return result


@click.command()
@click.option("--model", default=None, help="HF directory, .gguf or named model (default: `default`, the 0.5B Qwen2.5-Coder GGUF).")
@click.option("--n", default=100, show_default=True, help="Prompts per side.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--universal-filter/--no-universal-filter", default=False, show_default=True,
              help="Also time the universal-neuron filter over the bundled contrasts.")
@click.option("--skip-cold", is_flag=True, help="Do not clear the dequantized cache to time a cold load.")
def main(model, n, batch_size, universal_filter, skip_cold):
    from cna_local.loading import _gguf_cache_entry

    model_path = resolve_model(model or "default")
    report = {"model": str(model_path), "model_bytes": model_path.stat().st_size,
              "python": platform.python_version(), "machine": platform.machine()}
    if model_path.suffix == ".gguf":
        entry = _gguf_cache_entry(model_path)
        if not skip_cold and entry.exists():
            shutil.rmtree(entry)
        report["load_no_cache"] = _run_phase("load", model=str(model_path), use_cache=False)
        report["load_fill_cache"] = _run_phase("load", model=str(model_path), use_cache=True)
        report["load_from_cache"] = _run_phase("load", model=str(model_path), use_cache=True)
    report["attribute"] = _run_phase("attribute", model=str(model_path), n=n, batch_size=batch_size,
                                     universal_filter=universal_filter)
    click.echo(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
