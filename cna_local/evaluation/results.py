"""What an evaluation returns: per multiplier the records of every prompt and their summary numbers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

BASELINE = 1.0
"""The multiplier that means "unsteered": run with the mask cleared."""


@dataclass
class MultiplierResult:
    """Everything measured at one multiplier; `summary` holds the aggregate numbers."""

    multiplier: float
    baseline: bool
    harmful: list[dict] = field(default_factory=list)
    benign: list[dict] = field(default_factory=list)
    capability: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)


@dataclass
class EvalResult:
    model: str
    mask: dict
    settings: dict
    rows: list[MultiplierResult]  # in the order asked for; the baseline (multiplier 1) first if not asked for
    seconds: float

    @property
    def baseline(self) -> MultiplierResult:
        return next(r for r in self.rows if r.baseline)

    def row(self, multiplier: float) -> MultiplierResult:
        for r in self.rows:
            if r.multiplier == float(multiplier):
                return r
        raise KeyError(multiplier)

    def summaries(self) -> list[dict]:
        return [{"multiplier": r.multiplier, "baseline": r.baseline, **r.summary} for r in self.rows]

    def to_dict(self, records: bool = True) -> dict:
        rows = []
        for r in self.rows:
            row: dict[str, Any] = {"multiplier": r.multiplier, "baseline": r.baseline, **r.summary}
            if records:
                row["records"] = {"harmful": r.harmful, "benign": r.benign, "capability": r.capability}
            rows.append(row)
        return {"model": self.model, "mask": self.mask, "settings": self.settings, "rows": rows,
                "seconds": round(self.seconds, 2)}


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _gate_rate(records) -> float | None:
    decided = [r["gate"]["fired"] for r in records if "gate" in r]
    return float(np.mean(decided)) if decided else None


def summarize(row: MultiplierResult, baseline: MultiplierResult) -> dict:
    """The aggregate numbers of one multiplier (None where a set was empty or skipped)."""
    h, b, c = row.harmful, row.benign, row.capability
    accuracy = _mean(r["correct"] for r in c)
    base_accuracy = _mean(r["correct"] for r in baseline.capability)
    return {
        "refusal_rate": _mean(r["refused"] for r in h),
        "over_refusal_rate": _mean(r["refused"] for r in b),
        "opener_prob_harmful": _mean(r["opener_prob"] for r in h),
        "opener_prob_benign": _mean(r["opener_prob"] for r in b),
        "opener_seq_prob_harmful": _mean(r["opener_seq_prob"] for r in h),
        "opener_seq_prob_benign": _mean(r["opener_seq_prob"] for r in b),
        "quality_distinct4": _mean(r["distinct4"] for r in b),
        # the reference implementation scores the replies to the harmful prompts it steers: comparable numbers
        "quality_distinct4_harmful": _mean(r["distinct4"] for r in h),
        "quality_likelihood": _mean(r["likelihood_quality"] for r in b),
        "kl_first_token": _mean(r["kl_first_token"] for r in b),
        "degenerate_rate": _mean(r["degenerate"] for r in b),
        # how coherent the replies to the harmful prompts are (what a strong steering breaks first)
        "degenerate_rate_harmful": _mean(r.get("degenerate") for r in h),
        "fluency_nll_harmful": _mean(r.get("fluency_nll") for r in h),
        # the share of each set a gate fired on (None: no gate)
        "gate_rate_harmful": _gate_rate(h),
        "gate_rate_benign": _gate_rate(b),
        "gate_rate_capability": _gate_rate(c),
        "capability_accuracy": accuracy,
        "capability_retention": (accuracy / base_accuracy) if accuracy is not None and base_accuracy else None,
        "n_harmful": len(h),
        "n_benign": len(b),
        "n_capability": len(c),
        "seconds": round(row.seconds, 2),
    }
