"""Study (not a test): how well gate detectors separate held-out positive from negative prompts, offline.

The gate a mask carries is a diagonal linear discriminant on the mask's own neurons at the last prompt
token (cna_local/gate.py). This asks whether another neuron set would detect better: the top k neurons of
every layer by |t| (mean difference over pooled standard deviation). Everything is read once with the
llama backend's capture (no generation), so a detector is judged in seconds:

  * out of fold on the discovery sets (5 stratified folds; the neurons AND the direction chosen inside each
    fold), which is where `attribute` chooses the threshold for --gate-fpr;
  * on the held-out sets, with that threshold and the direction and neurons fitted on all discovery prompts.

With --baseline-eval (an `eval --json` file of the same held-out sets) it also counts the held-out harmful
prompts the unsteered model refuses and the gate misses (no weakening strength can change those), and the
ones it answers and the gate catches (the only ones strengthening can change).

Besides neurons, detectors on the residual stream after a layer (--residual-layers): the same diagonal
discriminant over that layer's n_embd values at the last token, the classic linear probe for a behaviour.

    python tools/gate_detectors.py --model qwen-coder-1.5b --mask MASK.gguf --baseline-eval EVAL.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cna_local.gate import auc, choose_threshold, direction, out_of_fold_scores, row_columns, top_by_t  # noqa: E402
from cna_local.evaluation.report import baseline_row  # noqa: E402


def top_t(k: int):
    return lambda pos, neg: top_by_t(pos, neg, k)


def judge(select, pos, neg, held_pos, held_neg, fprs, refused, folds=5, seed=0) -> dict:
    s_pos, s_neg, _ = out_of_fold_scores(pos, neg, "lda", folds, seed, select)
    cols = select(pos, neg)
    w = direction(pos[:, cols], neg[:, cols], "lda")
    h_pos, h_neg = held_pos[:, cols] @ w, held_neg[:, cols] @ w
    out = {"out_of_fold_auc": round(auc(s_pos, s_neg), 4), "held_out_auc": round(auc(h_pos, h_neg), 4), "at": {}}
    for fpr in fprs:
        thr = choose_threshold(s_pos, s_neg, fpr)
        row = {"oof_tpr": round(float((s_pos >= thr).mean()), 3), "oof_fpr": round(float((s_neg >= thr).mean()), 3),
               "held_out_tpr": round(float((h_pos >= thr).mean()), 3),
               "held_out_fpr": round(float((h_neg >= thr).mean()), 3)}
        if refused is not None:
            row["refused_missed"] = int(np.sum(refused & (h_pos < thr)))
            row["answered_caught"] = f"{int(np.sum(~refused & (h_pos >= thr)))}/{int(np.sum(~refused))}"
        out["at"][str(fpr)] = row
    return out


@click.command()
@click.option("--model", default="default", show_default=True, help="A .gguf file or a named model.")
@click.option("--mask", "mask_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The mask whose gate is the baseline detector (made from the same discovery sets).")
@click.option("--positive", default="harmful_train", show_default=True)
@click.option("--negative", default="benign_train", show_default=True)
@click.option("--negative-n", type=int, default=100, show_default=True,
              help="Discovery negatives (attribute holds the last 20 out for calibration).")
@click.option("--held-positive", default="harmful_heldout", show_default=True)
@click.option("--held-negative", default="benign_heldout", show_default=True)
@click.option("--k", "ks", default="251,1000,3000,10000", show_default=True, help="Neuron counts for the top-|t| detectors.")
@click.option("--residual-layers", default="8,12,16,20,24", show_default=True,
              help="Layers whose residual stream (after the layer) gets a detector of its own; '' for none.")
@click.option("--fpr", "fprs", default="0.05,0.02,0.01", show_default=True)
@click.option("--baseline-eval", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="An `eval --json` file of the held-out sets: count the refused prompts each gate misses.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(model, mask_path, positive, negative, negative_n, held_positive, held_negative, ks, residual_layers, fprs,
         baseline_eval, json_out):
    from cna_local.capture import LlamaSource
    from cna_local.maskfile import NeuronMask
    from cna_local.models import resolve_model
    from cna_local.prompts import load_bundled

    mask = NeuronMask.load(mask_path)
    source = LlamaSource(resolve_model(model))
    try:  # before any prompt is read
        layers = [int(il) for il in residual_layers.split(",") if il.strip()]
    except ValueError:
        raise click.BadParameter(f"{residual_layers!r} is not a comma-separated list of layer numbers",
                                 param_hint="--residual-layers") from None
    if any(not 0 <= il < source.n_layer for il in layers):
        raise click.BadParameter(f"layers run 0..{source.n_layer - 1} on this model", param_hint="--residual-layers")
    t0 = time.perf_counter()
    values = {}
    for key, name, n in (("pos", positive, None), ("neg", negative, negative_n), ("held_pos", held_positive, None),
                         ("held_neg", held_negative, None)):
        prompts = load_bundled(name).prompts[:n]
        stats = source.collect(prompts, token_stats=False, keep=True, keep_residual=True, desc=key)
        values[key] = stats.values.reshape(len(prompts), -1).astype(np.float64)
        values[key + "_resid"] = stats.resid_values.astype(np.float64)  # [n, n_layer, n_embd]
    n_ff = source.n_ff
    source.close()
    click.echo(f"read {sum(len(v) for v in values.values())} prompts in {time.perf_counter() - t0:.0f} s", err=True)
    refused = None
    if baseline_eval:
        records = baseline_row(json.loads(baseline_eval.read_text()))["records"]["harmful"]
        refused = np.array([bool(r["refused"]) for r in records])
        if len(refused) != len(values["held_pos"]):
            raise click.BadParameter(f"{len(refused)} harmful records against {len(values['held_pos'])} held-out prompts",
                                     param_hint="--baseline-eval")
    fpr_list = [float(x) for x in fprs.split(",")]
    cols = row_columns(mask.layers, mask.neurons, n_ff)
    sets = ("pos", "neg", "held_pos", "held_neg")
    neurons = [values[k] for k in sets]
    # (label, which columns, the four sets' rows): neuron detectors read every layer's n_ff values, a
    # residual detector every dimension of one layer's residual stream
    detectors = [(f"the mask's {len(cols)} neurons (the stored gate's kind)", lambda p, n: cols, neurons)]
    detectors += [(f"top {k} by |t|, every layer", top_t(int(k)), neurons) for k in ks.split(",")]
    detectors += [(f"residual stream after layer {il}", lambda p, n: slice(None),
                   [values[k + "_resid"][:, il] for k in sets]) for il in layers]
    report = {"model": model, "mask": str(mask_path), "rows": []}
    for label, select, rows in detectors:
        r = judge(select, *rows, fpr_list, refused)
        report["rows"].append({"detector": label, **r})
        at = "; ".join(f"fpr {f}: oof {a['oof_tpr']:.2f}/{a['oof_fpr']:.2f}, held-out {a['held_out_tpr']:.2f}/"
                       f"{a['held_out_fpr']:.3f}" + (f", refused missed {a['refused_missed']}, answered caught {a['answered_caught']}"
                          if "refused_missed" in a else "")
                       for f, a in r["at"].items())
        click.echo(f"{label}: AUC oof {r['out_of_fold_auc']:.3f}, held-out {r['held_out_auc']:.3f}; {at} (tpr/fpr)")
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
