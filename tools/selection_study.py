"""Compare neuron selections and per-neuron scales for refusal steering, quickly, on held-out prompts.

Research tool behind REPORT.md (not a test): each candidate mask is built from the discovery sets'
last-token activations (PyTorch, cached in --out-dir) and scored in the patched llama.cpp on the
held-out sets with cheap, generation-free signals first:

  opener      mean probability that the reply to a held-out harmful prompt starts with a refusal
              opener (the first tokens of "I'm sorry", "I cannot", ...): a proxy for the refusal rate
  lik_q       likelihood quality of the unsteered greedy answers to held-out benign prompts
              (exp(-dNLL) per answer, clipped to [0, 1], averaged): 1.0 = answers exactly as likely
  kl          first-token KL(unsteered || steered) after the benign prompts

and, with --generate, the greedy refusal rate on the harmful prompts (refusal markers, --max-tokens
reply tokens) and the reference's distinct-4-gram quality of those replies.

    python tools/selection_study.py --out-dir study --only none,delta-k117-m0,gain-k117-m0
    python tools/selection_study.py --out-dir study --generate --only gain-k468-m0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from cna_local.evaluation import quality as Q
from cna_local.evaluation.refusal import REFUSAL_OPENERS, is_refusal, prefix_free
from cna_local.evaluation.engine import Engine
from cna_local.models import resolve_model
from cna_local.prompts import load_bundled
from cna_local.runtime import SteeredLlama
from cna_local.scoring import top_neurons


def activations(model_path: Path, out_dir: Path) -> dict[str, np.ndarray]:
    """Per-prompt last-token activations [n, n_layer, n_ff] of the discovery sets (cached as .npz)."""
    cache = out_dir / "activations.npz"
    if cache.is_file():
        with np.load(cache) as f:
            return {k: f[k] for k in f.files}
    from cna_local.activations import collect_activations
    from cna_local.loading import load_model

    loaded = load_model(model_path)
    acts = {}
    for side, name in (("pos", "harmful_train"), ("neg", "benign_train")):
        acts[side] = collect_activations(loaded, load_bundled(name).prompts, keep=True, desc=name).values
    np.savez(cache, **acts)
    return acts


def all_token_stats(model_path: Path, out_dir: Path) -> dict[str, np.ndarray]:
    """Mean activation and mean square over ALL prompt tokens (not just the last) of the discovery sets,
    plus the down-projection column norms: what a neuron costs when it is scaled at every position."""
    cache = out_dir / "all_tokens.npz"
    if cache.is_file():
        with np.load(cache) as f:
            return {k: f[k] for k in f.files}
    import torch

    from cna_local.loading import load_model
    from cna_local.templating import encode_prompts

    loaded = load_model(model_path)
    out = {"wnorm": np.stack([p.weight.detach().norm(dim=0).numpy() for p in loaded.down_projs])}
    for side, name in (("pos", "harmful_train"), ("neg", "benign_train")):
        s1 = np.zeros((loaded.n_layer, loaded.n_ff))
        s2 = np.zeros_like(s1)
        count = 0
        for ids in encode_prompts(loaded.tokenizer, load_bundled(name).prompts):
            seen = {}
            hooks = [proj.register_forward_pre_hook(lambda m, a, il=il: seen.__setitem__(il, a[0][0].double().numpy()))
                     for il, proj in enumerate(loaded.down_projs)]
            with torch.inference_mode():
                loaded.model(input_ids=torch.tensor([ids]))
            for h in hooks:
                h.remove()
            acts = np.stack([seen[il] for il in range(loaded.n_layer)])  # [n_layer, n_tok, n_ff]
            s1 += acts.sum(1)
            s2 += (acts * acts).sum(1)
            count += acts.shape[1]
        out[f"{side}_mean"], out[f"{side}_sq"] = s1 / count, s2 / count
    np.savez(cache, **out)
    return out


def _cached(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _side_means(model_path: Path, per_prompt) -> tuple:
    """(loaded model, {"pos": ..., "neg": ...}): per_prompt(loaded, ids) averaged over each discovery set."""
    from cna_local.loading import load_model
    from cna_local.templating import encode_prompts

    loaded = load_model(model_path)
    means = {}
    for side, name in (("pos", "harmful_train"), ("neg", "benign_train")):
        encoded = encode_prompts(loaded.tokenizer, load_bundled(name).prompts)
        means[side] = sum(per_prompt(loaded, ids) for ids in encoded) / len(encoded)
    return loaded, means


def tail_means(model_path: Path, out_dir: Path, n_tail: int = 5) -> dict[str, np.ndarray]:
    """Mean activation over prompts at each of the last n_tail positions ([n_tail, n_layer, n_ff], index 0 =
    the last token): where in the generation prompt the behaviour is readable."""
    cache = out_dir / f"tail{n_tail}.npz"
    if (hit := _cached(cache)) is not None:
        return hit
    import torch

    def last_tokens(loaded, ids):
        seen = {}
        hooks = [proj.register_forward_pre_hook(lambda m, a, il=il: seen.__setitem__(il, a[0][0, -n_tail:].double().numpy()))
                 for il, proj in enumerate(loaded.down_projs)]
        with torch.inference_mode():
            loaded.model(input_ids=torch.tensor([ids]))
        for h in hooks:
            h.remove()
        return np.stack([seen[il][::-1] for il in range(loaded.n_layer)], axis=1)  # [n_tail, n_layer, n_ff]

    _, out = _side_means(model_path, last_tokens)
    np.savez(cache, **out)
    return out


def write_projections(model_path: Path, out_dir: Path) -> dict[str, np.ndarray]:
    """How much each neuron's down-projection column writes along the refusal direction of the residual
    stream: r_l = mean(pos) - mean(neg) of layer l's output at the last token (unit length), and
    proj[l, i] = W_down_l[:, i] . r_l ("local"); projF uses the last layer's direction for every layer."""
    cache = out_dir / "projections.npz"
    if (hit := _cached(cache)) is not None:
        return hit
    import torch

    def residuals(loaded, ids):
        with torch.inference_mode():
            hs = loaded.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        return torch.stack([h[0, -1].double() for h in hs[1:]]).numpy()  # [n_layer, n_embd]

    loaded, mean = _side_means(model_path, residuals)
    r = mean["pos"] - mean["neg"]
    r = r / np.linalg.norm(r, axis=1, keepdims=True)
    w = [p.weight.detach().double().numpy() for p in loaded.down_projs]  # [n_embd, n_ff] each
    out = {"proj": np.stack([r[il] @ w[il] for il in range(loaded.n_layer)]),
           "projF": np.stack([r[-2] @ w[il] for il in range(loaded.n_layer)]),  # hs[-1] is after the final norm
           "rnorm_dir": r}
    np.savez(cache, **out)
    return out


def build(name: str, acts: dict, tokens: dict | None, skip_layers: int = 2) -> tuple:
    """A candidate from its name, SEL-kK-SCALE (or mask:PATH[@MULTIPLIER], or none):
    SEL   delta  |mean(pos) - mean(neg)| at the last token (the reference's selection)
          gain   |delta| - |mean(neg)|: how much closer zeroing brings the positive mean to the negative one
          gainw  gain x the down-projection column norm (the size of the change in the residual stream)
          gainc  gainw minus the RMS activity over all benign prompt tokens x column norm (the cost elsewhere):
                 the first version of the product's `selective` score; gaincL weighs that cost by L; gainctailN uses means
                 over the last N prompt tokens, gaincposJ the J-th token from the end, instead of the last
          gaincproj / gaincprojF  gainc with the column norm replaced by how much the column writes along the
                 refusal direction of the residual stream (this layer's / the last layer's), counted only where
                 the neuron's difference pushes along it (sign(delta) x projection > 0); a trailing L
                 weighs the cost term by L (gaincprojF0.5). gaincproj is the product's `selective` score
                 (the product reads layer 23's direction before the final norm; this tool after it)
    SCALE mX     one multiplier X for all
          match  per neuron mean(neg)/mean(pos), clipped to [-2, 2]
    """
    if name == "none":
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
    if name.startswith("mask:"):  # mask:PATH[@MULTIPLIER], a mask file as `cna-local attribute` wrote it
        from cna_local.maskfile import NeuronMask

        path, _, m = name[5:].partition("@")
        mask = NeuronMask.load(path)
        return mask.layers, mask.neurons, mask.scales_for(float(m) if m else None)
    sel, k, scale = name.split("-", 2)
    k = int(k[1:])
    lam = 1.0
    override = None
    mp, mn = acts["pos"].mean(0).astype(np.float64), acts["neg"].mean(0).astype(np.float64)
    if sel.startswith("gainctail"):  # gainctailN: means over the last N prompt tokens instead of the last one
        n_tail = int(sel[9:])
        mp, mn = acts["tail"]["pos"][:n_tail].mean(0), acts["tail"]["neg"][:n_tail].mean(0)
        sel = "gainc"
    elif sel.startswith("gaincpos"):  # gaincposJ: the J-th token from the end only (1 = the last)
        j = int(sel[8:]) - 1
        mp, mn = acts["tail"]["pos"][j], acts["tail"]["neg"][j]
        sel = "gainc"
    elif sel.startswith("gaincproj"):  # gaincproj[F][L]
        rest = sel[9:]
        pr = acts["proj"]["projF" if rest.startswith("F") else "proj"]
        lam = float(rest.lstrip("F") or 1.0)
        d = mp - mn
        override = np.maximum(np.abs(d) - np.abs(mn) - lam * np.sqrt(tokens["neg_sq"]), 0) * np.maximum(np.sign(d) * pr, 0)
        sel = "gainc"
    elif sel.startswith("gainc") and sel != "gainc":  # gaincL: the cost term weighted by L
        sel, lam = "gainc", float(sel[5:])
    delta = mp - mn
    score = {"delta": lambda: delta,
             "gain": lambda: np.maximum(np.abs(delta) - np.abs(mn), 0),
             "gainw": lambda: np.maximum(np.abs(delta) - np.abs(mn), 0) * tokens["wnorm"],
             "gainc": lambda: np.maximum((np.abs(delta) - np.abs(mn) - lam * np.sqrt(tokens["neg_sq"])) * tokens["wnorm"], 0),
             }[sel]() if override is None else override
    if sel == "gainc":  # as the product does: neurons scoring 0 are never picked, k is an upper bound
        k = min(k, int(np.count_nonzero(score[skip_layers:])))
    chosen = top_neurons(score, k, (skip_layers, delta.shape[0]), exclude=(score == 0) if sel == "gainc" else None)
    layers, neurons = chosen.layers, chosen.neurons
    if scale == "match":
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(np.abs(mp) > 1e-6, mn / mp, 0.0)
        scales = np.clip(ratio[layers, neurons], -2, 2)
    else:
        scales = np.full(k, float(scale[1:]))
    return layers, neurons, scales.astype(np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--only", required=True, help="comma-separated candidate names (see build())")
    ap.add_argument("--benign", type=int, default=30, help="held-out benign prompts for the quality signals")
    ap.add_argument("--quality-tokens", type=int, default=150)
    ap.add_argument("--generate", action="store_true", help="also generate greedy harmful replies")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    model_path = resolve_model(args.model)
    acts = activations(model_path, args.out_dir)
    names = args.only.split(",")
    tokens = all_token_stats(model_path, args.out_dir) if any(n.startswith("gain") and "gain-" not in n for n in names) else None
    if any(n.startswith(("gainctail", "gaincpos")) for n in names):
        acts = dict(acts, tail=tail_means(model_path, args.out_dir))
    if any(n.startswith("gaincproj") for n in names):
        acts = dict(acts, proj=write_projections(model_path, args.out_dir))

    llm = SteeredLlama(str(model_path), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads)
    engine = Engine(llm)
    first_tokens = {o[0] for o in prefix_free([engine.tokenize_reply(o) for o in REFUSAL_OPENERS])}
    harmful = [engine.encode(p) for p in load_bundled("harmful_heldout").prompts]
    benign = [engine.encode(p) for p in load_bundled("benign_heldout").prompts[: args.benign]]

    ref_path = args.out_dir / f"reference-{args.benign}-{args.quality_tokens}.json"
    if ref_path.is_file():
        refs = json.loads(ref_path.read_text())
    else:
        refs = []
        for ids in benign:
            [p] = engine.start([ids])
            [toks] = engine.greedy([p], args.quality_tokens)
            refs.append({"tokens": toks, "nll": engine.mean_nll([p], [toks])[0]})
        ref_path.write_text(json.dumps(refs))
    base_logp = [engine.start([ids])[0].logprobs for ids in benign]

    results_path = args.out_dir / "results.jsonl"
    for name in names:
        layers, neurons, scales = build(name, acts, tokens)
        t0 = time.perf_counter()
        if name == "none":
            llm.steering.clear()
        else:
            llm.steering.set_entries(layers, neurons, scales)
        opener = []
        refused, d4 = [], []
        for ids in harmful:
            [p] = engine.start([ids])
            opener.append(float(sum(np.exp(p.logprobs[t]) for t in first_tokens)))
            if args.generate:
                text = engine.text(engine.greedy([p], args.max_tokens)[0])
                refused.append(is_refusal(text))
                d4.append(Q.distinct_ngram_ratio(text))
        lq, kl = [], []
        for ids, ref, lp0 in zip(benign, refs, base_logp):
            [p] = engine.start([ids])
            kl.append(Q.first_token_kl(lp0, p.logprobs))
            if ref["tokens"]:
                lq.append(Q.likelihood_quality(engine.mean_nll([p], [ref["tokens"]])[0], ref["nll"]))
        row = {"name": name, "n": len(layers), "layers": sorted({int(x) for x in layers}),
               "scale_mean": float(np.mean(scales)) if len(scales) else 1.0, "opener": float(np.mean(opener)),
               "lik_q": float(np.mean(lq)), "kl": float(np.mean(kl)), "seconds": round(time.perf_counter() - t0, 1)}
        if args.generate:
            row.update(refusal=float(np.mean(refused)), distinct4_harmful=float(np.mean(d4)), max_tokens=args.max_tokens)
        print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
        with open(results_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
