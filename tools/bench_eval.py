"""Benchmark: the evaluation one prompt at a time against batched (several prompts per llama_decode),
side by side in one run, on one model and mask.

    python tools/bench_eval.py --mask refusal.gguf [--model default] [--limit 16] [--batch-sizes 1,8]
    python tools/bench_eval.py --decode-rates      # only: ms per decode step with 1..64 sequences

For each batch size: wall time of `evaluate` (the same prompts, multipliers and token budgets as
`cna-local eval`), and against the first batch size: how many greedy replies differ (per set and
multiplier), the largest differences of the per-prompt numbers, and the largest next-token logit
difference after each prompt (prompts decoded alone against in a group), unsteered and steered.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import cpu_name  # noqa: E402

NUMBERS = ("opener_prob", "opener_seq_prob", "kl_first_token", "likelihood_quality")


def compare(a, b) -> dict:
    """Differences between two EvalResults of the same prompts and multipliers."""
    out = {}
    for ra, rb in zip(a.rows, b.rows):
        for what in ("harmful", "benign", "capability"):
            xa, xb = getattr(ra, what), getattr(rb, what)
            if not xa:
                continue
            d = {"answers_differ": sum(p["answer"] != q["answer"] for p, q in zip(xa, xb)), "of": len(xa)}
            for key in NUMBERS:
                pairs = [(p[key], q[key]) for p, q in zip(xa, xb) if p.get(key) is not None and q.get(key) is not None]
                if pairs:
                    d[f"max_abs_diff_{key}"] = max(abs(p - q) for p, q in pairs)
            out[f"{what} m={ra.multiplier:g}"] = d
        out[f"summary m={ra.multiplier:g}"] = {k: (ra.summary[k], rb.summary[k]) for k in
                                               ("refusal_rate", "over_refusal_rate", "quality_likelihood",
                                                "kl_first_token", "capability_accuracy")}
    return out


def logit_gap(model, mask, prompts, batch_size: int, threads: int) -> dict:
    """Largest |logit difference| after each prompt: decoded alone against in groups of batch_size."""
    from cna_local.evaluation.engine import Engine
    from cna_local.runtime import SteeredLlama

    llm = SteeredLlama(str(model), n_ctx=2048 * batch_size, n_seq_max=batch_size, n_threads=threads,
                       n_threads_batch=threads)
    out = {}
    try:
        for label, m in (("unsteered", None), ("steered", mask.multiplier)):
            if m is None:
                llm.steering.clear()
            else:
                llm.set_mask(mask, m)
            one = Engine(llm, batch_size=1)
            ids = [one.encode(p) for p in prompts]
            alone = [one.start([x])[0].logits for x in ids]
            one.close()
            many = Engine(llm, batch_size=batch_size)
            grouped = []
            for i in range(0, len(ids), batch_size):
                grouped += [p.logits for p in many.start(ids[i:i + batch_size])]
            many.close()
            gaps = [float(np.abs(a - b).max()) for a, b in zip(alone, grouped)]
            out[label] = {"max": max(gaps), "median": float(np.median(gaps)),
                          "argmax_differs": sum(int(np.argmax(a) != np.argmax(b)) for a, b in zip(alone, grouped))}
    finally:
        llm.close()
    return out


def decode_rates(model, threads: int, sizes=(1, 4, 8, 16, 32, 64), steps: int = 8) -> dict:
    """What batching can gain at most: ms per decode step with B sequences (one token each, logits for
    each), and the rate of a 256-token prompt with logits at its last / every position."""
    from cna_local.evaluation.engine import Engine, _Segment
    from cna_local.runtime import SteeredLlama

    llm = SteeredLlama(str(model), n_ctx=64 * max(sizes), n_seq_max=max(sizes), n_threads=threads, n_threads_batch=threads)
    out = {}
    try:
        e = Engine(llm, batch_size=max(sizes))
        prompt = e.encode("Hello")
        for b in sizes:
            ps = e.start([prompt] * b)
            t0 = time.perf_counter()
            for s in range(steps):
                e._run([_Segment(p.seq, len(prompt) + s, [prompt[-1]], "last") for p in ps], lambda *a: None)
            ms = (time.perf_counter() - t0) / steps * 1000
            out[f"decode {b}"] = {"ms_per_step": round(ms, 1), "tokens_per_s": round(b / ms * 1000, 1)}
        for mode in ("last", "all"):
            e._forget()
            t0 = time.perf_counter()
            e._run([_Segment(0, 0, [prompt[-1]] * 256, mode)], lambda *a: None)
            out[f"prompt 256, logits {mode}"] = {"tokens_per_s": round(256 / (time.perf_counter() - t0), 1)}
        e.close()
    finally:
        llm.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--mask", default=None, help="required unless --decode-rates")
    ap.add_argument("--limit", type=int, default=16, help="prompts of each held-out set (and capability questions)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--multipliers", default=None, help="default: 1, 0 and the mask's own (as `cna-local eval`)")
    ap.add_argument("--schedule", default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--decode-rates", action="store_true", help="only measure decode steps per batch size (fast)")
    args = ap.parse_args(argv)

    from cna_local.evaluation.runner import evaluate
    from cna_local.maskfile import NeuronMask
    from cna_local.models import resolve_model
    from cna_local.prompts import load_bundled

    model = resolve_model(args.model)
    if args.decode_rates:
        rates = decode_rates(model, args.threads)
        print(json.dumps({"machine": cpu_name(), "threads": args.threads, "model": model.name, **rates}, indent=1))
        return 0
    if args.mask is None:
        ap.error("--mask is required (or --decode-rates)")
    mask = NeuronMask.load(args.mask)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    mults = None if args.multipliers is None else [float(x) for x in args.multipliers.split(",")]
    report = {"machine": cpu_name(), "threads": args.threads, "model": model.name, "mask": args.mask,
              "limit": args.limit, "schedule": args.schedule, "command": " ".join(["python", *sys.argv]), "runs": {}}
    results = {}
    for b in sizes:
        t0 = time.perf_counter()
        results[b] = evaluate(model, mask, mults, limit=args.limit, batch_size=b, n_threads=args.threads,
                              schedule=args.schedule, progress=False)
        secs = time.perf_counter() - t0
        report["runs"][b] = {"seconds": round(secs, 1), "speedup": round(report["runs"][sizes[0]]["seconds"] / secs, 2)
                             if b != sizes[0] else 1.0}
        print(f"batch {b:>3}: {secs:7.1f} s  (x{report['runs'][b]['speedup']})", flush=True)
    for b in sizes[1:]:
        report["runs"][b]["against_first"] = compare(results[sizes[0]], results[b])
        prompts = (load_bundled("harmful_heldout").prompts[:args.limit] + load_bundled("benign_heldout").prompts[:args.limit])
        report["runs"][b]["logit_gap"] = logit_gap(model, mask, prompts, b, args.threads)
        print(json.dumps(report["runs"][b], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
