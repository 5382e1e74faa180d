"""Benchmark: what a gate costs per request, against unconditional (static) steering.

A gated request evaluates its prompt unsteered while llama.cpp's FFN capture reads the mask's neurons at the
last token; when the gate fires (schedule all or prompt) the prompt is evaluated again under steering, so
the extra work is one unsteered prompt pass on the requests it fires on and none on the others. Under the
"generation" schedule only the last prompt token is evaluated again.

Configurations, one process, interleaved request by request so drift hits them alike:
  static         the mask on every request (no gate)
  gate-closed    a gate that never fires (the request is served unsteered)
  gate-fired     a gate that always fires
  gate-fired-gen the same under the "generation" schedule

Usage:
  python tools/bench_gate.py --mask MASK.gguf [--model default|PATH.gguf] [--requests 20] [--max-tokens 16]
         [--threads 2] [--json OUT]

Reports per configuration the median prompt time (the request's prompt phase, including the gate's reading
and any second pass), the median request time, and each one's ratio to static, request by request.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

from bench_runtime import cpu_name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--mask", required=True)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from cna_local.gate import Gate
    from cna_local.maskfile import NeuronMask
    from cna_local.models import resolve_model
    from cna_local.prompts import load_bundled
    from cna_local.runtime import SteeredLlama

    path = resolve_model(args.model)
    mask = NeuronMask.load(args.mask)
    masks = {
        "static": (mask, "all", False),
        "gate-closed": (dataclasses.replace(mask, gate=Gate.never(len(mask))), "all", True),
        "gate-fired": (dataclasses.replace(mask, gate=Gate.always(len(mask))), "all", True),
        "gate-fired-gen": (dataclasses.replace(mask, gate=Gate.always(len(mask))), "generation", True),
    }
    prompts = (load_bundled("harmful_heldout").prompts + load_bundled("benign_heldout").prompts)[: args.requests]
    llm = SteeredLlama(str(path), n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads)
    prompt_ms = {c: [] for c in masks}
    total_ms = {c: [] for c in masks}
    tokens = []
    try:
        for i, prompt in enumerate(prompts):
            for c, (m, schedule, gate) in masks.items():
                llm.set_mask(m, schedule=schedule, gate=gate)
                llm.reset()  # every request from an empty cache: the prompt is evaluated whole
                t = time.perf_counter()
                out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                                                 temperature=0.0, top_k=1)
                total_ms[c].append((time.perf_counter() - t) * 1000)
                # last_prompt_ms covers the call that ended the prompt (the gate's reading and any second pass)
                prompt_ms[c].append(llm.last_prompt_ms)
            tokens.append(out["usage"]["prompt_tokens"])
            print(f"request {i + 1}/{len(prompts)}", file=sys.stderr)
    finally:
        llm.close()
    rows = []
    for c in masks:
        pr = [a / b for a, b in zip(prompt_ms[c], prompt_ms["static"])]
        tr = [a / b for a, b in zip(total_ms[c], total_ms["static"])]
        rows.append({"config": c, "prompt_ms": statistics.median(prompt_ms[c]), "request_ms": statistics.median(total_ms[c]),
                     "prompt_ratio": statistics.median(pr), "request_ratio": statistics.median(tr),
                     "prompt_ratio_range": [min(pr), max(pr)], "request_ratio_range": [min(tr), max(tr)]})
    report = {"model": str(path), "mask": args.mask, "neurons": len(mask), "cpu": cpu_name(), "threads": args.threads,
              "requests": len(prompts), "prompt_tokens_median": statistics.median(tokens), "max_tokens": args.max_tokens,
              "command": " ".join(sys.argv), "results": rows}
    print(f"{path.name}, {len(mask)}-neuron mask, {report['cpu']}, {args.threads} threads, {len(prompts)} requests "
          f"(median prompt {report['prompt_tokens_median']} tokens, up to {args.max_tokens} reply tokens)")
    print(f"{'config':<16}{'prompt ms':>10}{'ratio':>7}{'(range)':>14}{'request ms':>12}{'ratio':>7}{'(range)':>14}")
    for r in rows:
        pl, ph = r["prompt_ratio_range"]
        tl, th = r["request_ratio_range"]
        print(f"{r['config']:<16}{r['prompt_ms']:>10.1f}{r['prompt_ratio']:>7.2f}{f'({pl:.2f}-{ph:.2f})':>14}"
              f"{r['request_ms']:>12.1f}{r['request_ratio']:>7.2f}{f'({tl:.2f}-{th:.2f})':>14}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
