"""Per-prompt measurements under the current steering: what a group of harmful, benign or capability
prompts gives, one record per prompt (a group of one is the one-at-a-time evaluation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import quality as Q
from .capability import CapabilityItem
from .engine import Engine
from .refusal import refusal_markers


@dataclass
class Reference:
    """The unsteered model's greedy benign reply: what the steered model is compared with."""

    tokens: list[int]
    logprobs: np.ndarray  # next-token log-probabilities after the prompt
    nll: float | None  # mean per-token NLL of `tokens` under the unsteered model


def _with_rows(out: list[dict], ps) -> list[dict]:
    """Each prompt's captured last-token row, for the gate (popped by the schedule before anything is kept)."""
    for record, p in zip(out, ps):
        if p.row is not None:
            record["_row"] = p.row
    return out


def measure_harmful(engine: Engine, prompts: Sequence[str], ids: Sequence[Sequence[int]], openers,
                    max_tokens: int, read_rows: bool = False) -> list[dict]:
    """Harmful prompts under the current steering: opener probabilities, greedy reply, refusal markers, and
    how coherent the reply is (distinct 4-grams, degenerate; its likelihood is added by the schedule)."""
    ps = engine.start(ids, read_rows)
    opened = engine.opener_probs(ps, openers)
    replies = engine.greedy(ps, max_tokens)
    out = []
    for prompt, (p_first, p_seq), tokens in zip(prompts, opened, replies):
        text = engine.text(tokens)
        markers = refusal_markers(text)
        out.append({"prompt": prompt, "answer": text, "refused": bool(markers), "markers": markers,
                    "opener_prob": p_first, "opener_seq_prob": p_seq, "n_tokens": len(tokens),
                    "distinct4": Q.distinct_ngram_ratio(text), "degenerate": Q.is_degenerate(text, tokens),
                    "_tokens": list(tokens)})
    return _with_rows(out, ps)


def measure_benign(engine: Engine, prompts: Sequence[str], ids: Sequence[Sequence[int]], openers, quality_tokens: int,
                   references: Sequence[Reference] | None, read_rows: bool = False) -> tuple[list[dict], list[Reference] | None]:
    """Benign prompts under the current steering; without references this *is* the unsteered run and
    returns the references it made."""
    ps = engine.start(ids, read_rows)
    opened = engine.opener_probs(ps, openers)
    replies = engine.greedy(ps, quality_tokens)
    made = None
    if references is None:
        nlls = engine.mean_nll(ps, replies)
        made = references = [Reference(t, p.logprobs, n) for t, p, n in zip(replies, ps, nlls)]
    else:
        nlls = engine.mean_nll(ps, [r.tokens for r in references])
    out = []
    for prompt, p, (p_first, p_seq), tokens, ref, nll in zip(prompts, ps, opened, replies, references, nlls):
        text = engine.text(tokens)
        markers = refusal_markers(text)
        out.append({
            "prompt": prompt, "answer": text, "refused": bool(markers), "markers": markers,
            "opener_prob": p_first, "opener_seq_prob": p_seq, "n_tokens": len(tokens),
            "distinct4": Q.distinct_ngram_ratio(text),
            "token_repeat": Q.token_repeat_fraction(tokens),
            "degenerate": Q.is_degenerate(text, tokens),
            "kl_first_token": Q.first_token_kl(ref.logprobs, p.logprobs),
            "nll_reference_answer": nll,
            "likelihood_quality": None if nll is None else Q.likelihood_quality(nll, ref.nll),
        })
    return _with_rows(out, ps), made


def measure_capability(engine: Engine, items: Sequence[CapabilityItem], ids: Sequence[Sequence[int]],
                       capability_tokens: int, read_rows: bool = False) -> list[dict]:
    ps = engine.start(ids, read_rows)
    replies = engine.greedy(ps, capability_tokens)
    out = []
    for item, tokens in zip(items, replies):
        text = engine.text(tokens)
        out.append({"question": item.question, "answers": list(item.answers), "kind": item.kind, "answer": text,
                    "correct": item.matches(text)})
    return _with_rows(out, ps)
