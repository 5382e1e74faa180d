"""Answer quality under steering: the reference's n-gram score and stronger, likelihood-based measures.

* `distinct_ngram_ratio` (reported as `quality_distinct4`): the reference implementation's definition
  (NousResearch/neural-steering), kept for comparability: the share of distinct whitespace-separated word
  4-grams among all word 4-grams of the greedy answer. It only measures word-level repetition: the answer
  `1.1.1.1.1.1...` is one "word" and scores 1.0, as does fluent nonsense. That is why it is never
  reported alone.
* `first_token_kl` (`kl_first_token`): KL(unsteered || steered) in nats between the full-vocabulary
  next-token distributions right after the prompt, before any reply token. 0 means steering leaves the
  start of the reply untouched.
* `likelihood_quality` (`quality_likelihood`): how likely the steered model finds the unsteered model's
  greedy answer, relative to the unsteered model: q = exp(-(NLL_steered - NLL_unsteered)), with NLL the
  mean per-token negative log-likelihood of the answer tokens (teacher-forced after the prompt, the
  end-of-turn token not included), clipped to [0, 1]. 1.0 means no loss (exactly 1.0 at multiplier 1);
  q = 0.5 means the steered model gives each answer token on average half the unsteered probability.
* `token_repeat_fraction` / `is_degenerate` (`degenerate_rate`): token-level repetition, which does catch
  `1.1.1.1...`: the share of token 4-grams that repeat an earlier one. An answer is degenerate if it is
  empty or more than half its token 4-grams are repeats.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DEGENERATE_REPEAT = 0.5
"""An answer whose token 4-grams are more than this fraction repeats is degenerate."""


def distinct_ngram_ratio(text: str, n: int = 4) -> float:
    """Distinct word n-grams / all word n-grams of `text` (words split on whitespace).

    Answers too short to hold one n-gram: 0.0 for an empty answer (nothing was said), 1.0 for 1 to n-1
    words (nothing can repeat). Scores `1.1.1.1...` (a single "word") as 1.0: see the module docstring.
    """
    words = text.split()
    if not words:
        return 0.0
    if len(words) < n:
        return 1.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams)


def token_repeat_fraction(tokens: Sequence[int], n: int = 4) -> float:
    """The share of token n-grams that already occurred earlier in the sequence (0.0 for fewer than n tokens)."""
    if len(tokens) < n:
        return 0.0
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def is_degenerate(text: str, tokens: Sequence[int], threshold: float = DEGENERATE_REPEAT) -> bool:
    """Empty (or whitespace-only) answers, and answers whose token 4-grams are mostly repeats."""
    return not text.strip() or token_repeat_fraction(tokens) > threshold


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def first_token_kl(logp_unsteered: np.ndarray, logp_steered: np.ndarray) -> float:
    """KL(P_unsteered || P_steered) in nats, from two log-probability vectors over the full vocabulary."""
    p = np.exp(logp_unsteered)
    kl = float(np.sum(p * (logp_unsteered - logp_steered)))
    return max(kl, 0.0)  # rounding can give -1e-17 for identical distributions


def likelihood_quality(nll_steered: float, nll_unsteered: float) -> float:
    """exp(-(NLL_steered - NLL_unsteered)) clipped to [0, 1]; NLLs are mean per-token, in nats."""
    return float(min(1.0, max(0.0, math.exp(-(nll_steered - nll_unsteered)))))
