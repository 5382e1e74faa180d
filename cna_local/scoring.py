"""Score neurons by how differently they fire on positive vs negative prompts, and pick the top ones.

Pure numpy on [n_layer, n_ff] arrays, so every rule is testable on synthetic data.

- score: delta = mean(pos) - mean(neg); or, normalised, delta / pooled std; or
  selective: the part of |delta| that ablation can fix without disturbing ordinary
  text (see `selective_score`).
- selection: the k neurons with the largest |score| over all layers (ties: lower
  layer, then lower neuron first), optionally only within a layer range.
- universal filter: a neuron that also lands in the top k of most unrelated
  contrasts (style, language, topic ...) tracks something generic, not the
  behaviour; such neurons are excluded before picking the top k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import CnaLocalError

DEFAULT_TOP_FRACTION = 0.001
SCORES = ("selective", "delta", "normalized")
DEFAULT_UNIVERSAL_THRESHOLD = 0.8


class ScoringError(CnaLocalError):
    """Invalid scoring or selection parameters."""


def delta_score(pos_mean: np.ndarray, neg_mean: np.ndarray) -> np.ndarray:
    """mean(pos) - mean(neg) per neuron."""
    if pos_mean.shape != neg_mean.shape:
        raise ScoringError(f"positive and negative activations differ in shape: {pos_mean.shape} vs {neg_mean.shape}")
    return pos_mean - neg_mean


def pooled_std(pos_var: np.ndarray, neg_var: np.ndarray, n_pos: int, n_neg: int) -> np.ndarray:
    """sqrt(((n_pos-1) var_pos + (n_neg-1) var_neg) / (n_pos + n_neg - 2)), from sample variances."""
    if n_pos + n_neg < 3:
        raise ScoringError(
            f"a normalised score needs at least 3 prompts in all (got {n_pos} positive + {n_neg} negative) "
            "to estimate a spread. Fix: add prompts, or use the plain difference of means (no --normalize)."
        )
    return np.sqrt(((n_pos - 1) * pos_var + (n_neg - 1) * neg_var) / (n_pos + n_neg - 2))


def normalized_score(
    pos_mean: np.ndarray, neg_mean: np.ndarray,
    pos_var: np.ndarray, neg_var: np.ndarray,
    n_pos: int, n_neg: int, eps: float = 1e-8,
) -> np.ndarray:
    """delta / pooled std (an effect size, Cohen's d); eps keeps constant neurons finite."""
    return delta_score(pos_mean, neg_mean) / np.maximum(pooled_std(pos_var, neg_var, n_pos, n_neg), eps)


def direction_writes(down_weights, pos_resid: np.ndarray, neg_resid: np.ndarray) -> np.ndarray:
    """[n_layer, n_ff]: W_down_l[:, i] . r_l, how much each neuron writes along the unit direction
    r_l = (mean(pos) - mean(neg)) / ||...|| of the residual stream after its layer at the last token.

    down_weights: per layer, an [n_embd, n_ff] array (numpy or torch).
    """
    if pos_resid.shape != neg_resid.shape or pos_resid.shape[0] != len(down_weights):
        raise ScoringError(f"residual means {pos_resid.shape} / {neg_resid.shape} do not match {len(down_weights)} layers.")
    diff = pos_resid - neg_resid
    norm = np.linalg.norm(diff, axis=1, keepdims=True)
    direction = np.divide(diff, norm, out=np.zeros_like(diff), where=norm > 0)  # identical sets: no direction
    rows = []
    for il, w in enumerate(down_weights):
        w = w.detach().double().cpu().numpy() if hasattr(w, "detach") else np.asarray(w, np.float64)
        if w.shape[0] != diff.shape[1]:
            raise ScoringError(f"layer {il}: down projection {w.shape} does not write into a {diff.shape[1]}-wide residual stream.")
        rows.append(direction[il] @ w)
    return np.stack(rows)


def selective_score(
    pos_mean: np.ndarray, neg_mean: np.ndarray, neg_token_ms: np.ndarray, write: np.ndarray,
    cost_weight: float = 1.0,
) -> np.ndarray:
    """sign(delta) * max(0, sign(delta) * write) * max(0, |delta| - |mean(neg)| - cost_weight * rms_tokens(neg)).

    Steering scales a neuron at every position, so a good target is a neuron that ablation moves from
    the positive prompts' value to the negative prompts' value while it is quiet on ordinary text, and
    whose difference pushes the residual stream the way the two sets differ:
    - |delta| - |mean(neg)|: how much closer zeroing the neuron brings the positive mean to the negative
      mean at the last token (|delta| - |0 - mean(neg)|); negative when zero is farther than the positive
      mean already is, the case where plain ablation makes the behaviour worse;
    - rms_tokens(neg): the neuron's root-mean-square activation over ALL tokens of the negative prompts,
      the size of what scaling it changes on text that should stay as it is;
    - write: W_down[:, i] . r, the neuron's write along the direction r in which the positive prompts'
      residual stream differs from the negative ones' after its layer (`direction_writes`). Only a
      neuron whose difference pushes along r (sign(delta) * write > 0) carries the behaviour; the size
      puts neurons of different layers in the same units.
    Neurons whose ablation would not pay score 0 and are never picked before any that would.
    cost_weight scales the rms term: 1 is the product's score; a study of lighter ones behind the gate
    (tools/gate_circuits.py, REPORT.md section 8) found none better.
    """
    delta = delta_score(pos_mean, neg_mean)
    if not (neg_token_ms.shape == write.shape == delta.shape):
        raise ScoringError(f"selective score inputs differ in shape: {delta.shape}, {neg_token_ms.shape}, {write.shape}")
    gain = np.abs(delta) - np.abs(neg_mean) - cost_weight * np.sqrt(np.maximum(neg_token_ms, 0.0))
    sign = np.sign(delta)
    return sign * np.maximum(sign * write, 0.0) * np.maximum(gain, 0.0)


def resolve_k(n_total: int, top_fraction: float | None = None, top_k: int | None = None) -> int:
    """How many neurons to keep: top_k as given, or round(top_fraction * n_total), at least 1."""
    if top_fraction is not None and top_k is not None:
        raise ScoringError("give either a top fraction or a top-k count, not both.")
    if top_k is not None:
        if not 1 <= top_k <= n_total:
            raise ScoringError(f"top-k must be between 1 and the number of candidate neurons ({n_total}), got {top_k}.")
        return int(top_k)
    fraction = DEFAULT_TOP_FRACTION if top_fraction is None else top_fraction
    if not (0 < fraction <= 1) or math.isnan(fraction):
        raise ScoringError(f"top fraction must be in (0, 1], got {fraction} (0.001 keeps 0.1% of neurons).")
    return max(1, int(round(fraction * n_total)))


def parse_layer_spec(spec: str | None) -> tuple[int | None, int | None]:
    """Syntax of 'START:END' (either side may be empty); no model needed, so bad input fails early."""
    if spec is None or spec.strip() in ("", ":"):
        return None, None
    parts = spec.split(":")
    if len(parts) != 2:
        raise ScoringError(f"layer range {spec!r} is not START:END. Fix: e.g. --layers 4:20 (layers 4 to 19).")
    try:
        return tuple(int(p) if p.strip() else None for p in parts)  # type: ignore[return-value]
    except ValueError:
        raise ScoringError(f"layer range {spec!r} must hold integers, as START:END (e.g. 4:20).") from None


def parse_layer_range(spec: str | None, n_layer: int) -> tuple[int, int]:
    """'START:END' -> (start, end): START inclusive, END exclusive, like a Python slice.

    Either side may be empty ('8:' = layer 8 to the last, ':12' = layers 0-11);
    negative numbers count from the end ('-4:' = the last four layers).
    """
    start, end = parse_layer_spec(spec)
    start = 0 if start is None else start + n_layer if start < 0 else start
    end = n_layer if end is None else end + n_layer if end < 0 else end
    if not 0 <= start < end <= n_layer:
        raise ScoringError(
            f"layer range {spec!r} is empty or outside this {n_layer}-layer model "
            f"(START is inclusive, END exclusive; valid layers are 0-{n_layer - 1})."
        )
    return start, end


@dataclass(frozen=True)
class Selection:
    layers: np.ndarray  # int32, sorted by (layer, neuron)
    neurons: np.ndarray  # int32
    scores: np.ndarray  # float32


def top_neurons(
    scores: np.ndarray, k: int,
    layer_range: tuple[int, int] | None = None,
    exclude: np.ndarray | None = None,
) -> Selection:
    """The k neurons with the largest |score| inside layer_range, skipping `exclude` (bool [n_layer, n_ff])."""
    n_layer, n_ff = scores.shape
    start, end = layer_range or (0, n_layer)
    candidates = np.zeros(scores.shape, bool)
    candidates[start:end] = True
    if exclude is not None:
        candidates &= ~exclude
    if np.isnan(scores[candidates]).any():
        raise ScoringError("some neuron scores are NaN; the activations contain NaN (a broken model or prompt).")
    flat = np.flatnonzero(candidates)
    if k > flat.size:
        raise ScoringError(f"asked for {k} neurons but only {flat.size} are candidates (layer range and filter applied).")
    # Stable sort on -|score|: equal scores keep flat (layer, neuron) order.
    ranked = flat[np.argsort(-np.abs(scores.reshape(-1)[flat]), kind="stable")[:k]]
    ranked.sort()
    layers, neurons = np.divmod(ranked, n_ff)
    return Selection(layers.astype(np.int32), neurons.astype(np.int32), scores.reshape(-1)[ranked].astype(np.float32))


def top_set_mask(scores: np.ndarray, k: int, layer_range: tuple[int, int] | None = None) -> np.ndarray:
    """Bool [n_layer, n_ff]: True for the top-k neurons of these scores."""
    sel = top_neurons(scores, k, layer_range)
    mask = np.zeros(scores.shape, bool)
    mask[sel.layers, sel.neurons] = True
    return mask


def check_threshold(threshold: float) -> float:
    if not 0 < threshold <= 1:
        raise ScoringError(f"the universal-neuron threshold must be in (0, 1], got {threshold} (0.8 = in 80% of contrasts).")
    return threshold


def universal_neurons(
    contrast_scores: list[np.ndarray], k: int,
    threshold: float = DEFAULT_UNIVERSAL_THRESHOLD,
    layer_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """Bool [n_layer, n_ff]: neurons in the top k of at least `threshold` of the contrasts."""
    if not contrast_scores:
        raise ScoringError("the universal-neuron filter needs at least one contrast. Fix: give contrast pairs or turn the filter off.")
    check_threshold(threshold)
    hits = sum(top_set_mask(s, k, layer_range).astype(np.int32) for s in contrast_scores)
    # Count needed, rounded up: 80% of 10 contrasts = 8, of 7 contrasts = 6.
    needed = math.ceil(threshold * len(contrast_scores) - 1e-9)
    return hits >= needed
