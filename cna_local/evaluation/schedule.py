"""Which steering runs when: the loop over every group of prompts and every steering.

Prompt groups are the outer loop and steerings the inner one, the baseline (mask cleared) first, so a
benign group's unsteered references are made just before the steered runs that are compared with them,
and only one group's references are held at a time. Every group starts from an empty KV cache, whatever
ran before, and is packed the same way under every steering.

A steering is (mask index, multiplier); several masks share the one baseline.
"""

from __future__ import annotations

import sys
import time

from ..schedules import steered_in
from .engine import Engine
from .errors import EvalError
from .measures import measure_benign, measure_capability, measure_harmful
from .refusal import REFUSAL_OPENERS, prefix_free
from .results import BASELINE, MultiplierResult, summarize



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
                 capability_tokens, progress, per_prompt_ctx=None):
    """Evaluate every steering; returns ({steering: MultiplierResult}, extra settings)."""
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
        # setting what is already set changes nothing (NeuronSteering compares what llama.cpp would hold)
        current["state"] = state
        if state is None:
            llm.steering.clear()
        else:
            llm.set_mask(masks[state[0]], state[1])

    def phase(name):
        state = current["state"]
        if state is not None:  # multiplier 1 where the schedule does not steer: bit-identical to unsteered
            llm.set_mask(masks[state[0]], state[1] if steered_in(engine.schedule, name) else BASELINE)

    engine.phase = phase
    total = len(states) * (len(harmful) + len(benign) + len(items))
    bar = tqdm(total=total, desc="eval", unit="reply", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def timed(state, n, measure, *args):
        t0 = time.perf_counter()
        steer(state)
        out = measure(*args)
        by_state[state].seconds += time.perf_counter() - t0
        bar.update(n)
        return out

    try:
        bar.set_description("harmful")
        for g in groups(len(harmful), engine.batch_size):
            for state in states:
                by_state[state].harmful += timed(state, len(g), measure_harmful, engine, [harmful[i] for i in g],
                                                 [encoded["harmful"][i] for i in g], openers, max_tokens)
        bar.set_description("benign")
        for g in groups(len(benign), engine.batch_size):
            references = None
            for state in states:  # the baseline first: it makes the references
                records, made = timed(state, len(g), measure_benign, engine, [benign[i] for i in g],
                                      [encoded["benign"][i] for i in g], openers, quality_tokens, references)
                references = references or made
                by_state[state].benign += records
        bar.set_description("capability")
        for g in groups(len(items), engine.batch_size):
            for state in states:
                by_state[state].capability += timed(state, len(g), measure_capability, engine, [items[i] for i in g],
                                                    [encoded["capability"][i] for i in g], capability_tokens)
    finally:
        bar.close()
        engine.phase = lambda name: None

    base = by_state[None]
    for row in by_state.values():
        row.summary = summarize(row, base)
    return by_state, {"opener_tokens": openers}
