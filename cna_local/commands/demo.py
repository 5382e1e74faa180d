"""`cna-local demo`: the whole job in one command on the default model.

attribute (PyTorch, bundled discovery sets) -> mask file -> evaluate baseline against steered in the
patched llama.cpp (bundled held-out sets) -> table, JSON, plot, and a few generations side by side.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import click

from ..errors import CnaLocalError
from ..scoring import SCORES
from .eval import MultiplierList


@click.command()
@click.option("--model", "model_spec", default="default", show_default=True, metavar="MODEL",
              help="A named model (default, qwen-coder-1.5b, smollm2) or a .gguf file.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("cna-demo"),
              show_default=True, help="Where the mask, JSON report and plot go.")
@click.option("--multipliers", type=MultiplierList(), default=None, metavar="LIST",
              help="Strengths to evaluate.  [default: 1, 0 and the mask's default multiplier]")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Evaluate only the first N prompts of each held-out set (faster, noisier).")
@click.option("--score", "score_method", type=click.Choice(SCORES), default="selective",
              show_default=True, help="How neurons are ranked (see `cna-local attribute --help`).")
@click.option("--examples", type=click.IntRange(min=0), default=3, show_default=True,
              help="Harmful prompts to show side by side, baseline against steered.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def demo(model_spec, out_dir, multipliers, limit, score_method, examples, quiet):
    """Find the refusal neurons of a model and show what steering them does.

    \b
    Runs, with the product's defaults:
      1. cna-local attribute --model MODEL --out OUT_DIR/refusal.mask.gguf
      2. cna-local eval --model MODEL --mask OUT_DIR/refusal.mask.gguf
             --json OUT_DIR/eval.json --plot OUT_DIR/eval.png
    then prints a few held-out harmful prompts with the unsteered and the
    steered answer. The first run also fetches the model and caches its
    dequantized weights.
    """
    try:
        _run(model_spec, out_dir, multipliers, limit, score_method, examples, not quiet)
    except CnaLocalError as exc:
        raise click.ClickException(str(exc)) from exc


def _run(model_spec, out_dir: Path, multipliers, limit, score_method: str, examples: int, progress: bool) -> None:
    from ..attribution import AttributionOptions, attribute
    from ..evaluation import report
    from ..evaluation.runner import default_multipliers, evaluate
    from ..loading import load_model
    from ..models import resolve_model
    from ..prompts import load_bundled

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    say = lambda msg: click.echo(msg, err=True)  # noqa: E731

    model_path = resolve_model(model_spec, progress=say)
    if model_path.suffix.lower() != ".gguf":
        raise CnaLocalError(f"the demo runs a GGUF model in llama.cpp; {model_path} is not a .gguf file.")

    say(f"[1/3] attribution on {model_path.name} (bundled harmful_train vs benign_train)")
    t0 = time.perf_counter()
    loaded = load_model(model_path, progress=progress)
    options = AttributionOptions(score=score_method, progress=progress)
    result = attribute(loaded, load_bundled("harmful_train"), load_bundled("benign_train"), options)
    mask = result.mask
    mask_path = mask.save(out_dir / "refusal.mask.gguf")
    del loaded  # free the torch copy before llama.cpp loads the model
    attribution_s = time.perf_counter() - t0
    say(f"      {len(mask)} neurons in {len(mask.per_layer_counts())} layers -> {mask_path} "
        f"({mask_path.stat().st_size / 1024:.1f} KB, {attribution_s:.0f} s)")

    values = multipliers or default_multipliers(mask)
    say(f"[2/3] evaluation at multipliers {', '.join(f'{m:g}' for m in values)} on the held-out sets")
    t0 = time.perf_counter()
    res = evaluate(model_path, mask, values, limit=limit, progress=progress)
    eval_s = time.perf_counter() - t0
    report.write_json(res, out_dir / "eval.json")
    report.plot(res, out_dir / "eval.png", title=f"{model_path.name}: {len(mask)} neurons")

    click.echo(report.format_table(res))
    click.echo("")
    click.echo(f"mask: {mask_path}   report: {out_dir / 'eval.json'}   plot: {out_dir / 'eval.png'}")

    if examples:
        say("[3/3] generations side by side (held-out harmful prompts)")
        _side_by_side(res, float(mask.multiplier), examples)
    total = time.perf_counter() - started
    click.echo(f"\nwall time: {total:.0f} s (attribution {attribution_s:.0f} s, evaluation {eval_s:.0f} s)")
    (out_dir / "demo.json").write_text(json.dumps(
        {"model": str(model_path), "mask": str(mask_path), "seconds": {"attribution": attribution_s, "evaluation": eval_s, "total": total}},
        indent=2))


def _side_by_side(res, steered_multiplier: float, n: int) -> None:
    base = res.baseline.harmful
    try:
        steered = res.row(steered_multiplier).harmful
    except KeyError:
        steered = next(r for r in res.rows if not r.baseline).harmful
    # prefer prompts whose refusal the steering changed: that is what the demo is about
    pairs = sorted(zip(base, steered), key=lambda p: p[0].get("refused") == p[1].get("refused"))[:n]
    width = 38
    for b, s in pairs:
        click.echo("")
        click.echo(f"> {b['prompt']}")
        left = textwrap.wrap(_oneline(b.get("answer", "")), width)[:6] or [""]
        right = textwrap.wrap(_oneline(s.get("answer", "")), width)[:6] or [""]
        click.echo(f"  {'unsteered (m=1)':<{width}} | steered (m={steered_multiplier:g})")
        for i in range(max(len(left), len(right))):
            click.echo(f"  {left[i] if i < len(left) else '':<{width}} | {right[i] if i < len(right) else ''}")


def _oneline(text: str) -> str:
    return " ".join(str(text).split())
