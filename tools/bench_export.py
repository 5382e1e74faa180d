"""Benchmark: a mask run as a neuron mask (patched llama.cpp) against the same mask exported as a LoRA
adapter (llama.cpp's own LoRA path, as stock runtimes run it), on one model, in one run.

    python tools/bench_export.py --mask refusal.gguf [--model default] [--rounds 5]

Reports the file sizes; prompt-processing and decode tokens/s of no steering, the neuron mask and the
adapter (F32 and F16), interleaved round by round and given as ratios to no steering (median, and the
lowest and highest round); and how closely the adapter reproduces the mask: the largest logit difference
after each of the first held-out harmful prompts, and how many greedy replies are identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import cpu_name, time_pp, time_tg  # noqa: E402


def last_logits(llm, tokens) -> np.ndarray:
    import llama_cpp

    llm.reset()
    llm.eval(tokens)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--mask", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=10, help="held-out harmful prompts for the agreement check")
    ap.add_argument("--reply-tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from cna_local.evaluation.engine import Engine
    from cna_local.export.gguf_lora import write_gguf_lora
    from cna_local.export.lowrank import gguf_down_weights, low_rank_updates
    from cna_local.maskfile import NeuronMask
    from cna_local.models import resolve_model
    from cna_local.prompts import load_bundled
    from cna_local.runtime import SteeredLlama

    path = resolve_model(args.model)
    mask = NeuronMask.load(args.mask)
    m0 = mask.multiplier
    work = Path(tempfile.mkdtemp(prefix="cna-bench-export-"))
    updates = low_rank_updates(mask, gguf_down_weights(path), m0)
    loras = {dtype: write_gguf_lora(work / f"mask-{dtype}.lora.gguf", mask, updates, m0, dtype) for dtype in ("f32", "f16")}
    sizes = {"mask": Path(args.mask).stat().st_size, **{f"lora-{k}": v.stat().st_size for k, v in loras.items()}}

    common = dict(n_ctx=args.prompt_tokens + args.decode_tokens + 256, n_batch=args.prompt_tokens,
                  n_threads=args.threads, n_threads_batch=args.threads)
    plain = SteeredLlama(str(path), **common)
    models = {"none": plain, "mask": plain,
              **{f"lora-{k}": SteeredLlama(str(path), lora_path=str(v), lora_scale=1.0, **common) for k, v in loras.items()}}

    def ready(config):
        if config == "mask":
            plain.set_mask(mask, m0)
        elif config == "none":
            plain.steering.clear()
        return models[config]

    # how closely the adapter reproduces the mask
    engine = Engine(plain)
    prompts = load_bundled("harmful_heldout").prompts[: args.prompts]
    diffs, same = [], 0
    for prompt in prompts:
        ids = engine.encode(prompt)
        want = last_logits(ready("mask"), ids)
        got = last_logits(models["lora-f32"], ids)
        diffs.append(float(np.abs(got - want).max()))
        replies = []
        for config in ("mask", "lora-f32"):
            llm = ready(config)
            llm.reset()
            out = llm.create_completion(ids, max_tokens=args.reply_tokens, temperature=0.0, top_k=1)
            replies.append(out["choices"][0]["text"])
        same += replies[0] == replies[1]
    effect = float(np.abs(last_logits(ready("mask"), engine.encode(prompts[0]))
                          - last_logits(ready("none"), engine.encode(prompts[0]))).max())
    engine.close()

    rng = np.random.default_rng(1)
    prompt = rng.integers(100, 20000, args.prompt_tokens).tolist()
    configs = list(models)
    pp = {c: [] for c in configs}
    tg = {c: [] for c in configs}
    time_pp(ready("none"), prompt[:32])
    for r in range(args.rounds):
        for c in configs:
            llm = ready(c)
            pp[c].append(time_pp(llm, prompt))
            tg[c].append(time_tg(llm, prompt[:16], args.decode_tokens))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    rows = []
    for c in configs:
        pr = [a / b for a, b in zip(pp[c], pp["none"])]
        tr = [a / b for a, b in zip(tg[c], tg["none"])]
        rows.append({"config": c, "bytes": sizes.get(c), "pp_tok_s": statistics.median(pp[c]),
                     "tg_tok_s": statistics.median(tg[c]), "pp_ratio": statistics.median(pr),
                     "tg_ratio": statistics.median(tr), "pp_ratio_range": [min(pr), max(pr)],
                     "tg_ratio_range": [min(tr), max(tr)]})
    report = {"model": str(path), "mask": args.mask, "neurons": len(mask), "m0": m0, "cpu": cpu_name(),
              "threads": args.threads, "rounds": args.rounds, "command": " ".join(sys.argv), "results": rows,
              "agreement": {"prompts": len(prompts), "max_logit_diff": max(diffs), "median_logit_diff": statistics.median(diffs),
                            "mask_effect_on_logits": effect, "identical_greedy_replies": same,
                            "reply_tokens": args.reply_tokens}}
    print(f"{path.name}, mask of {len(mask)} neurons at {m0:g}, {report['cpu']}, {args.threads} threads, "
          f"median of {args.rounds} rounds")
    print(f"{'config':<10}{'file KB':>9}{'pp tok/s':>10}{'ratio':>7}{'(range)':>14}{'tg tok/s':>10}{'ratio':>7}{'(range)':>14}")
    for r in rows:
        kb = f"{r['bytes'] / 1024:.1f}" if r["bytes"] else "-"
        pl, ph = r["pp_ratio_range"]
        tl, th = r["tg_ratio_range"]
        print(f"{r['config']:<10}{kb:>9}{r['pp_tok_s']:>10.1f}{r['pp_ratio']:>7.3f}{f'({pl:.3f}-{ph:.3f})':>14}"
              f"{r['tg_tok_s']:>10.1f}{r['tg_ratio']:>7.3f}{f'({tl:.3f}-{th:.3f})':>14}")
    a = report["agreement"]
    print(f"adapter vs mask, {a['prompts']} held-out harmful prompts: largest logit difference {a['max_logit_diff']:.3g} "
          f"(median {a['median_logit_diff']:.3g}; the mask itself moves them by {a['mask_effect_on_logits']:.3g}); "
          f"greedy replies of {a['reply_tokens']} tokens identical in {a['identical_greedy_replies']} of {a['prompts']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    for llm in {id(m): m for m in models.values()}.values():
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
