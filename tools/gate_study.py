"""What the gate studies (tools/gate_pooled.py, tools/gate_reply.py) share: reading every layer's
down-projection input with the torch backend, and judging a detector the way `attribute` fits the gate: its own
discriminant (top k neurons by |t|, chosen inside each fold), scored out of fold on the discovery sets and,
with the threshold chosen out of fold under each false-positive cap as `attribute` chooses it, on the
held-out sets. What strengthening needs is counted apart: the harmful prompts the unsteered model answers."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cna_local.evaluation.report import baseline_row  # noqa: E402
from cna_local.gate import auc, choose_threshold, direction, out_of_fold_scores, top_by_t  # noqa: E402


def baseline_records(path: Path, kind: str) -> list[dict]:
    """The unsteered (baseline) row's per-prompt records of one set ("harmful", "benign") of an `eval --json` file."""
    return baseline_row(json.loads(path.read_text()))["records"][kind]


@contextmanager
def down_inputs(model: str):
    """Yields (lm, forward): forward(ids) runs one token sequence through the float32 decoder (no output
    layer) and returns each layer's down-projection input, [tokens, n_ff] float32 numpy."""
    import torch

    from cna_local.loading import load_model
    from cna_local.models import resolve_model

    lm = load_model(resolve_model(model), progress=True)
    current = {}
    hooks = [down.register_forward_pre_hook(lambda mod, args, il=il: current.__setitem__(il, args[0][0].detach()))
             for il, down in enumerate(lm.down_projs)]

    def forward(ids: list[int]) -> list[np.ndarray]:
        with torch.no_grad():
            lm.model.model(input_ids=torch.tensor([ids]))
        return [current[il].float().numpy() for il in range(lm.n_layer)]

    try:
        yield lm, forward
    finally:
        for h in hooks:
            h.remove()


def judge(pos: np.ndarray, neg: np.ndarray, held_pos: np.ndarray, held_neg: np.ndarray, k: int,
          caps: list[float], answered_pos: np.ndarray, answered_held: np.ndarray) -> dict:
    """pos/neg: discovery rows [prompts, features]; held_*: held-out rows; answered_pos / answered_held: which
    rows of pos / held_pos the unsteered model answers. Returns the AUCs, how many answered discovery prompts
    score above the 0th/1st/2nd/5th highest benign out-of-fold score, and per cap the held-out answered
    prompts caught, benign prompts fired on and the harmful firing rate."""
    select = lambda p, n: top_by_t(p, n, k)  # noqa: E731
    s_pos, s_neg, _ = out_of_fold_scores(pos, neg, "lda", 5, 0, select)
    cols = select(pos, neg)
    w = direction(pos[:, cols], neg[:, cols], "lda")
    h_pos, h_neg = held_pos[:, cols] @ w, held_neg[:, cols] @ w
    ranked = np.sort(s_neg)[::-1]
    held_out = {}
    for cap in caps:
        t = choose_threshold(s_pos, s_neg, cap)
        held_out[str(cap)] = {"answered_caught": int(np.sum(answered_held & (h_pos >= t))),
                              "benign_fired": int(np.sum(h_neg >= t)),
                              "harmful_fired": round(float(np.mean(h_pos >= t)), 3)}
    return {"k": k, "auc_oof": round(auc(s_pos, s_neg), 4), "auc_held_out": round(auc(h_pos, h_neg), 4),
            "auc_held_out_answered": round(auc(h_pos[answered_held], h_neg), 4),
            "discovery_answered_caught_at_fps": {fp: int(np.sum(s_pos[answered_pos] > ranked[fp])) for fp in (0, 1, 2, 5)},
            "held_out": held_out}


def summary(row: dict, n_answered_disc: int, n_answered_held: int) -> str:
    """One line of a study's output for a judged row."""
    return (f"AUC oof {row['auc_oof']:.3f} held-out {row['auc_held_out']:.3f} (answered {row['auc_held_out_answered']:.3f}); "
            f"discovery answered caught (of {n_answered_disc}) at 0/1/2/5 benign FPs: "
            f"{'/'.join(str(v) for v in row['discovery_answered_caught_at_fps'].values())}; held-out " +
            "; ".join(f"cap {c}: {v['answered_caught']}/{n_answered_held} caught, {v['benign_fired']} benign"
                      for c, v in row["held_out"].items()))
