"""Choosing a mask's default multiplier per model: the strongest strength that leaves ordinary prompts
alone, measured in the patched llama.cpp on calibration prompts held out of the discovery sets.

The rule: the multiplier furthest from 1 (in the mask's direction: below 1) whose mean likelihood quality
on the calibration benign prompts is >= `min_quality` and whose mean first-token KL is <= `max_kl`, on a
grid of `step` from 1 down to `lowest`. Quality and KL are the evaluation's (quality.py): the steered
model's per-token likelihood of the unsteered greedy replies, and KL(unsteered || steered) of the first
reply token. Both grow as the multiplier moves away from 1, so the grid is bisected (a handful of
strengths, each a teacher-forced pass over the prompts, no generation).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import CnaLocalError

MIN_QUALITY = 0.97
MAX_KL = 0.1
LOWEST = -3.0
STEP = 0.25
REPLY_TOKENS = 64


class CalibrationError(CnaLocalError):
    """The default multiplier could not be calibrated."""


@dataclass
class Calibration:
    chosen: float
    quality: float | None
    kl: float | None
    tried: list[dict] = field(default_factory=list)
    record: dict = field(default_factory=dict)


def grid(lowest: float = LOWEST, step: float = STEP) -> list[float]:
    """Candidate strengths from the weakest (closest to 1) to the strongest."""
    n = int(round((1.0 - lowest) / step))
    return [round(1.0 - step * (i + 1), 6) for i in range(n)]


def strongest_passing(candidates: Sequence[float], passes: Callable[[float], bool]) -> float | None:
    """Bisection for the last candidate that passes, assuming a prefix passes and the rest fails; None if
    the first fails."""
    lo, hi = -1, len(candidates)  # candidates[lo] passes (or lo = -1), candidates[hi] fails (or hi = len)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(candidates[mid]):
            lo = mid
        else:
            hi = mid
    return None if lo < 0 else candidates[lo]


def calibrate(model_path: str | Path, mask, prompts: Sequence[str], *, schedule: str | None = None,
              min_quality: float = MIN_QUALITY, max_kl: float = MAX_KL, lowest: float = LOWEST, step: float = STEP,
              reply_tokens: int = REPLY_TOKENS, batch_size: int = 8, n_threads: int = 2, n_ctx: int = 1024,
              chat_template: bool = True, progress: Callable[[str], None] | None = None,
              prompt_source: str = "") -> Calibration:
    """Calibrate `mask`'s default multiplier on `prompts` (benign, not the held-out ones) of the GGUF model."""
    from .evaluation import quality as Q
    from .evaluation.engine import Engine
    from .runtime import SteeredLlama
    from .schedules import steered_in

    if not prompts:
        raise CalibrationError("no calibration prompts. Fix: keep some negative prompts for calibration, or pass --multiplier.")
    schedule = schedule or getattr(mask, "schedule", "all")
    say = progress or (lambda msg: None)
    started = time.perf_counter()
    llm = SteeredLlama(str(model_path), n_ctx=n_ctx * batch_size, n_seq_max=batch_size, n_threads=n_threads,
                       n_threads_batch=n_threads)
    engine = None
    try:
        llm.set_mask(mask, 1.0, "all")  # checks that the mask belongs to the model before any work
        llm.steering.clear()
        engine = Engine(llm, chat_template=chat_template, batch_size=batch_size, schedule=schedule)
        ids = [engine.encode(p) for p in prompts]
        too_long = [i for i, x in enumerate(ids) if len(x) + reply_tokens > n_ctx]
        if too_long:
            raise CalibrationError(f"calibration prompt {too_long[0] + 1} does not fit in {n_ctx} tokens with its reply. Fix: shorten it.")
        groups = [range(i, min(len(ids), i + batch_size)) for i in range(0, len(ids), batch_size)]
        refs: list[list[int]] = []
        ref_nll: list[float | None] = []
        ref_lp: list[np.ndarray] = []
        for g in groups:  # the unsteered replies, their likelihood and first-token distributions
            ps = engine.start([ids[i] for i in g])
            replies = engine.greedy(ps, reply_tokens)
            refs += replies
            ref_nll += engine.mean_nll(ps, replies)
            ref_lp += [p.logprobs for p in ps]
        say(f"calibration: unsteered replies to {len(ids)} prompts ({time.perf_counter() - started:.0f} s)")

        tried: dict[float, dict] = {}

        def measure(m: float) -> dict:
            t0 = time.perf_counter()
            engine.phase = lambda name: llm.set_mask(mask, m if steered_in(schedule, name) else 1.0, "all")
            qs, kls = [], []
            for g in groups:
                ps = engine.start([ids[i] for i in g])
                nll = engine.mean_nll(ps, [refs[i] for i in g])
                for i, p, n in zip(g, ps, nll):
                    kls.append(Q.first_token_kl(ref_lp[i], p.logprobs))
                    if n is not None:
                        qs.append(Q.likelihood_quality(n, ref_nll[i]))
            row = {"multiplier": m, "quality": float(np.mean(qs)) if qs else None, "kl": float(np.mean(kls)),
                   "seconds": round(time.perf_counter() - t0, 1)}
            row["passes"] = (row["quality"] is None or row["quality"] >= min_quality) and row["kl"] <= max_kl
            tried[m] = row
            say(f"calibration: multiplier {m:g}: quality {row['quality']:.3f}, KL {row['kl']:.3f} "
                f"-> {'ok' if row['passes'] else 'too strong'} ({row['seconds']:.0f} s)")
            return row

        candidates = grid(lowest, step)
        chosen = strongest_passing(candidates, lambda m: measure(m)["passes"])
    finally:
        if engine is not None:
            engine.close()
        llm.close()
    if chosen is None:
        raise CalibrationError(
            f"even multiplier {candidates[0]:g} moves the calibration prompts past quality {min_quality} / KL {max_kl}: "
            "this mask changes ordinary replies at any strength. Fix: make a smaller or more selective mask "
            "(--top-k, --score selective), or pass --multiplier to choose a strength yourself.")
    best = tried[chosen]
    record = {
        "rule": f"strongest multiplier with likelihood quality >= {min_quality:g} and first-token KL <= {max_kl:g}",
        "chosen": chosen, "quality": round(best["quality"], 4) if best["quality"] is not None else None,
        "kl": round(best["kl"], 4), "n_prompts": len(ids), "prompts": prompt_source, "reply_tokens": reply_tokens,
        "grid": f"1 - {step:g} k down to {lowest:g}, bisected", "schedule": schedule,
        "tried": [tried[m] for m in sorted(tried, reverse=True)],
        "seconds": round(time.perf_counter() - started, 1),
    }
    if math.isclose(chosen, lowest):
        record["note"] = f"the strongest candidate ({lowest:g}) still passes; stronger ones were not tried"
    return Calibration(chosen, best["quality"], best["kl"], record["tried"], record)
