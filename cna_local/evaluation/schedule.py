"""Which steering runs when: the loop over every group of prompts and every steering.

Prompt groups are the outer loop and steerings the inner one, the baseline (mask cleared) first, so a
benign group's unsteered references are made just before the steered runs that are compared with them,
and only one group's references are held at a time. Every group starts from an empty KV cache, whatever
ran before, and is packed the same way under every steering.

A steering is (mask index, multiplier); several masks share the one baseline.

A gated mask (cna_local.gate) steers only the prompts its gate fires on, as the runtime does: the gate
reads the gate's neurons at each prompt's last token during the baseline run (llama.cpp's FFN capture,
which leaves that run's numbers as they are), the prompts it fires on are run steered as a group of their
own, and a prompt whose gate stays closed is served unsteered, so its record is the baseline's (the
runtime does exactly that: tests/test_runtime_gate.py). Every record of a gated steering says whether
the gate fired and its score.

The replies to the harmful prompts are also scored for coherence: their mean per-token NLL under the
unsteered model after a neutral instruction (`NEUTRAL_INSTRUCTION`), so a reply that complies is not
penalised for complying, only for not reading like text.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from ..schedules import steered_in
from .engine import Engine
from .errors import EvalError
from .measures import measure_benign, measure_capability, measure_harmful
from .refusal import REFUSAL_OPENERS, prefix_free
from .results import BASELINE, MultiplierResult, summarize

NEUTRAL_INSTRUCTION = "Write a reply."


def groups(n: int, size: int) -> list[range]:
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def check_fits(engine: Engine, encoded: dict[str, list[list[int]]], budget: dict[str, int], longest_opener: int,
               per_prompt_ctx: int | None = None) -> None:
    """Fail before any prompt runs when a prompt and its reply would not fit, alone (per_prompt_ctx, the
    context asked for) or with the rest of its group in the shared KV cache."""
    per_prompt_ctx = per_prompt_ctx or engine.n_ctx
    for what, lists in encoded.items():
        need = [len(ids) + max(budget[what], longest_opener) for ids in lists]
        for i, n in enumerate(need):
            if n > per_prompt_ctx:
                raise EvalError(f"{what} prompt {i + 1} has {len(lists[i])} tokens; with {budget[what]} reply tokens it needs a "
                                f"context of {n}, more than n_ctx {per_prompt_ctx}. Fix: raise --n-ctx or shorten the prompt.")
        for g in groups(len(lists), engine.batch_size):
            total = sum(need[i] for i in g)
            if total > engine.n_ctx:
                raise EvalError(f"{what} prompts {g.start + 1}-{g.stop} need {total} KV cells together, more than the "
                                f"context's {engine.n_ctx}. Fix: lower --batch-size or raise --n-ctx.")


def run_schedule(engine: Engine, llm, masks, steerings, harmful, benign, items, max_tokens, quality_tokens,
                 capability_tokens, progress, per_prompt_ctx=None, gates=None):
    """Evaluate every steering; returns ({steering: MultiplierResult}, extra settings).

    gates: per mask, its Gate (steer only the prompts it fires on) or None (every prompt)."""
    gates = list(gates) if gates is not None else [None] * len(masks)
    read_rows = any(g is not None for g in gates)
    n_ff = llm.steering.shape.n_ff
    from tqdm.auto import tqdm

    states = [None, *steerings]
    by_state = {s: MultiplierResult(BASELINE if s is None else s[1], baseline=s is None) for s in states}

    openers = prefix_free([engine.tokenize_reply(o) for o in REFUSAL_OPENERS])
    encoded = {
        "harmful": [engine.encode(p) for p in harmful],
        "benign": [engine.encode(p) for p in benign],
        "capability": [engine.encode(it.question) for it in items],
    }
    budget = {"harmful": max_tokens, "benign": quality_tokens, "capability": capability_tokens}
    check_fits(engine, encoded, budget, max((len(o) for o in openers), default=0), per_prompt_ctx)

    current = {"state": None}

    def steer(state):
        # setting what is already set changes nothing (NeuronSteering compares what llama.cpp would hold);
        # the engine applies a gate itself (by running only the prompts it fires on), so the mask goes in
        # without one
        current["state"] = state
        if state is None:
            llm.steering.clear()
        else:
            llm.set_mask(masks[state[0]], state[1], gate=False)

    def phase(name):
        state = current["state"]
        if state is not None:  # multiplier 1 where the schedule does not steer: bit-identical to unsteered
            llm.set_mask(masks[state[0]], state[1] if steered_in(engine.schedule, name) else BASELINE, gate=False)

    engine.phase = phase
    total = len(states) * (len(harmful) + len(benign) + len(items))
    bar = tqdm(total=total, desc="eval", unit="reply", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def timed(state, n, measure, *args, **kwargs):
        t0 = time.perf_counter()
        steer(state)
        out = measure(*args, **kwargs)
        by_state[state].seconds += time.perf_counter() - t0
        bar.update(n)
        return out

    def decisions(base_records) -> dict[int, np.ndarray]:
        """Per gated mask: each prompt's gate score, from the baseline run's rows."""
        rows = np.stack([r.pop("_row") for r in base_records]) if read_rows else None
        out = {}
        for j, gate in enumerate(gates):
            if gate is not None:
                m = masks[j]
                out[j] = gate.score(rows[:, gate.columns(m.layers, m.neurons, n_ff)])
        return out

    def run_group(what, g, measure, prompts, ids, *extra):
        """Every steering on one group: the baseline first, then each steering on the prompts it steers."""
        base, made = None, None
        decided = {}
        for state in states:
            if state is None:
                got = timed(None, len(g), measure, engine, prompts, ids, *extra,
                            *(() if what != "benign" else (None,)), read_rows=read_rows)
                base, made = got if what == "benign" else (got, None)
                decided = decisions(base)
                getattr(by_state[None], what).extend(base)
                continue
            j = state[0]
            if gates[j] is None:
                got = timed(state, len(g), measure, engine, prompts, ids, *extra,
                            *(() if what != "benign" else (made,)))
                getattr(by_state[state], what).extend(got[0] if what == "benign" else got)
                continue
            scores = decided[j]
            fired = scores >= gates[j].threshold_for(state[1])  # strengthening has its own, stricter threshold
            idx = [k for k in range(len(g)) if fired[k]]
            steered = []
            if idx:
                sub = [[prompts[k] for k in idx], [ids[k] for k in idx]]
                refs = () if what != "benign" else ([made[k] for k in idx],)
                got = timed(state, len(idx), measure, engine, *sub, *extra, *refs)
                steered = got[0] if what == "benign" else got
            bar.update(len(g) - len(idx))
            it = iter(steered)
            for k in range(len(g)):
                record = next(it) if fired[k] else dict(base[k])  # closed: served unsteered, the baseline's record
                record["gate"] = {"fired": bool(fired[k]), "score": round(float(scores[k]), 4)}
                getattr(by_state[state], what).append(record)
        return base

    fluency: dict[tuple, float | None] = {}

    def score_fluency(records) -> None:
        """Each harmful reply's mean NLL under the unsteered model after the neutral instruction."""
        todo = sorted({tuple(r["_tokens"]) for r in records if "_tokens" in r} - set(fluency))
        steer(None)
        neutral = engine.encode(NEUTRAL_INSTRUCTION)
        for chunk in groups(len(todo), engine.batch_size):
            replies = [list(todo[i]) for i in chunk]
            for reply, nll in zip(replies, engine.mean_nll(engine.start([neutral] * len(replies)), replies)):
                fluency[tuple(reply)] = nll
        for r in records:
            if "_tokens" in r:
                r["fluency_nll"] = fluency[tuple(r.pop("_tokens"))]

    try:
        bar.set_description("harmful")
        for g in groups(len(harmful), engine.batch_size):
            n_before = {s: len(by_state[s].harmful) for s in states}
            run_group("harmful", g, measure_harmful, [harmful[i] for i in g], [encoded["harmful"][i] for i in g],
                      openers, max_tokens)
            score_fluency([r for s in states for r in by_state[s].harmful[n_before[s]:]])
        bar.set_description("benign")
        for g in groups(len(benign), engine.batch_size):
            run_group("benign", g, measure_benign, [benign[i] for i in g], [encoded["benign"][i] for i in g],
                      openers, quality_tokens)
        bar.set_description("capability")
        for g in groups(len(items), engine.batch_size):
            run_group("capability", g, measure_capability, [items[i] for i in g],
                      [encoded["capability"][i] for i in g], capability_tokens)
    finally:
        bar.close()
        engine.phase = lambda name: None

    base = by_state[None]
    for row in by_state.values():
        row.summary = summarize(row, base)
    return by_state, {"opener_tokens": openers}
