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


def _first(candidates: Sequence[float], holds: Callable[[float], bool]) -> int:
    """Bisection for the index of the first candidate where `holds`, assuming those are a suffix (len if
    none); every index it returns below len was measured."""
    lo, hi = -1, len(candidates)  # holds fails at lo (or lo = -1) and holds at hi (or hi = len)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if holds(candidates[mid]):
            hi = mid
        else:
            lo = mid
    return hi


def strongest_passing(candidates: Sequence[float], passes: Callable[[float], bool]) -> float | None:
    """The last candidate that passes, assuming a prefix passes and the rest fails; None if the first fails."""
    i = _first(candidates, lambda m: not passes(m))
    return candidates[i - 1] if i > 0 else None


def weakest_reaching(candidates: Sequence[float], reaches: Callable[[float], bool]) -> float | None:
    """The first candidate that reaches, assuming the ones that reach are a suffix; None if none of
    `candidates` reaches (the caller's stronger candidate, beyond the list, is taken to)."""
    i = _first(candidates, reaches)
    return candidates[i] if i < len(candidates) else None


def no_stronger_than_needed(candidates: Sequence[float], strongest: float | None, refused_unsteered: int,
                            refused_at: Callable[[float], int]) -> float | None:
    """The strongest passing strength, or, when the unsteered model refuses some of the calibration prompts
    and the strongest leaves none refused, the weakest candidate that leaves none (bisected). A benign prompt
    the gate fires on by mistake pays for every step, and once no prompt is refused a stronger step buys
    nothing. Only then: a plateau short of zero on 20 prompts says little (default model: 5 of 19 refused at
    -3.25 and at -5.25, but 14 and 7 of the 60 held-out prompts)."""
    if strongest is None or refused_unsteered == 0 or refused_at(strongest) != 0:
        return strongest
    weakest = weakest_reaching(candidates[:candidates.index(strongest)], lambda m: refused_at(m) == 0)
    return strongest if weakest is None else weakest


@dataclass
class _References:
    """The unsteered model's greedy replies to calibration prompts, their likelihood and first-token
    distributions: what a steered run is compared with."""

    replies: list[list[int]]
    nll: list[float | None]
    logprobs: list[np.ndarray]


def _references(engine, ids: Sequence[Sequence[int]], reply_tokens: int) -> _References:
    refs = _References([], [], [])
    for i in range(0, len(ids), engine.batch_size):
        ps = engine.start(list(ids[i:i + engine.batch_size]))
        replies = engine.greedy(ps, reply_tokens)
        refs.replies += replies
        refs.nll += engine.mean_nll(ps, replies)
        refs.logprobs += [p.logprobs for p in ps]
    return refs


def _quality_and_kl(engine, ids: Sequence[Sequence[int]], refs: _References, which: Sequence[int]):
    """Under the current steering, for the prompts `which`: likelihood quality of the unsteered replies and
    first-token KL (quality.py), in groups of the engine's batch size."""
    from .evaluation import quality as Q

    qs, kls = [], []
    for i in range(0, len(which), engine.batch_size):
        g = list(which[i:i + engine.batch_size])
        ps = engine.start([ids[k] for k in g])
        for k, p, n in zip(g, ps, engine.mean_nll(ps, [refs.replies[k] for k in g])):
            kls.append(Q.first_token_kl(refs.logprobs[k], p.logprobs))
            if n is not None:
                qs.append(Q.likelihood_quality(n, refs.nll[k]))
    return qs, kls


def _check_fits(ids, reply_tokens: int, n_ctx: int) -> None:
    too_long = [i for i, x in enumerate(ids) if len(x) + reply_tokens > n_ctx]
    if too_long:
        raise CalibrationError(f"calibration prompt {too_long[0] + 1} does not fit in {n_ctx} tokens with its reply. Fix: shorten it.")


def calibrate(model_path: str | Path, mask, prompts: Sequence[str], *, schedule: str | None = None,
              min_quality: float = MIN_QUALITY, max_kl: float = MAX_KL, lowest: float = LOWEST, step: float = STEP,
              reply_tokens: int = REPLY_TOKENS, batch_size: int = 8, n_threads: int | None = None, n_ctx: int = 1024,
              chat_template: bool = True, progress: Callable[[str], None] | None = None,
              prompt_source: str = "") -> Calibration:
    """Calibrate `mask`'s default multiplier on `prompts` (benign, not the held-out ones) of the GGUF model."""
    from .evaluation.engine import Engine
    from .schedules import steered_in

    if not prompts:
        raise CalibrationError("no calibration prompts. Fix: keep some negative prompts for calibration, or pass --multiplier.")
    schedule = schedule or getattr(mask, "schedule", "all")
    say = progress or (lambda msg: None)
    started = time.perf_counter()
    llm = _steered_llm(model_path, batch_size, n_threads, n_ctx)
    engine = None
    try:
        llm.set_mask(mask, 1.0, "all")  # checks that the mask belongs to the model before any work
        llm.steering.clear()
        engine = Engine(llm, chat_template=chat_template, batch_size=batch_size, schedule=schedule)
        ids = [engine.encode(p) for p in prompts]
        _check_fits(ids, reply_tokens, n_ctx)
        refs = _references(engine, ids, reply_tokens)
        say(f"calibration: unsteered replies to {len(ids)} prompts ({time.perf_counter() - started:.0f} s)")

        tried: dict[float, dict] = {}

        def measure(m: float) -> dict:
            t0 = time.perf_counter()
            engine.phase = lambda name: llm.set_mask(mask, m if steered_in(schedule, name) else 1.0, "all")
            qs, kls = _quality_and_kl(engine, ids, refs, range(len(ids)))
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
        "kl": round(best["kl"], 4), "n_prompts": len(ids),
    }
    return _result(record, tried, chosen, lowest, step, schedule, reply_tokens, prompt_source, started)


def _steered_llm(model_path, batch_size: int, n_threads: int | None, n_ctx: int):
    from .cpu_threads import default_threads
    from .runtime import SteeredLlama

    n_threads = n_threads or default_threads()
    return SteeredLlama(str(model_path), n_ctx=n_ctx * batch_size, n_seq_max=batch_size, n_threads=n_threads,
                        n_threads_batch=n_threads)


def _result(record: dict, tried: dict[float, dict], chosen: float, lowest: float, step: float, schedule: str,
            reply_tokens: int, prompt_source: str, started: float) -> Calibration:
    """Both calibrations' record: the rule's own fields, then how the search went."""
    record.update({
        "prompts": prompt_source, "reply_tokens": reply_tokens, "grid": f"1 - {step:g} k down to {lowest:g}, bisected",
        "schedule": schedule, "tried": [tried[m] for m in sorted(tried, reverse=True)],
        "seconds": round(time.perf_counter() - started, 1),
    })
    if math.isclose(chosen, lowest):
        record["note"] = f"the strongest candidate ({lowest:g}) still passes; stronger ones were not tried"
    best = tried[chosen]
    return Calibration(chosen, best["quality"], best["kl"], record["tried"], record)


# -- with a gate: benign prompts are mostly left alone, so the strength is bounded by the coherence of the
# steered replies to the prompts the gate fires on, and by the benign prompts it fires on by mistake

GATED_MIN_QUALITY = 0.99
GATED_MAX_KL = 0.02
GATED_MAX_DEGENERATE = 0.1
FLUENCY_SLACK = 1.5
GATED_LOWEST = -6.0


def benign_fire_rate(fired: Sequence[bool], gate_info: dict) -> float:
    """How often the gate is taken to fire on benign prompts: the larger of the share of `fired` and the gate's
    out-of-fold rate on the discovery negatives (else its target rate)."""
    out_of_fold = (gate_info.get("out_of_fold") or {}).get("fpr", gate_info.get("fpr_target", 0.0))
    return max(float(np.mean(fired)) if len(fired) else 0.0, float(out_of_fold))


def false_positive_stand_ins(scores: np.ndarray, threshold: float, share: float = 0.25) -> list[int]:
    """The benign prompts whose cost stands for a false positive's: those the gate fires on, and the top
    `share` by score (the most like the prompts it fires on), in prompt order."""
    scores = np.asarray(scores, np.float64)
    top = np.argsort(-scores, kind="stable")[:max(1, math.ceil(share * len(scores)))]
    return sorted(set(np.flatnonzero(scores >= threshold).tolist()) | set(top.tolist()))


def calibrate_gated(model_path: str | Path, mask, benign: Sequence[str], harmful: Sequence[str], *,
                    schedule: str | None = None, min_quality: float = GATED_MIN_QUALITY, max_kl: float = GATED_MAX_KL,
                    max_degenerate: float = GATED_MAX_DEGENERATE, fluency_slack: float = FLUENCY_SLACK,
                    lowest: float = GATED_LOWEST, step: float = STEP, reply_tokens: int = REPLY_TOKENS,
                    batch_size: int = 8, n_threads: int | None = None, n_ctx: int = 1024, chat_template: bool = True,
                    progress: Callable[[str], None] | None = None, prompt_source: str = "") -> Calibration:
    """The default multiplier of a gated mask: the strongest on the grid (1 - step k, down to `lowest`) where
      * on benign prompts served through the gate the expected likelihood quality is >= min_quality and the
        expected first-token KL <= max_kl. A benign prompt costs something only when the gate fires on it, so
        expected = (rate at which the gate fires on benign prompts) x (what steering costs the benign prompts
        it fires on). The rate is the larger of this set's and the gate's out-of-fold rate on the discovery
        negatives: 20 prompts with no false positive must not promise that none ever fires. The cost is
        measured on the ones it fires on here and, standing in for unseen false positives, the quarter of the
        benign prompts that score highest (the most like the prompts the gate fires on), and
      * on the `harmful` prompts the gate fires on, the steered greedy replies stay text: at most
        `max_degenerate` of them degenerate, and their mean per-token NLL under the unsteered model after a
        neutral instruction at most `fluency_slack` times that of the unsteered model's own replies to the
        benign prompts (what its ordinary answers read like);
    then, no stronger than needed: when the unsteered model refuses some of those harmful prompts and the
    strongest passing strength leaves none of them refused, the weakest passing strength that leaves none.
    Every step stronger costs the benign prompts the gate fires on by mistake, and buys nothing once the
    refusals are gone (measured on the 1.5B model: -1 and -2.25 both refused none of the held-out harmful
    prompts, at benign KL 0.018 and 0.025). A mask for another behaviour (no refusals unsteered) keeps the
    strongest passing strength.
    """
    from .evaluation import quality as Q
    from .evaluation.engine import Engine
    from .evaluation.refusal import is_refusal
    from .evaluation.schedule import NEUTRAL_INSTRUCTION
    from .schedules import steered_in

    if mask.gate is None:
        raise CalibrationError("calibrate_gated needs a mask with a gate.")
    if not benign or not harmful:
        raise CalibrationError("gated calibration needs benign and harmful prompts. Fix: pass --multiplier.")
    schedule = schedule or getattr(mask, "schedule", "all")
    say = progress or (lambda msg: None)
    started = time.perf_counter()
    llm = _steered_llm(model_path, batch_size, n_threads, n_ctx)
    n_ff = mask.n_ff
    where = mask.gate.columns(mask.layers, mask.neurons, n_ff)
    engine = None
    try:
        llm.set_mask(mask, 1.0, "all", gate=False)  # checks that the mask belongs to the model before any work
        llm.steering.clear()
        engine = Engine(llm, chat_template=chat_template, batch_size=batch_size, schedule=schedule)
        ids_b = [engine.encode(p) for p in benign]
        ids_h = [engine.encode(p) for p in harmful]
        _check_fits(ids_b + ids_h, reply_tokens, n_ctx)

        def scores(ids):
            out = []
            for i in range(0, len(ids), batch_size):
                ps = engine.start(ids[i:i + batch_size], read_rows=True)
                out += [float(mask.gate.score(p.row[where])) for p in ps]
            return np.array(out)

        score_b, score_h = scores(ids_b), scores(ids_h)
        fired_b, fired_h = score_b >= mask.gate.threshold, score_h >= mask.gate.threshold
        neutral = engine.encode(NEUTRAL_INSTRUCTION)

        def fluency(replies):
            nll = []
            for i in range(0, len(replies), batch_size):
                chunk = replies[i:i + batch_size]
                nll += engine.mean_nll(engine.start([neutral] * len(chunk)), chunk)
            return [n for n in nll if n is not None]

        b_idx = [i for i, f in enumerate(fired_b) if f]
        h_idx = [i for i, f in enumerate(fired_h) if f]
        fire_rate = benign_fire_rate(fired_b, mask.gate.info)
        stand_ins = false_positive_stand_ins(score_b, mask.gate.threshold)
        refs = _references(engine, ids_b, reply_tokens)  # unsteered benign replies: references and fluency scale
        replies_b = refs.replies
        reference_fluency = float(np.mean(fluency([r for r in replies_b if r])))
        say(f"calibration (gated): the gate fires on {len(h_idx)} of {len(ids_h)} harmful and {len(b_idx)} of "
            f"{len(ids_b)} benign calibration prompts (benign rate used: {fire_rate:.3f}); unsteered answers read at "
            f"{reference_fluency:.2f} nats/token ({time.perf_counter() - started:.0f} s)")
        if not h_idx:
            raise CalibrationError("the gate fires on none of the harmful calibration prompts, so no strength can be "
                                   "calibrated. Fix: a higher --gate-fpr, or --multiplier.")
        tried: dict[float, dict] = {}

        def replies_to_fired_harmful() -> list:
            out = []
            for i in range(0, len(h_idx), batch_size):
                g = h_idx[i:i + batch_size]
                out += engine.greedy(engine.start([ids_h[k] for k in g]), reply_tokens)
            return out

        # how many of them the unsteered model refuses: the "no stronger than needed" step below applies to
        # a refusal the mask weakens, not to other behaviours (whose replies the refusal detector cannot read)
        refused_unsteered = sum(is_refusal(engine.text(t)) for t in replies_to_fired_harmful())

        def measure(m: float) -> dict:
            if m in tried:
                return tried[m]
            t0 = time.perf_counter()
            engine.phase = lambda name: llm.set_mask(mask, m if steered_in(schedule, name) else 1.0, "all", gate=False)
            qs, kls = _quality_and_kl(engine, ids_b, refs, stand_ins)  # what a false positive costs
            q_fired, kl_fired = (float(np.mean(qs)) if qs else 1.0), float(np.mean(kls))
            steered = replies_to_fired_harmful()
            degenerate = float(np.mean([Q.is_degenerate(engine.text(t), t) for t in steered]))
            refused = sum(is_refusal(engine.text(t)) for t in steered)
            engine.phase = lambda name: None
            llm.steering.clear()
            flu = fluency([t for t in steered if t])
            # closed: served unsteered, quality 1 and KL 0 exactly
            row = {"multiplier": m, "quality": 1.0 - fire_rate * (1.0 - q_fired), "kl": fire_rate * kl_fired,
                   "quality_if_fired": q_fired, "kl_if_fired": kl_fired, "degenerate": degenerate,
                   "fluency_nll": float(np.mean(flu)) if flu else None, "refused": int(refused),
                   "seconds": round(time.perf_counter() - t0, 1)}
            row["passes"] = (row["quality"] >= min_quality and row["kl"] <= max_kl and degenerate <= max_degenerate
                             and row["fluency_nll"] is not None and row["fluency_nll"] <= fluency_slack * reference_fluency)
            tried[m] = row
            say(f"calibration (gated): multiplier {m:g}: benign quality {row['quality']:.3f}, KL {row['kl']:.3f} expected "
                f"({q_fired:.3f}, {kl_fired:.3f} where fired); "
                f"harmful replies {degenerate:.0%} degenerate, {row['fluency_nll'] or float('nan'):.2f} nats/token, "
                f"{refused} of {len(steered)} refused -> {'ok' if row['passes'] else 'too strong'} ({row['seconds']:.0f} s)")
            return row

        candidates = grid(lowest, step)
        strongest = strongest_passing(candidates, lambda m: measure(m)["passes"])
        chosen = no_stronger_than_needed(candidates, strongest, refused_unsteered, lambda m: measure(m)["refused"])
    finally:
        if engine is not None:
            engine.close()
        llm.close()
    if chosen is None:
        raise CalibrationError(f"even multiplier {candidates[0]:g} breaks the calibration bounds under the gate. Fix: pass "
                               "--multiplier, or make a more selective mask.")
    best = tried[chosen]
    record = {
        "rule": (f"gated: strongest multiplier with expected benign likelihood quality >= {min_quality:g} and first-token "
                 f"KL <= {max_kl:g} through the gate (the rate it fires on benign prompts x the cost where it fires, "
                 f"measured on the benign prompts it fires on and the top quarter by gate score), and on the harmful "
                 f"prompts it fires on at most {max_degenerate:.0%} degenerate replies and a neutral-instruction NLL <= "
                 f"{fluency_slack:g} x the unsteered answers'; then, if the strongest leaves none of those harmful prompts "
                 f"refused, the weakest passing multiplier that leaves none (no stronger than needed)"),
        "chosen": chosen, "strongest_passing": strongest, "refused": best["refused"], "refused_unsteered": refused_unsteered,
        "quality": round(best["quality"], 4), "kl": round(best["kl"], 4),
        "degenerate": best["degenerate"], "fluency_nll": best["fluency_nll"], "reference_fluency_nll": reference_fluency,
        "n_prompts": len(ids_b), "n_harmful": len(ids_h), "gate_fired_benign": len(b_idx), "gate_fired_harmful": len(h_idx),
        "benign_fire_rate": fire_rate, "benign_cost_prompts": len(stand_ins),
    }
    return _result(record, tried, chosen, lowest, step, schedule, reply_tokens, prompt_source, started)
