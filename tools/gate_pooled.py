"""Study (not a test): would the gate detect better on neuron values averaged over the prompt's own tokens
than on the last prompt token it reads today?

The gate (cna_local/gate.py) is a diagonal linear discriminant on neurons' values at the last prompt token.
Strengthening is limited by the harmful prompts the unsteered model answers: they read like benign ones
there (REPORT.md section 8). This reads, with the torch backend (float32, one prompt per forward, no output
layer), every layer's down-projection input for each prompt at its last token and averaged over the tokens
after the chat template's shared prefix (the user's text and the assistant header), then judges the same
discriminant (top k neurons by |t| over every layer, chosen inside each fold) on both:

  * out of fold on the discovery sets: how many of the discovery harmful prompts the model answers are
    caught at 0, 1, 2 and 5 benign false positives (where a threshold can honestly be chosen);
  * on the held-out sets, with the threshold chosen out of fold under each false-positive cap, the way
    `attribute` chooses it (0.01 is the strengthening default).

Labels ("answered") come from `cna-local eval --json` files run at multiplier 1 on each harmful set:

    cna-local eval --model qwen-coder-1.5b --mask M.gguf --multipliers 1 --harmful harmful_train \\
        --benign one.txt --no-capability --no-gate --json disc.json      # and --harmful harmful_heldout
    python tools/gate_pooled.py --model qwen-coder-1.5b --discovery-eval disc.json --held-out-eval held.json

`--extra-negatives contrast|FILE` also judges each detector with more benign prompts added to the benign
discovery set, side by side with it alone: the bundled contrast prompts, or a file such as
tools/data/borderline_benign.txt (100 harmless requests that sound harmful, written for this study).
Neither helps (REPORT.md section 8, stop 30).
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

from tools.gate_study import baseline_records, down_inputs, judge, summary  # noqa: E402
from cna_local.prompts import load_contrast_pairs, resolve_prompt_set  # noqa: E402

SETS = (("pos", "harmful_train", None), ("neg", "benign_train", 100),
        ("held_pos", "harmful_heldout", None), ("held_neg", "benign_heldout", None))


def read_features(model: str, extra: list[str]) -> dict[str, np.ndarray]:
    """{set}_last and {set}_mean: [prompts, n_layer * n_ff] float64; the extra benign prompts under "extra"."""
    from cna_local.prompts import load_bundled
    from cna_local.templating import encode_prompts

    out = {}
    with down_inputs(model) as (lm, forward):
        encoded = {key: encode_prompts(lm.tokenizer, load_bundled(name).prompts[:n]) for key, name, n in SETS}
        if extra:
            encoded["extra"] = encode_prompts(lm.tokenizer, extra)
        every = [ids for seqs in encoded.values() for ids in seqs]
        prefix = 0  # the chat template's tokens every prompt shares: not the prompt's own
        while all(len(ids) > prefix + 1 and ids[prefix] == every[0][prefix] for ids in every):
            prefix += 1
        for key, seqs in encoded.items():
            t0 = time.perf_counter()
            last = np.zeros((len(seqs), lm.n_layer, lm.n_ff), np.float32)
            mean = np.zeros_like(last)
            for i, ids in enumerate(seqs):
                for il, values in enumerate(forward(ids)):
                    last[i, il] = values[-1]
                    mean[i, il] = values[prefix:].mean(0)
            out[key + "_last"] = last.reshape(len(seqs), -1).astype(np.float64)
            out[key + "_mean"] = mean.reshape(len(seqs), -1).astype(np.float64)
            click.echo(f"{key}: {len(seqs)} prompts in {time.perf_counter() - t0:.0f} s (shared prefix {prefix} tokens)",
                       err=True)
    return out


def answered(path: Path, n: int) -> np.ndarray:
    records = baseline_records(path, "harmful")
    if len(records) != n:
        raise click.BadParameter(f"{path} has {len(records)} harmful records, the set has {n} prompts")
    return ~np.array([bool(r["refused"]) for r in records])


@click.command()
@click.option("--model", default="qwen-coder-1.5b", show_default=True)
@click.option("--discovery-eval", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="An `eval --json` file on harmful_train (its baseline row): which discovery prompts the model answers.")
@click.option("--held-out-eval", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The same on harmful_heldout.")
@click.option("--k", "ks", default="251,1000,3000", show_default=True, help="Neuron counts (top |t| over every layer).")
@click.option("--fpr", "fprs", default="0,0.01,0.02,0.05", show_default=True, help="Caps for the held-out thresholds.")
@click.option("--extra-negatives", default="none", show_default=True, metavar="none|contrast|FILE",
              help="Also judge each detector with more benign prompts added to the benign discovery set, side by side "
                   "with it alone: does a larger benign set place the threshold better? contrast: the bundled contrast "
                   "prompts (both sides of every pair: code, maths, cooking, French, ...); FILE: a prompt file.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(model, discovery_eval, held_out_eval, ks, fprs, extra_negatives, json_out):
    if extra_negatives == "contrast":
        extra = [p for a, b in load_contrast_pairs() for p in (*a.prompts, *b.prompts)]
    elif extra_negatives != "none":
        extra = resolve_prompt_set(extra_negatives).prompts
    else:
        extra = []
    feats = read_features(model, extra)
    ans_disc = answered(discovery_eval, len(feats["pos_last"]))
    ans_held = answered(held_out_eval, len(feats["held_pos_last"]))
    click.echo(f"answered unsteered: discovery {ans_disc.sum()}/{len(ans_disc)}, held-out {ans_held.sum()}/{len(ans_held)}")
    report = {"model": model, "answered": {"discovery": int(ans_disc.sum()), "held_out": int(ans_held.sum())}, "rows": []}
    negatives = ("benign", f"benign+{Path(extra_negatives).stem}") if extra else ("benign",)
    for kind, negs, k in ((kind, negs, int(k)) for kind in ("last", "mean") for negs in negatives
                          for k in ks.split(",")):
        pos, neg, hpos, hneg = (feats[f"{key}_{kind}"] for key, _, _ in SETS)
        if negs != "benign":
            neg = np.concatenate([neg, feats[f"extra_{kind}"]])
        row = {"features": kind, "negatives": negs, "n_negatives": len(neg),
               **judge(pos, neg, hpos, hneg, k, [float(x) for x in fprs.split(",")], ans_disc, ans_held)}
        report["rows"].append(row)
        click.echo(f"{kind:>4} {negs} ({len(neg)}) top {k:>4}: " + summary(row, ans_disc.sum(), ans_held.sum()))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
