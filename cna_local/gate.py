"""The gate: a detector on neurons at the last prompt token that says, per prompt, whether to steer it.

The neurons a mask names were chosen because, at the last prompt token, they separate the positive
prompts from the negative ones. The gate turns that into a decision: a linear score over neurons'
unsteered values at the prompt's last token,

    score = sum_i w_i * x_i        fires when score >= threshold,

with w the difference of the class means, each neuron divided by its pooled variance (a diagonal linear
discriminant: a neuron that varies a lot within each set counts less; `METHODS`). The threshold is set for
a stated false-positive rate on the negative set, from out-of-fold scores: the prompts are split into
`folds` parts and each part is scored by a gate fitted on the others, so the threshold is not chosen on
scores a gate saw while fitting. A prompt whose gate stays closed runs unsteered, exactly.

Two thresholds, one per direction of steering. Weakening (multiplier < 1) a behaviour the model shows on
positive prompts pays on every positive prompt the gate catches; strengthening it (multiplier > 1) pays
only on the positives the model does not already show it on, while each negative prompt the gate fires on
by mistake is pushed toward the behaviour (for refusal: an over-refusal). So strengthening gets its own,
stricter threshold, set the same way under a lower false-positive cap (`DEFAULT_FPR_STRENGTHEN`), never
below the weakening one. Measured on the 1.5B model's held-out sets (REPORT.md section 8): with one
threshold, strengthening at 1.25-2 raised over-refusal from 0.033 to 0.050-0.067 through the gate's two
benign false positives; with the second, over-refusal stays at 0.033 and no benign prompt is steered, and
refusal reaches 0.900 where one threshold reached 0.950 (the borderline harmful prompts it then misses
read like the benign ones it must leave alone).

Which neurons it reads: by default its own, the k (as many as the mask holds) that separate the sets best
over every layer by |t| (mean difference over pooled standard deviation), chosen again inside each fold
so the out-of-fold rates stay honest. They need not be steered to be read: the FFN capture hands over
every layer's values at the last token. Measured on the held-out sets (REPORT.md section 8,
tools/gate_detectors.py), that detector missed none of the 1.5B model's refused harmful prompts where
the mask's own neurons missed 3, at the same false-positive rate. `neurons="mask"` reads the mask's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import CnaLocalError

METHODS = ("lda", "mean_diff")
"""lda: (mean_pos - mean_neg) / pooled variance per neuron (the default); mean_diff: mean_pos - mean_neg."""
DEFAULT_METHOD = "lda"
DEFAULT_FPR = 0.05
DEFAULT_FPR_STRENGTHEN = 0.01  # at most 1 in 100 ordinary prompts pushed toward the behaviour
DEFAULT_FOLDS = 5


class GateError(CnaLocalError):
    """A gate cannot be fitted or applied."""


@dataclass(frozen=True, eq=False)
class Gate:
    """weights: float32 [N]. Without layers/neurons, one per mask entry in the mask's (layer, neuron)
    order; with them, the gate's own neurons (sorted by layer, then neuron), which the mask need not hold.
    threshold: where it fires when steering weakens (multiplier <= 1); threshold_strengthen: where it fires
    when steering strengthens (multiplier > 1), >= threshold (None: threshold in both directions)."""

    weights: np.ndarray
    threshold: float
    info: dict = field(default_factory=dict)  # method, fpr target, out-of-fold rates, n prompts ...
    layers: np.ndarray | None = None
    neurons: np.ndarray | None = None
    threshold_strengthen: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "weights", np.asarray(self.weights, np.float32).reshape(-1))
        check_gate(self.weights, self.threshold, "this gate")
        if self.threshold_strengthen is not None:
            check_gate(self.weights, self.threshold_strengthen, "this gate (strengthening)")
            if float(self.threshold_strengthen) < float(self.threshold):
                raise GateError(f"the gate's strengthening threshold {self.threshold_strengthen:g} is below its weakening "
                                f"threshold {self.threshold:g}; strengthening must fire on no more prompts than weakening.")
        if (self.layers is None) != (self.neurons is None):
            raise GateError("a gate's own neurons need both their layers and their indices.")
        if self.layers is not None:
            layers = np.asarray(self.layers, np.int32).reshape(-1)
            neurons = np.asarray(self.neurons, np.int32).reshape(-1)
            if not len(layers) == len(neurons) == len(self.weights):
                raise GateError(f"the gate weighs {len(self.weights)} neurons but names {len(layers)} layers and "
                                f"{len(neurons)} indices.")
            if (layers < 0).any() or (neurons < 0).any():
                raise GateError("the gate names a negative layer or neuron index.")
            order = np.lexsort((neurons, layers))
            layers, neurons = layers[order], neurons[order]
            object.__setattr__(self, "weights", self.weights[order])
            same = (np.diff(layers) == 0) & (np.diff(neurons) == 0)
            if same.any():
                i = int(np.flatnonzero(same)[0])
                raise GateError(f"the gate names neuron {neurons[i]} of layer {layers[i]} twice.")
            object.__setattr__(self, "layers", layers)
            object.__setattr__(self, "neurons", neurons)

    @property
    def own(self) -> bool:
        """Whether the gate reads neurons of its own (else the mask's)."""
        return self.layers is not None

    def columns(self, mask_layers: np.ndarray, mask_neurons: np.ndarray, n_ff: int) -> np.ndarray:
        """Where the neurons it reads sit in a captured row (every layer's n_ff values, layers in order)."""
        if self.own:
            return row_columns(self.layers, self.neurons, n_ff)
        return row_columns(mask_layers, mask_neurons, n_ff)

    def score(self, values: np.ndarray) -> np.ndarray:
        """Scores of values [..., N] (its neurons at a prompt's last token), float64."""
        values = np.asarray(values, np.float64)
        if values.shape[-1] != len(self.weights):
            raise GateError(f"the gate weighs {len(self.weights)} neurons but got values for {values.shape[-1]}.")
        return values @ self.weights.astype(np.float64)

    def threshold_for(self, multiplier: float | None = None) -> float:
        """The threshold at `multiplier`: the strengthening one above 1 (when the gate has one), else the
        weakening one (None: weakening)."""
        if multiplier is not None and multiplier > 1.0 and self.threshold_strengthen is not None:
            return float(self.threshold_strengthen)
        return float(self.threshold)

    def fires(self, values: np.ndarray, multiplier: float | None = None) -> np.ndarray | bool:
        s, t = self.score(values), self.threshold_for(multiplier)
        return bool(s >= t) if np.ndim(s) == 0 else s >= t

    def record(self) -> dict:
        """Its thresholds and how it was fitted, as the JSON outputs (attribute, inspect, eval) give it."""
        return {"threshold": self.threshold, "threshold_strengthen": self.threshold_strengthen, **self.info}

    def with_weights(self, weights: np.ndarray) -> "Gate":
        """The same gate over reordered weights (its thresholds and record kept)."""
        return Gate(weights, self.threshold, self.info, self.layers, self.neurons, self.threshold_strengthen)

    @classmethod
    def always(cls, n: int) -> "Gate":
        """A gate that fires on every prompt (score 0 >= threshold 0): the static mask."""
        return cls(np.zeros(n, np.float32), 0.0, {"method": "always"})

    @classmethod
    def never(cls, n: int) -> "Gate":
        """A gate that never fires (score 0 < threshold 1): the unsteered model."""
        return cls(np.zeros(n, np.float32), 1.0, {"method": "never"})


def check_gate(weights: np.ndarray, threshold, source: str) -> None:
    """Raise GateError naming the problem when gate data cannot be a gate."""
    if weights.ndim != 1 or len(weights) == 0:
        raise GateError(f"{source} has no gate weights (shape {list(weights.shape)}).")
    if not np.isfinite(weights).all():
        i = int(np.flatnonzero(~np.isfinite(weights))[0])
        raise GateError(f"{source}: gate weight {i} is {weights[i]}; gate weights must be finite numbers.")
    if not isinstance(threshold, (int, float, np.floating, np.integer)) or not math.isfinite(float(threshold)):
        raise GateError(f"{source}: the gate threshold is {threshold!r}, not a finite number.")


def direction(pos: np.ndarray, neg: np.ndarray, method: str = DEFAULT_METHOD) -> np.ndarray:
    """Gate weights from positive [n_pos, N] and negative [n_neg, N] values."""
    if method not in METHODS:
        raise GateError(f"unknown gate method {method!r}; choose one of {', '.join(METHODS)}.")
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    diff = pos.mean(0) - neg.mean(0)
    if method == "mean_diff":
        return diff
    dof = max(len(pos) + len(neg) - 2, 1)
    pooled = (((pos - pos.mean(0)) ** 2).sum(0) + ((neg - neg.mean(0)) ** 2).sum(0)) / dof
    # a floor at a tenth of the typical variance: a neuron nearly constant on so few prompts would
    # otherwise get a weight out of all proportion to how well it separates unseen ones
    floor = 0.1 * float(np.mean(pooled)) + 1e-12
    return diff / np.maximum(pooled, floor)


def fold_ids(n_pos: int, n_neg: int, folds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each prompt's fold, stratified: every fold holds about the same share of each set."""
    rng = np.random.default_rng(seed)
    return rng.permutation(n_pos) % folds, rng.permutation(n_neg) % folds


def top_by_t(pos: np.ndarray, neg: np.ndarray, k: int) -> np.ndarray:
    """Columns of the k values that separate pos [n, N] from neg [m, N] best by |t|, ascending."""
    return _top_by_t(len(pos), pos.mean(0), pos.var(0), len(neg), neg.mean(0), neg.var(0), k)


def _top_by_t(n_pos, mean_pos, var_pos, n_neg, mean_neg, var_neg, k) -> np.ndarray:
    pooled = (var_pos * n_pos + var_neg * n_neg) / max(n_pos + n_neg - 2, 1)
    t = (mean_pos - mean_neg) / (np.sqrt(pooled) + 1e-6)
    k = min(int(k), t.size)
    return np.sort(np.argpartition(-np.abs(t), k - 1)[:k])


class FoldMoments:
    """Each fold's per-column count, sum and sum of squares (float64) of values [n, N], taken in one pass,
    so the statistics of every fold's training part are the totals less that fold's own: choosing a
    fold's columns over every layer then needs no copy of the other folds' rows (on the 1.5B model a
    fold's copy is 200 MB, and the gate's six fits took 4 s)."""

    def __init__(self, values: np.ndarray, fold: np.ndarray, folds: int):
        self.n = np.array([int(np.sum(fold == f)) for f in range(folds)])
        self.sum = np.zeros((folds, values.shape[1]))
        self.sumsq = np.zeros((folds, values.shape[1]))
        for f in range(folds):
            part = values[fold == f].astype(np.float64)
            self.sum[f] = part.sum(0)
            self.sumsq[f] = np.einsum("ij,ij->j", part, part)

    def without(self, f: int | None) -> tuple[int, np.ndarray, np.ndarray]:
        """(count, mean, population variance) of every fold but f (None: all of them)."""
        keep = np.arange(len(self.n)) != f
        n = int(self.n[keep].sum())
        mean = self.sum[keep].sum(0) / n
        var = np.maximum(self.sumsq[keep].sum(0) / n - mean * mean, 0.0)  # rounding can dip below 0
        return n, mean, var


def top_by_t_folds(pos: np.ndarray, neg: np.ndarray, k: int, folds: int, seed: int):
    """select(f) -> the columns `top_by_t` would choose on every fold but f (None: on all prompts), from
    per-fold moments instead of copies of the prompts' rows; the folds are `out_of_fold_scores`' own for
    the same folds and seed."""
    fold_pos, fold_neg = fold_ids(len(pos), len(neg), folds, seed)
    mp, mn = FoldMoments(pos, fold_pos, folds), FoldMoments(neg, fold_neg, folds)

    def select(f: int | None) -> np.ndarray:
        return _top_by_t(*mp.without(f), *mn.without(f), k)

    return select


def out_of_fold_scores(pos: np.ndarray, neg: np.ndarray, method: str, folds: int, seed: int = 0, select=None,
                       on_fold=None, select_fold=None):
    """Each prompt scored by a gate fitted without it (stratified folds): (pos scores, neg scores, the
    folds' directions). With select(pos, neg) -> columns, each fold also chooses its columns on its own
    training prompts; its direction is then returned over all columns (zero elsewhere). select_fold(f) ->
    columns does the same from the fold's index (`top_by_t_folds`: no copy of the training rows).
    on_fold(): called after each fold (a progress bar's step)."""
    fold_pos, fold_neg = fold_ids(len(pos), len(neg), folds, seed)
    s_pos, s_neg, directions = np.zeros(len(pos)), np.zeros(len(neg)), []
    for f in range(folds):
        train_p, train_n = np.flatnonzero(fold_pos != f), np.flatnonzero(fold_neg != f)
        if select_fold is not None:
            cols = select_fold(f)
        elif select is not None:
            cols = select(pos[train_p], neg[train_n])
        else:
            cols = np.arange(pos.shape[1])
        # only the chosen columns of the training rows are gathered
        w = direction(pos[np.ix_(train_p, cols)], neg[np.ix_(train_n, cols)], method)
        s_pos[fold_pos == f] = pos[np.ix_(np.flatnonzero(fold_pos == f), cols)] @ w
        s_neg[fold_neg == f] = neg[np.ix_(np.flatnonzero(fold_neg == f), cols)] @ w
        if select is not None or select_fold is not None:
            full = np.zeros(pos.shape[1])
            full[cols] = w
            w = full
        directions.append(w)
        if on_fold is not None:
            on_fold()
    return s_pos, s_neg, directions


def auc(s_pos: np.ndarray, s_neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half."""
    greater = (s_pos[:, None] > s_neg[None, :]).mean()
    ties = (s_pos[:, None] == s_neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def choose_threshold(s_pos: np.ndarray, s_neg: np.ndarray, fpr: float) -> float:
    """Of the thresholds midway between consecutive scores, those that let at most `fpr` of the negatives
    through; of those, the one with the largest true-positive rate minus false-positive rate (Youden's J:
    lowering the threshold must buy more positives than it lets negatives through, since a benign prompt
    steered by mistake is the one thing a gate is there to prevent), then the fewest negatives, then the
    one in the widest gap (the margin an unseen prompt gets). `fpr` is a cap, not a target."""
    scores = np.unique(np.concatenate([s_pos, s_neg]))
    if len(scores) < 2:
        return float(scores[0]) + 1.0
    cuts = (scores[:-1] + scores[1:]) / 2
    gaps = np.diff(scores)
    tpr = (s_pos[None, :] >= cuts[:, None]).mean(1)
    fp = (s_neg[None, :] >= cuts[:, None]).mean(1)
    ok = fp <= fpr + 1e-12
    if not ok.any():  # only above every score: nothing fires on these prompts
        return float(scores[-1]) + float(gaps.max())
    best = np.lexsort((-gaps[ok], fp[ok], -np.round(tpr[ok] - fp[ok], 12)))[0]
    return float(cuts[ok][best])


def fit_gate(pos: np.ndarray, neg: np.ndarray, fpr: float = DEFAULT_FPR, method: str = DEFAULT_METHOD,
             folds: int = DEFAULT_FOLDS, seed: int = 0, own: int | None = None, n_ff: int | None = None,
             fpr_strengthen: float | None = DEFAULT_FPR_STRENGTHEN, on_step=None) -> Gate:
    """A gate on values [n, N] at the last prompt token of each positive and negative prompt; its threshold
    lets through at most `fpr` of the negative prompts' out-of-fold scores, its strengthening threshold at
    most `fpr_strengthen` (never below the first; None: no separate strengthening threshold).

    own=None: the values are the mask's neurons'. own=k: the values are whole captured rows (every layer's
    n_ff neurons, layers in order) and the gate reads the k that separate the sets best (`top_by_t`),
    chosen inside each fold for the out-of-fold scores and on all prompts for the gate itself.
    on_step(): called after each of the folds + 1 fits (a progress bar's step: over every layer of a large
    model they take seconds each)."""
    # whole rows (own=k) stay in the float32 they were captured in: every statistic is taken in float64
    # over the columns it needs, so the rows are never copied whole
    keep = own is not None and np.asarray(pos).dtype == np.asarray(neg).dtype == np.float32
    pos, neg = (np.asarray(pos), np.asarray(neg)) if keep else (np.asarray(pos, np.float64), np.asarray(neg, np.float64))
    if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
        raise GateError(f"gate values must be [prompts, neurons] for both sets; got {list(pos.shape)} and {list(neg.shape)}.")
    if not 0.0 <= fpr < 1.0:
        raise GateError(f"the gate's false-positive rate must be in [0, 1), got {fpr}.")
    if fpr_strengthen is not None and not 0.0 <= fpr_strengthen < 1.0:
        raise GateError(f"the gate's false-positive rate for strengthening must be in [0, 1), got {fpr_strengthen}.")
    folds = int(folds)
    if folds < 2 or min(len(pos), len(neg)) < folds:
        raise GateError(f"fitting a gate with {folds} folds needs at least {max(folds, 2)} prompts in each set; "
                        f"got {len(pos)} positive and {len(neg)} negative. Fix: give more prompts, or --no-gate.")
    select = None
    if own is not None:
        if n_ff is None or n_ff <= 0 or pos.shape[1] % n_ff:
            raise GateError(f"a gate over its own neurons needs whole rows of n_ff values; got {pos.shape[1]} values "
                            f"and n_ff {n_ff}.")
        if own < 1:
            raise GateError(f"a gate over its own neurons needs at least 1 neuron, not {own}.")
        select = top_by_t_folds(pos, neg, own, folds, seed)
    s_pos, s_neg, fold_directions = out_of_fold_scores(pos, neg, method, folds, seed, select_fold=select,
                                                       on_fold=on_step)
    threshold = choose_threshold(s_pos, s_neg, fpr)
    strengthen = None
    if fpr_strengthen is not None:
        strengthen = max(threshold, choose_threshold(s_pos, s_neg, fpr_strengthen))
    cols = select(None) if select is not None else np.arange(pos.shape[1])
    w_cols = direction(pos[:, cols], neg[:, cols], method)
    w = np.zeros(pos.shape[1])
    w[cols] = w_cols
    if on_step is not None:
        on_step()
    # how much the direction moves when a fold is left out
    cos = [float(wf @ w / (np.linalg.norm(wf) * np.linalg.norm(w) + 1e-30)) for wf in fold_directions]
    tpr_oof = float((s_pos >= threshold).mean())
    fpr_oof = float((s_neg >= threshold).mean())
    info = {
        "method": method, "fpr_target": fpr, "folds": folds, "seed": seed,
        "n_positive": len(pos), "n_negative": len(neg), "n_neurons": int(len(cols)),
        "neurons": "own: top |t| over every layer" if select is not None else "mask",
        "out_of_fold": {"tpr": round(tpr_oof, 4), "fpr": round(fpr_oof, 4), "auc": round(auc(s_pos, s_neg), 4)},
        "in_sample": {"tpr": round(float(((pos[:, cols] @ w_cols) >= threshold).mean()), 4),
                      "fpr": round(float(((neg[:, cols] @ w_cols) >= threshold).mean()), 4)},
        "fold_cosine_min": round(min(cos), 4),
    }
    if strengthen is not None:
        info["strengthen"] = {"fpr_target": fpr_strengthen, "threshold": float(strengthen),
                              "out_of_fold": {"tpr": round(float((s_pos >= strengthen).mean()), 4),
                                              "fpr": round(float((s_neg >= strengthen).mean()), 4)}}
    if select is None:
        return Gate(w.astype(np.float32), float(threshold), info, threshold_strengthen=strengthen)
    layers, neurons = np.divmod(cols, n_ff)
    return Gate(w_cols.astype(np.float32), float(threshold), info, layers=layers, neurons=neurons,
                threshold_strengthen=strengthen)


def row_columns(layers: np.ndarray, neurons: np.ndarray, n_ff: int) -> np.ndarray:
    """Where the mask's neurons sit in a captured row (every layer's n_ff values, layers in order)."""
    return np.asarray(layers, np.int64) * n_ff + np.asarray(neurons, np.int64)
