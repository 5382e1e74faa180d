"""Per-prompt measurements under the current steering: what one harmful, benign or capability prompt gives."""

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


def measure_harmful(engine: Engine, prompt: str, ids: Sequence[int], openers, max_tokens: int) -> dict:
    """One harmful prompt under the current steering: opener probabilities, greedy reply, refusal markers."""
    p = engine.start(ids)
    p_first, p_seq = engine.opener_probs(p, openers)
    tokens = engine.greedy(p, max_tokens)
    text = engine.text(tokens)
    markers = refusal_markers(text)
    return {"prompt": prompt, "answer": text, "refused": bool(markers), "markers": markers,
            "opener_prob": p_first, "opener_seq_prob": p_seq, "n_tokens": len(tokens),
            "distinct4": Q.distinct_ngram_ratio(text)}


def measure_benign(engine: Engine, prompt: str, ids: Sequence[int], openers, quality_tokens: int,
                   reference: Reference | None) -> tuple[dict, Reference | None]:
    """One benign prompt under the current steering; without a reference this *is* the unsteered run and
    returns the reference it made."""
    p = engine.start(ids)
    p_first, p_seq = engine.opener_probs(p, openers)
    made = None
    tokens = engine.greedy(p, quality_tokens)
    if reference is None:
        made = reference = Reference(tokens, p.logprobs, engine.mean_nll(p, tokens))
        nll = reference.nll
    else:
        nll = engine.mean_nll(p, reference.tokens)
    text = engine.text(tokens)
    markers = refusal_markers(text)
    record = {
        "prompt": prompt, "answer": text, "refused": bool(markers), "markers": markers,
        "opener_prob": p_first, "opener_seq_prob": p_seq, "n_tokens": len(tokens),
        "distinct4": Q.distinct_ngram_ratio(text),
        "token_repeat": Q.token_repeat_fraction(tokens),
        "degenerate": Q.is_degenerate(text, tokens),
        "kl_first_token": Q.first_token_kl(reference.logprobs, p.logprobs),
        "nll_reference_answer": nll,
        "likelihood_quality": None if nll is None else Q.likelihood_quality(nll, reference.nll),
    }
    return record, made


def measure_capability(engine: Engine, item: CapabilityItem, ids: Sequence[int], capability_tokens: int) -> dict:
    p = engine.start(ids)
    tokens = engine.greedy(p, capability_tokens)
    text = engine.text(tokens)
    return {"question": item.question, "answers": list(item.answers), "kind": item.kind, "answer": text,
            "correct": item.matches(text)}
