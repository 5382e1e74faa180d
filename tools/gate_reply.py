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

Positives are every harmful discovery prompt (as `attribute` fits today) or, with --positives answered, only
those the model answers (the prompts strengthening must catch). Replies are the unsteered greedy replies of
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

from cna_local.evaluation.report import baseline_row  # noqa: E402
from cna_local.gate import auc, choose_threshold, direction, out_of_fold_scores, top_by_t  # noqa: E402


def records(path: Path, kind: str) -> list[dict]:
    return baseline_row(json.loads(path.read_text()))["records"][kind]


def read_features(model: str, sets: dict[str, list[tuple[str, str]]], ks: list[int]) -> dict[str, np.ndarray]:
    """{set}_{K}: [prompts, n_layer * n_ff] float64, the down-projection inputs after K reply tokens (K = 0:
    the last prompt token). A reply shorter than K is read at its last token."""
    import torch

    from cna_local.loading import load_model
    from cna_local.models import resolve_model
    from cna_local.templating import encode_prompts

    lm = load_model(resolve_model(model), progress=True)
    current = {}
    hooks = [down.register_forward_pre_hook(lambda mod, args, il=il: current.__setitem__(il, args[0][0].detach()))
             for il, down in enumerate(lm.down_projs)]
    decoder = lm.model.model  # without the output layer
    out = {}
    try:
        for key, pairs in sets.items():
            t0 = time.perf_counter()
            prompts = encode_prompts(lm.tokenizer, [p for p, _ in pairs])
            feats = {k: np.zeros((len(pairs), lm.n_layer, lm.n_ff), np.float32) for k in ks}
            for i, (ids, (_, reply)) in enumerate(zip(prompts, pairs)):
                reply_ids = lm.tokenizer(reply, add_special_tokens=False)["input_ids"][:max(ks)]
                with torch.no_grad():
                    decoder(input_ids=torch.tensor([ids + reply_ids]))
                for k in ks:
                    pos = len(ids) - 1 + min(k, len(reply_ids))
                    for il in range(lm.n_layer):
                        feats[k][i, il] = current[il][pos].float().numpy()
            for k in ks:
                out[f"{key}_{k}"] = feats[k].reshape(len(pairs), -1).astype(np.float64)
            click.echo(f"{key}: {len(pairs)} prompts in {time.perf_counter() - t0:.0f} s", err=True)
    finally:
        for h in hooks:
            h.remove()
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
    for positives in ("all", "answered"):
        for k, n in ((k, int(n)) for k in ks for n in neurons.split(",")):
            pos, neg, hpos, hneg = (feats[f"{key}_{k}"] for key in sets)
            if positives == "answered":
                pos = pos[ans_disc]
            select = lambda p, q, n=n: top_by_t(p, q, n)  # noqa: E731
            s_pos, s_neg, _ = out_of_fold_scores(pos, neg, "lda", 5, 0, select)
            cols = select(pos, neg)
            w = direction(pos[:, cols], neg[:, cols], "lda")
            h_pos, h_neg = hpos[:, cols] @ w, hneg[:, cols] @ w
            ranked = np.sort(s_neg)[::-1]
            answered_oof = s_pos if positives == "answered" else s_pos[ans_disc]
            at_fps = {fp: int(np.sum(answered_oof > ranked[fp])) for fp in (0, 1, 2, 5)}
            caps = {}
            for cap in (float(x) for x in fprs.split(",")):
                t = choose_threshold(s_pos, s_neg, cap)
                caps[str(cap)] = {"answered_caught": int(np.sum(ans_held & (h_pos >= t))),
                                  "benign_fired": int(np.sum(h_neg >= t)),
                                  "harmful_fired": round(float(np.mean(h_pos >= t)), 3)}
            row = {"positives": positives, "reply_tokens": k, "k": n, "auc_oof": round(auc(s_pos, s_neg), 4),
                   "auc_held_out": round(auc(h_pos, h_neg), 4),
                   "auc_held_out_answered": round(auc(h_pos[ans_held], h_neg), 4),
                   "discovery_answered_caught_at_fps": at_fps, "held_out": caps}
            report["rows"].append(row)
            click.echo(f"{positives:>8} K={k:>2} top {n:>4}: AUC oof {row['auc_oof']:.3f} held-out {row['auc_held_out']:.3f} "
                       f"(answered {row['auc_held_out_answered']:.3f}); discovery answered caught (of {ans_disc.sum()}) "
                       f"at 0/1/2/5 benign FPs: {'/'.join(str(v) for v in at_fps.values())}; held-out " +
                       "; ".join(f"cap {c}: {v['answered_caught']}/{ans_held.sum()} caught, {v['benign_fired']} benign"
                                 for c, v in caps.items()))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
