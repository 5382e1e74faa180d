"""Study (not a test): would the gate tell the harmful requests the model answers from benign ones better a
few tokens into the unsteered reply than at the last prompt token?

Strengthening (multiplier > 1) is limited by the gate's detector: the harmful prompts the unsteered model
answers read like harmless requests that sound harmful at the last prompt token (REPORT.md section 8,
stops 23-30). A reply-time gate would let the model start its reply unsteered, read the circuit after K
reply tokens, and restart the reply under steering only where it fires: the reply itself ("Sure, to
extract DMT you ...") may show what the prompt alone does not. This reads, with the torch backend (float32,
one forward per prompt + its reply's first tokens, no output layer), every layer's down-projection input
at the last prompt token (K = 0) and after K reply tokens, and judges the gate's discriminant (top k
neurons by |t| over every layer, chosen inside each fold) at each K:

  * out of fold on the discovery sets: how many of the discovery harmful prompts the model answers are
    caught at 0, 1, 2 and 5 benign false positives;
  * on the held-out sets, with the threshold chosen out of fold under each cap (0.01: strengthening's).

Each K is judged twice: with every harmful discovery prompt as positives (as `attribute` fits today) and with
only those the model answers (the prompts strengthening must catch). Replies are the unsteered greedy replies of
`cna-local eval --json` runs at multiplier 1 (re-tokenized from their text), which also give the labels:

    cna-local eval --model qwen-coder-1.5b --mask M.gguf --multipliers 1 --harmful harmful_train \\
        --benign one.txt --no-capability --no-gate --json disc.json         # and harmful_heldout: held.json
    cna-local eval --model qwen-coder-1.5b --mask M.gguf --multipliers 1 --harmful one.txt \\
        --benign benign_train --quality-tokens 24 --no-capability --no-gate --json ben_disc.json  # benign_heldout
    python tools/gate_reply.py --discovery-eval disc.json --held-out-eval held.json \\
        --benign-discovery-eval ben_disc.json --benign-held-out-eval ben_held.json
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

from tools.gate_study import baseline_records as records, down_inputs, judge, summary  # noqa: E402


def read_features(model: str, sets: dict[str, list[tuple[str, str]]], ks: list[int]) -> dict[str, np.ndarray]:
    """{set}_{K}: [prompts, n_layer * n_ff] float64, the down-projection inputs after K reply tokens (K = 0:
    the last prompt token). A reply shorter than K is read at its last token."""
    from cna_local.templating import encode_prompts

    out = {}
    with down_inputs(model) as (lm, forward):
        for key, pairs in sets.items():
            t0 = time.perf_counter()
            prompts = encode_prompts(lm.tokenizer, [p for p, _ in pairs])
            feats = {k: np.zeros((len(pairs), lm.n_layer, lm.n_ff), np.float32) for k in ks}
            for i, (ids, (_, reply)) in enumerate(zip(prompts, pairs)):
                reply_ids = lm.tokenizer(reply, add_special_tokens=False)["input_ids"][:max(ks)]
                layers = forward(ids + reply_ids)
                for k in ks:
                    pos = len(ids) - 1 + min(k, len(reply_ids))
                    for il in range(lm.n_layer):
                        feats[k][i, il] = layers[il][pos]
            for k in ks:
                out[f"{key}_{k}"] = feats[k].reshape(len(pairs), -1).astype(np.float64)
            click.echo(f"{key}: {len(pairs)} prompts in {time.perf_counter() - t0:.0f} s", err=True)
    return out


@click.command()
@click.option("--model", default="qwen-coder-1.5b", show_default=True)
@click.option("--discovery-eval", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="`eval --json` on harmful_train at multiplier 1: the discovery harmful replies and labels.")
@click.option("--held-out-eval", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The same on harmful_heldout.")
@click.option("--benign-discovery-eval", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="`eval --json` with --benign benign_train: the benign discovery replies (the first 100 are used, "
                   "as `attribute` uses them).")
@click.option("--benign-held-out-eval", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The same with --benign benign_heldout.")
@click.option("--reply-tokens", "ks", default="0,2,4,8,16", show_default=True,
              help="Reply tokens read before the gate decides (0: the last prompt token, today's gate).")
@click.option("--k", "neurons", default="251,1000", show_default=True, help="Neuron counts (top |t| over every layer).")
@click.option("--fpr", "fprs", default="0,0.01,0.02,0.05", show_default=True, help="Caps for the held-out thresholds.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(model, discovery_eval, held_out_eval, benign_discovery_eval, benign_held_out_eval, ks, neurons, fprs, json_out):
    ks = [int(k) for k in ks.split(",")]
    pos_r, hpos_r = records(discovery_eval, "harmful"), records(held_out_eval, "harmful")
    neg_r, hneg_r = records(benign_discovery_eval, "benign")[:100], records(benign_held_out_eval, "benign")
    sets = {key: [(r["prompt"], r["answer"]) for r in rs]
            for key, rs in (("pos", pos_r), ("neg", neg_r), ("held_pos", hpos_r), ("held_neg", hneg_r))}
    ans_disc = ~np.array([bool(r["refused"]) for r in pos_r])
    ans_held = ~np.array([bool(r["refused"]) for r in hpos_r])
    refused_benign = np.array([bool(r["refused"]) for r in hneg_r])
    click.echo(f"answered unsteered: discovery {ans_disc.sum()}/{len(ans_disc)}, held-out {ans_held.sum()}/{len(ans_held)}; "
               f"held-out benign refused {refused_benign.sum()}/{len(refused_benign)}")
    feats = read_features(model, sets, ks)
    report = {"model": model, "answered": {"discovery": int(ans_disc.sum()), "held_out": int(ans_held.sum())}, "rows": []}
    caps = [float(x) for x in fprs.split(",")]
    for positives in ("all", "answered"):
        for k, n in ((k, int(n)) for k in ks for n in neurons.split(",")):
            pos, neg, hpos, hneg = (feats[f"{key}_{k}"] for key in sets)
            answered_pos = ans_disc
            if positives == "answered":
                pos, answered_pos = pos[ans_disc], ans_disc[ans_disc]
            row = {"positives": positives, "reply_tokens": k,
                   **judge(pos, neg, hpos, hneg, n, caps, answered_pos, ans_held)}
            report["rows"].append(row)
            click.echo(f"{positives:>8} K={k:>2} top {n:>4}: " + summary(row, ans_disc.sum(), ans_held.sum()))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
