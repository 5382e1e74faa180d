"""The steering schedule: which multiplier runs when, and the loop over every prompt.

Prompts are the outer loop and multipliers the inner one, the baseline (mask cleared) first, so a benign
prompt's unsteered reference is made just before the steered runs that are compared with it, and only
one reference is held at a time. The same prompt always starts from an empty KV cache, whatever ran before.
"""

from __future__ import annotations

import sys
import time

from .engine import Engine
from .errors import EvalError
from .measures import measure_benign, measure_capability, measure_harmful
from .refusal import REFUSAL_OPENERS, prefix_free
from .results import BASELINE, MultiplierResult, summarize


def check_fits(engine: Engine, encoded: dict[str, list[list[int]]], budget: dict[str, int], longest_opener: int) -> None:
    """Fail before any prompt runs when a prompt and its reply would not fit in the context."""
    for what, lists in encoded.items():
        for i, ids in enumerate(lists):
            need = len(ids) + max(budget[what], longest_opener)
            if need > engine.n_ctx:
                raise EvalError(f"{what} prompt {i + 1} has {len(ids)} tokens; with {budget[what]} reply tokens it needs a "
                                f"context of {need}, more than n_ctx {engine.n_ctx}. Fix: raise --n-ctx or shorten the prompt.")


def run_schedule(engine: Engine, llm, mask, values, harmful, benign, items, max_tokens, quality_tokens,
         capability_tokens, progress):
    from tqdm.auto import tqdm

    steered = [m for m in values if m != BASELINE]
    states: list[float | None] = [None, *steered]  # None = mask cleared: the baseline
    base = MultiplierResult(BASELINE, baseline=True)
    by_state = {None: base, **{m: MultiplierResult(m, baseline=False) for m in steered}}
    rows = [by_state[None] if m == BASELINE else by_state[m] for m in values]
    if BASELINE not in values:
        rows.insert(0, base)

    openers = prefix_free([engine.tokenize_reply(o) for o in REFUSAL_OPENERS])
    encoded = {
        "harmful": [engine.encode(p) for p in harmful],
        "benign": [engine.encode(p) for p in benign],
        "capability": [engine.encode(it.question) for it in items],
    }
    budget = {"harmful": max_tokens, "benign": quality_tokens, "capability": capability_tokens}
    check_fits(engine, encoded, budget, max((len(o) for o in openers), default=0))

    def steer(state):
        # setting what is already set changes nothing (NeuronSteering compares what llama.cpp would hold)
        if state is None:
            llm.steering.clear()
        else:
            llm.set_mask(mask, state)

    total = len(states) * (len(harmful) + len(benign) + len(items))
    bar = tqdm(total=total, desc="eval", unit="reply", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def timed(state, measure, *args):
        t0 = time.perf_counter()
        steer(state)
        out = measure(*args)
        by_state[state].seconds += time.perf_counter() - t0
        bar.update()
        return out

    try:
        bar.set_description("harmful")
        for prompt, ids in zip(harmful, encoded["harmful"]):
            for state in states:
                by_state[state].harmful.append(timed(state, measure_harmful, engine, prompt, ids, openers, max_tokens))
        bar.set_description("benign")
        for prompt, ids in zip(benign, encoded["benign"]):
            reference = None
            for state in states:  # the baseline first: it makes the reference
                record, made = timed(state, measure_benign, engine, prompt, ids, openers, quality_tokens, reference)
                reference = reference or made
                by_state[state].benign.append(record)
        bar.set_description("capability")
        for item, ids in zip(items, encoded["capability"]):
            for state in states:
                by_state[state].capability.append(timed(state, measure_capability, engine, item, ids, capability_tokens))
    finally:
        bar.close()

    for row in rows:
        row.summary = summarize(row, base)
    return rows, {"opener_tokens": openers}
