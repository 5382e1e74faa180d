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
from .eval import DEFAULT_BATCH, MultiplierList

REFERENCE_MULTIPLIERS = (0.0, -1.0)
"""The reference implementation's ablation and inversion."""


@click.command()
@click.option("--model", "model_spec", default="default", show_default=True, metavar="MODEL",
              help="A named model (default, qwen-coder-1.5b, smollm2) or a .gguf file.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("cna-demo"),
              show_default=True, help="Where the masks, JSON report and plots go.")
@click.option("--multipliers", type=MultiplierList(), default=None, metavar="LIST",
              help="Strengths to evaluate the product's mask at.  [default: 1, 0 and its calibrated multiplier]")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Evaluate only the first N prompts of each held-out set (faster, noisier).")
@click.option("--score", "score_method", type=click.Choice(SCORES), default="selective",
              show_default=True, help="How neurons are ranked (see `cna-local attribute --help`).")
@click.option("--compare/--no-compare", default=True, show_default=True,
              help="Also make the reference implementation's mask (--score delta --layers 2:, top 0.1%) and evaluate "
                   f"it beside the product's, at {', '.join(f'{m:g}' for m in REFERENCE_MULTIPLIERS)}.")
@click.option("--batch-size", type=click.IntRange(min=1, max=64), default=DEFAULT_BATCH, show_default=True, metavar="N",
              help="Prompts decoded together in the evaluation (1: one at a time).")
@click.option("--examples", type=click.IntRange(min=0), default=3, show_default=True,
              help="Harmful prompts to show side by side, baseline against steered.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def demo(model_spec, out_dir, multipliers, limit, score_method, compare, batch_size, examples, quiet):
    """Find the refusal neurons of a model and show what steering them does.

    \b
    Runs, with the product's defaults:
      1. cna-local attribute --model MODEL --out OUT_DIR/refusal.mask.gguf
         (the default multiplier calibrated on held-out discovery prompts)
      2. with --compare: cna-local attribute --model MODEL --score delta
             --layers 2: --multiplier 0 --out OUT_DIR/reference.mask.gguf
      3. cna-local eval --model MODEL --mask OUT_DIR/refusal.mask.gguf
             [--mask OUT_DIR/reference.mask.gguf] --json OUT_DIR/eval.json
             --plot OUT_DIR/eval.png --frontier OUT_DIR/frontier.png
    then prints a few held-out harmful prompts with the unsteered and the
    steered answer. The first run also fetches the model and caches its
    dequantized weights.
    """
    try:
        _run(model_spec, out_dir, multipliers, limit, score_method, compare, batch_size, examples, not quiet)
    except CnaLocalError as exc:
        raise click.ClickException(str(exc)) from exc


def _run(model_spec, out_dir: Path, multipliers, limit, score_method: str, compare: bool, batch_size: int,
         examples: int, progress: bool) -> None:
    from ..evaluation import report
    from ..evaluation.runner import default_multipliers, evaluate_masks
    from ..maskfile import NeuronMask
    from ..models import resolve_model
    from .attribute import CALIBRATION_PROMPTS, DEFAULT_NEGATIVE, DEFAULT_POSITIVE, run_attribute

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    say = lambda msg: click.echo(msg, err=True)  # noqa: E731

    model_path = resolve_model(model_spec, progress=say)
    if model_path.suffix.lower() != ".gguf":
        raise CnaLocalError(f"the demo runs a GGUF model in llama.cpp; {model_path} is not a .gguf file.")

    steps = 3 + compare
    say(f"[1/{steps}] attribution on {model_path.name} ({DEFAULT_POSITIVE} vs {DEFAULT_NEGATIVE}), multiplier calibrated")
    t0 = time.perf_counter()
    common = dict(model_spec=str(model_path), positive=DEFAULT_POSITIVE, negative=DEFAULT_NEGATIVE, field="prompt",
                  top_fraction=None, top_k=None, universal_filter=False, universal_threshold=0.8, batch_size=8,
                  chat_template=True, use_cache=True, progress=progress)
    made = run_attribute(**common, score_method=score_method, layers=None, multiplier=None, name=None,
                         out=out_dir / "refusal.mask.gguf", calibration_prompts=CALIBRATION_PROMPTS)
    mask = NeuronMask.load(made["out"])
    say(f"      {len(mask)} neurons in {len(mask.per_layer_counts())} layers, multiplier {mask.multiplier:g} -> {made['out']} "
        f"({made['file_bytes'] / 1024:.1f} KB, {time.perf_counter() - t0:.0f} s)")
    masks, values = [mask], [multipliers or default_multipliers(mask)]
    if compare:
        say(f"[2/{steps}] the reference's mask: score delta, layers 2:, top 0.1%")
        ref = run_attribute(**common, score_method="delta", layers="2:", multiplier=0.0, gate=False,  # as it ships
                            out=out_dir / "reference.mask.gguf", name="reference (delta, layers 2:, 0.1%)")
        masks.append(NeuronMask.load(ref["out"]))
        values.append(list(REFERENCE_MULTIPLIERS))
        say(f"      {ref['n_neurons']} neurons -> {ref['out']}")
    attribution_s = time.perf_counter() - t0

    say(f"[{2 + compare}/{steps}] evaluation on the held-out sets, {batch_size} prompts at a time: "
        + "; ".join(f"{report.mask_label_of(m)} at {', '.join(f'{v:g}' for v in vs)}" for m, vs in zip(masks, values)))
    t0 = time.perf_counter()
    results = evaluate_masks(model_path, masks, values, limit=limit, batch_size=batch_size, progress=progress)
    eval_s = time.perf_counter() - t0
    res = results[0]
    report.write_json(res, out_dir / "eval.json")
    report.plot(res, out_dir / "eval.png", title=f"{model_path.name}: {len(mask)} neurons")
    report.plot_frontier(results, out_dir / "frontier.png")
    if compare:
        report.write_comparison_json(results, out_dir / "compare.json")

    click.echo(report.format_comparison(results) if compare else report.format_table(res))
    click.echo("")
    click.echo(f"mask: {out_dir / 'refusal.mask.gguf'}   report: {out_dir / 'eval.json'}   plots: {out_dir / 'eval.png'}, "
               f"{out_dir / 'frontier.png'}")

    if examples:
        say(f"[{steps}/{steps}] generations side by side (held-out harmful prompts)")
        _side_by_side(res, float(mask.multiplier), examples)
    total = time.perf_counter() - started
    click.echo(f"\nwall time: {total:.0f} s (attribution {attribution_s:.0f} s, evaluation {eval_s:.0f} s)")
    (out_dir / "demo.json").write_text(json.dumps(
        {"model": str(model_path), "mask": str(out_dir / "refusal.mask.gguf"), "batch_size": batch_size,
         "compare": compare, "seconds": {"attribution": attribution_s, "evaluation": eval_s, "total": total}},
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
