"""Benchmark: what a neuron mask costs llama.cpp (prompt processing and decode tokens/s).

Three configurations of one model, in one process, interleaved round by round (each round starting
with the next one) so that drift of the machine and a place in the round hit all three alike:
  none        no mask
  0.1%        0.1% of all FFN neurons (the product's default mask size), spread over the late half
  all-layers  a mask on every layer (1% of each layer's neurons): the most scale ops a mask can add

Usage:
  python tools/bench_runtime.py [--model default|PATH.gguf] [--mask MASK.gguf] [--rounds 3]
         [--prompt-tokens 256] [--decode-tokens 64] [--threads 2] [--json OUT]

A mask file given with --mask replaces the synthetic 0.1% mask. Reports the median tokens/s over rounds and
each configuration's ratio to `none`, taken round by round (median, and the lowest and highest round):
the spread says how much of a ratio is the machine's noise. The target is a 0.1% mask costing at most 1%
of decode throughput.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import numpy as np


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def synthetic_masks(n_layer: int, n_ff: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    k = max(1, round(0.001 * n_layer * n_ff))
    late = np.arange(n_layer // 2, n_layer)
    flat = rng.choice(len(late) * n_ff, k, replace=False)
    per = max(1, n_ff // 100)
    every = [(il, n) for il in range(n_layer) for n in rng.choice(n_ff, per, replace=False)]
    return {
        "0.1%": (late[flat // n_ff], flat % n_ff),
        "all-layers": tuple(np.array(x) for x in zip(*every)),
    }


def time_pp(llm, tokens) -> float:
    llm.reset()
    t = time.perf_counter()
    llm.eval(tokens)
    return len(tokens) / (time.perf_counter() - t)


def time_tg(llm, prompt, n) -> float:
    llm.reset()
    llm.eval(prompt)
    tok = prompt[-1]
    t = time.perf_counter()
    for _ in range(n):
        llm.eval([tok])
    return n / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--mask", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from cna_local.models import resolve_model
    from cna_local.runtime import SteeredLlama

    path = resolve_model(args.model)
    llm = SteeredLlama(str(path), n_ctx=args.prompt_tokens + args.decode_tokens + 8, n_batch=args.prompt_tokens,
                       n_threads=args.threads, n_threads_batch=args.threads)
    shape = llm.steering.shape
    masks = synthetic_masks(shape.n_layer, shape.n_ff)
    if args.mask:
        from cna_local.maskfile import NeuronMask

        m = NeuronMask.load(args.mask)
        masks["0.1%"] = (m.layers, m.neurons)
    rng = np.random.default_rng(1)
    prompt = rng.integers(100, 20000, args.prompt_tokens).tolist()

    configs = ["none", *masks]
    pp = {c: [] for c in configs}
    tg = {c: [] for c in configs}
    time_pp(llm, prompt[:32])  # warm-up
    for r in range(args.rounds):
        # each round starts with another configuration, so none is favoured by its place in the round
        for c in configs[r % len(configs):] + configs[:r % len(configs)]:
            if c == "none":
                llm.steering.clear()
            else:
                layers, neurons = masks[c]
                llm.steering.set_entries(layers, neurons, np.zeros(len(layers), np.float32))
            pp[c].append(time_pp(llm, prompt))
            tg[c].append(time_tg(llm, prompt[:16], args.decode_tokens))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    rows = []
    for c in configs:
        p, t = statistics.median(pp[c]), statistics.median(tg[c])
        n = 0 if c == "none" else len(masks[c][0])
        layers = 0 if c == "none" else len(set(np.asarray(masks[c][0]).tolist()))
        # Ratios round by round: each round's configurations ran back to back, so slow drift cancels.
        pr = [a / b for a, b in zip(pp[c], pp["none"])]
        tr = [a / b for a, b in zip(tg[c], tg["none"])]
        rows.append({"config": c, "neurons": n, "layers": layers, "pp_tok_s": p, "tg_tok_s": t,
                     "pp_ratio": statistics.median(pr), "tg_ratio": statistics.median(tr),
                     "pp_ratio_range": [min(pr), max(pr)], "tg_ratio_range": [min(tr), max(tr)],
                     "pp_tok_s_rounds": pp[c], "tg_tok_s_rounds": tg[c]})
    report = {
        "model": str(path), "n_layer": shape.n_layer, "n_ff": shape.n_ff, "cpu": cpu_name(),
        "threads": args.threads, "rounds": args.rounds, "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens, "command": " ".join(sys.argv), "results": rows,
    }
    print(f"{path.name}  ({shape.n_layer} layers x {shape.n_ff} neurons), {report['cpu']}, {args.threads} threads, "
          f"median of {args.rounds} rounds")
    print(f"{'config':<12}{'neurons':>8}{'layers':>7}{'pp tok/s':>10}{'ratio':>7}{'(range)':>14}"
          f"{'tg tok/s':>10}{'ratio':>7}{'(range)':>14}")
    for r in rows:
        pl, ph = r["pp_ratio_range"]
        tl, th = r["tg_ratio_range"]
        print(f"{r['config']:<12}{r['neurons']:>8}{r['layers']:>7}{r['pp_tok_s']:>10.1f}{r['pp_ratio']:>7.3f}"
              f"{f'({pl:.3f}-{ph:.3f})':>14}{r['tg_tok_s']:>10.1f}{r['tg_ratio']:>7.3f}{f'({tl:.3f}-{th:.3f})':>14}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
