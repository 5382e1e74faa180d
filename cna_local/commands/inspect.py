"""`cna-local inspect`: show what a mask file holds."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from ..errors import CnaLocalError


def mask_report(mask, top: int) -> dict:
    order = np.argsort(-np.abs(mask.scores), kind="stable")[:top]
    return {
        "name": mask.meta.get("name", ""),
        "format_version": mask.meta.get("version"),
        "tool_version": mask.meta.get("tool_version"),
        "model": {"name": mask.model_name, "arch": mask.arch, "n_layer": mask.n_layer, "n_ff": mask.n_ff,
                  "n_embd": mask.n_embd, "fingerprint": mask.fingerprint},
        "n_neurons": len(mask),
        "multiplier": mask.multiplier,
        "schedule": mask.schedule,
        "calibration": mask.meta.get("calibration"),
        "gate": None if mask.gate is None else {**mask.gate.record(),
                                                "own_neurons": mask.gate.own,
                                                "n_read": len(mask.gate.weights),
                                                "layers_read": sorted({int(x) for x in mask.gate.layers}) if mask.gate.own else None},
        "static_multiplier": mask.static_multiplier,
        "per_neuron_scales": mask.scales is not None,
        "prompts_sha256": mask.meta.get("prompts_sha256", ""),
        "selection": mask.meta.get("selection", {}),
        "per_layer": {str(k): v for k, v in mask.per_layer_counts().items()},
        "top": [{"layer": int(mask.layers[i]), "neuron": int(mask.neurons[i]), "score": float(mask.scores[i])}
                for i in order],
    }


def _selection_lines(sel: dict) -> list[str]:
    asked = sel.get("top_k_asked", sel.get("top_k"))
    notes = [f"{asked} asked for"] if asked != sel.get("top_k") else []
    if sel.get("top_fraction"):
        notes.append(f"fraction {sel['top_fraction']:g}")
    detail = ", ".join(notes) + ("; the rest scored 0" if asked != sel.get("top_k") else "")
    lines = [f"score       {sel.get('score')}, top {sel.get('top_k')} of all MLP neurons"
             + (f" ({detail})" if detail else "")
             + (f", layers {sel['layer_start']}:{sel['layer_end']} (end exclusive)" if "layer_start" in sel else "")]
    if "backend" in sel:  # masks made before the llama backend existed came from torch
        lines.append(f"activations {'inside llama.cpp (llama backend)' if sel['backend'] == 'llama' else 'in PyTorch (torch backend)'}")
    for side in ("positive", "negative"):
        if side in sel:
            lines.append(f"{side:<11} {sel[side]['n']} prompts from {sel[side]['name']} (sha256 {sel[side]['sha256'][:12]})")
    uf = sel.get("universal_filter") or {}
    if uf.get("enabled"):
        lines.append(f"universal   filter on: {uf['n_universal']} neurons in the top set of >= {uf['threshold']:.0%} "
                     f"of {len(uf['contrasts'])} contrasts, {uf['removed']} removed from the selection")
    elif uf:
        lines.append("universal   filter off")
    return lines


@click.command()
@click.argument("mask_path", metavar="MASK", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True, help="How many top neurons to list.")
def inspect(mask_path: Path, as_json: bool, top: int) -> None:
    """Show a mask file's model, selection settings, neurons per layer and top neurons."""
    from ..maskfile import NeuronMask

    try:
        mask = NeuronMask.load(mask_path)
    except CnaLocalError as exc:
        raise click.ClickException(str(exc)) from exc
    report = mask_report(mask, top)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    m, sel = report["model"], report["selection"]
    click.echo(f"{mask_path}: neuron mask v{report['format_version']} ({report['name']})")
    click.echo(f"  model       {m['name']} ({m['arch']}, {m['n_layer']} layers, n_ff {m['n_ff']}, n_embd {m['n_embd']})")
    click.echo(f"  fingerprint {m['fingerprint']}")
    click.echo(f"  neurons     {report['n_neurons']}, default multiplier {report['multiplier']:g}"
               + (" (per-neuron scales stored)" if report["per_neuron_scales"] else "")
               + (f", schedule {report['schedule']}" if report["schedule"] != "all" else ""))
    cal = report["calibration"]
    if cal:
        click.echo(f"  calibrated  {cal.get('rule', '')}: multiplier {cal.get('chosen')} on {cal.get('n_prompts')} "
                   f"calibration prompts (quality {cal.get('quality')}, KL {cal.get('kl')})")
    g = report["gate"]
    if g:
        oof = g.get("out_of_fold") or {}
        on = (f"{g['n_read']} neurons of its own (layers {g['layers_read'][0]}-{g['layers_read'][-1]})" if g["own_neurons"]
              else "the mask's neurons")
        click.echo(f"  gate        {g.get('method')} on {on}, threshold {g['threshold']:.4g}: fired on "
                   f"{oof.get('tpr', 0):.0%} of positive and {oof.get('fpr', 0):.0%} of negative prompts out of fold "
                   f"(cap {g.get('fpr_target', 0):.0%}); runtimes steer only prompts it fires on")
        if g.get("threshold_strengthen") is not None:
            st = (g.get("strengthen") or {}).get("out_of_fold") or {}
            click.echo(f"              above multiplier 1 (strengthening) threshold {g['threshold_strengthen']:.4g}: fired on "
                       f"{st.get('tpr', 0):.0%} of positive and {st.get('fpr', 0):.0%} of negative prompts out of fold")
        if report["static_multiplier"] is not None:
            click.echo(f"              multiplier {report['multiplier']:g} through the gate, "
                       f"{report['static_multiplier']:g} on every prompt (gate off)")
    if sel:
        for line in _selection_lines(sel):
            click.echo(f"  {line}")
    click.echo(f"  made by     cna-local {report['tool_version']}")
    click.echo("  neurons per layer: " + ", ".join(f"{k}:{v}" for k, v in report["per_layer"].items()))
    if report["top"]:
        click.echo(f"  top {len(report['top'])} by |score|:")
        for row in report["top"]:
            click.echo(f"    layer {row['layer']:>3}  neuron {row['neuron']:>6}  score {row['score']:+.5g}")
