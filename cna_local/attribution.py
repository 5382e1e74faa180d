"""The attribution pipeline: prompts -> activations -> scores -> selected neurons -> NeuronMask."""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import __version__
from .activation_stats import ActivationStats, as_source
from .contrast_stats import contrast_stats
from .gate import DEFAULT_FOLDS, DEFAULT_FPR, DEFAULT_FPR_STRENGTHEN, DEFAULT_METHOD, GateError, fit_gate
from .maskfile import NeuronMask
from .prompts import PromptSet, load_contrast_pairs
from .scoring import (
    DEFAULT_TOP_FRACTION,
    DEFAULT_UNIVERSAL_THRESHOLD,
    check_threshold,
    ScoringError,
    SCORES,
    delta_score,
    direction_writes,
    normalized_score,
    selective_score,
    parse_layer_range,
    resolve_k,
    top_neurons,
    universal_neurons,
)


@dataclass
class AttributionOptions:
    top_fraction: float | None = None  # of ALL MLP neurons (n_layer * n_ff); default 0.001
    top_k: int | None = None
    # "selective" (the default: see REPORT.md), "delta" (the reference's), "normalized" (delta / pooled std)
    score: str = "selective"
    layers: str | None = None  # "START:END", START inclusive, END exclusive (see scoring.parse_layer_range)
    # Off by default: on Qwen2.5-Coder-0.5B with the bundled 10 contrasts it flagged no neuron
    # of the top 0.1% at threshold 0.8, and the first run per model costs ~2.4x the prompts.
    universal_filter: bool = False
    universal_threshold: float = DEFAULT_UNIVERSAL_THRESHOLD
    batch_size: int = 8
    chat_template: bool = True
    # -1.5 (invert, amplified): on the default model it cuts held-out refusal by about 2/3 at likelihood
    # quality above 0.97, where ablation (0) cuts a fifth (REPORT.md)
    multiplier: float = -1.5
    progress: bool = True
    cache_contrasts: bool = True  # reuse the contrast pairs' statistics for this model file
    # a gate (cna_local.gate): steer only prompts it fires on; fpr: the share of
    # negative prompts (out of fold) it may fire on
    gate: bool = True
    gate_fpr: float = DEFAULT_FPR
    gate_fpr_strengthen: float | None = DEFAULT_FPR_STRENGTHEN  # the cap for multipliers above 1 (None: gate_fpr's threshold)
    gate_method: str = DEFAULT_METHOD
    # which neurons the gate reads: "auto" (its own, as many as the mask holds, the best by |t| over every
    # layer: fewer misses on held-out prompts, REPORT.md section 8), "mask" (the mask's), or a count
    gate_neurons: str | int = "auto"


@dataclass
class AttributionResult:
    mask: NeuronMask
    n_universal: int = 0  # neurons flagged universal (within the layer range)
    n_universal_removed: int = 0  # of those, how many the unfiltered top k held
    gate_note: str | None = None  # why no gate was fitted where one was asked for
    seconds: dict = field(default_factory=dict)


def gate_neuron_count(choice, n_mask: int) -> int | None:
    """How many neurons of its own the gate reads (None: the mask's) for --gate-neurons auto|mask|N."""
    if choice in (None, "auto"):
        return n_mask
    if choice == "mask":
        return None
    try:
        k = int(choice)
    except (TypeError, ValueError):
        k = 0
    if k < 1:
        raise GateError(f"--gate-neurons {choice!r} is not auto, mask or a positive count. Fix: pass auto, say.")
    return k


def score(pos: ActivationStats, neg: ActivationStats, method: str, down_weights: list | None = None) -> np.ndarray:
    """Per-neuron scores [n_layer, n_ff] by `method` (scoring.SCORES); selective needs the model's
    down-projection weights (one [n_embd, n_ff] per layer)."""
    if method == "normalized":
        return normalized_score(pos.mean, neg.mean, pos.var, neg.var, pos.n, neg.n)
    if method == "selective":
        if down_weights is None:
            raise ScoringError("the selective score needs the down-projection weights of the model.")
        write = direction_writes(down_weights, pos.resid_mean, neg.resid_mean)
        return selective_score(pos.mean, neg.mean, neg.token_ms, write)
    if method == "delta":
        return delta_score(pos.mean, neg.mean)
    raise ScoringError(f"unknown score {method!r}; choose one of {', '.join(SCORES)}.")


def prompts_digest(positive: PromptSet, negative: PromptSet) -> str:
    """One hash for both sets, so a mask records exactly which prompts made it."""
    return hashlib.sha256(f"positive:{positive.sha256}\nnegative:{negative.sha256}\n".encode()).hexdigest()


def attribute(
    loaded,
    positive: PromptSet,
    negative: PromptSet,
    options: AttributionOptions | None = None,
    contrasts: list[tuple[PromptSet, PromptSet]] | None = None,
    name: str | None = None,
) -> AttributionResult:
    """Find the neurons that separate positive from negative prompts; contrasts default to the bundled pairs.

    loaded: a LoadedModel (torch) or a source with the same interface (cna_local.capture.LlamaSource)."""
    opts = options or AttributionOptions()
    source = as_source(loaded)
    if opts.score not in SCORES:
        raise ScoringError(f"unknown score {opts.score!r}; choose one of {', '.join(SCORES)}.")
    n_layer, n_ff = source.n_layer, source.n_ff
    # Check parameters before the slow forward passes.
    k = k_asked = resolve_k(n_layer * n_ff, opts.top_fraction, opts.top_k)
    layer_range = parse_layer_range(opts.layers, n_layer)
    candidates = (layer_range[1] - layer_range[0]) * n_ff
    if k > candidates:
        raise ScoringError(f"asked for {k} neurons but layers {layer_range[0]}-{layer_range[1] - 1} hold only {candidates}. Fix: lower --top-k/--top-fraction or widen --layers.")
    if opts.gate:
        gate_neuron_count(opts.gate_neurons, 1)  # a bad --gate-neurons fails before the forward passes
    if opts.gate and not 0.0 <= opts.gate_fpr < 1.0:
        raise GateError(f"the gate's false-positive rate must be in [0, 1), got {opts.gate_fpr}. Fix: pass --gate-fpr 0.05, say.")
    if opts.universal_filter:
        check_threshold(opts.universal_threshold)
        if contrasts is None:
            contrasts = load_contrast_pairs()

    seconds: dict[str, float] = {}

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    # one bar across both sets
    with tqdm(total=len(positive) + len(negative), desc="activations", unit="prompt", file=sys.stderr,
              disable=not opts.progress, leave=False) as bar:
        def run(prompts: PromptSet, desc: str, token_stats: bool) -> ActivationStats:
            bar.set_description(desc)
            # the gate is fitted on each prompt's own values at the chosen neurons, known only after scoring
            return source.collect(prompts.prompts, desc=desc, token_stats=token_stats, bar=bar, progress=opts.progress,
                                  batch_size=opts.batch_size, chat_template=opts.chat_template, keep=opts.gate)

        # only the negative set's all-token statistics enter a score (selective)
        pos_stats = run(positive, f"positive ({positive.name})", False)
        neg_stats = run(negative, f"negative ({negative.name})", opts.score == "selective")
    seconds["activations"] = time.perf_counter() - t0
    getattr(source, "release", lambda: None)()  # llama: the model is not needed while scoring
    t0 = time.perf_counter()
    down_weights = source.down_weights(progress=opts.progress) if opts.score == "selective" else None
    scores = score(pos_stats, neg_stats, opts.score, down_weights)
    seconds["scores"] = time.perf_counter() - t0

    universal = None
    if opts.universal_filter:
        t0 = time.perf_counter()
        stats = contrast_stats(source, contrasts, opts.batch_size, opts.chat_template, opts.progress, opts.cache_contrasts)
        contrast_scores = [score(a, b, opts.score, down_weights) for a, b in stats]
        universal = universal_neurons(contrast_scores, k, opts.universal_threshold, layer_range)
        seconds["universal_filter"] = time.perf_counter() - t0

    # the selective score is 0 for neurons whose ablation would not pay: never pick those, so k is then
    # an upper bound (on the default model 69 neurons of 116,736 score above 0; REPORT.md)
    useless = (scores == 0) if opts.score == "selective" else np.zeros(scores.shape, bool)
    exclude = useless if universal is None else useless | universal
    if opts.score == "selective":
        available = int((~exclude[layer_range[0]:layer_range[1]]).sum())
        if available == 0:
            raise ScoringError(
                f"no neuron in layers {layer_range[0]}-{layer_range[1] - 1} has a positive selective score: none fires "
                "more on the positive prompts than it does on the negative ones and on ordinary text. "
                "Fix: check the prompt sets, or rank with --score delta."
            )
        k = min(k, available)
    unfiltered = top_neurons(scores, k, layer_range, exclude=useless)
    selection = top_neurons(scores, k, layer_range, exclude=exclude)
    n_universal = int(universal[layer_range[0]:layer_range[1]].sum()) if universal is not None else 0
    removed = int(universal[unfiltered.layers, unfiltered.neurons].sum()) if universal is not None else 0

    gate, gate_note = None, None
    folds = min(DEFAULT_FOLDS, pos_stats.n, neg_stats.n)  # out-of-fold scores need two folds at least
    if opts.gate and folds < 2:
        gate_note = f"no gate: fitting one out of fold needs 2 prompts in each set, got {pos_stats.n} and {neg_stats.n}"
    elif opts.gate:
        t0 = time.perf_counter()
        own = gate_neuron_count(opts.gate_neurons, len(selection.layers))
        # one fit per fold and one on all prompts; over every layer of a large model each takes seconds
        with tqdm(total=folds + 1, desc="gate", unit="fit", file=sys.stderr, disable=not opts.progress,
                  leave=False) as bar:
            step = lambda: bar.update(1)  # noqa: E731
            if own is None:
                rows = (selection.layers, selection.neurons)
                gate = fit_gate(pos_stats.values[:, rows[0], rows[1]], neg_stats.values[:, rows[0], rows[1]],
                                fpr=opts.gate_fpr, method=opts.gate_method, folds=folds,
                                fpr_strengthen=opts.gate_fpr_strengthen, on_step=step)
            else:  # every layer's values: the gate picks its own neurons
                n = pos_stats.values.shape[1] * pos_stats.values.shape[2]
                gate = fit_gate(pos_stats.values.reshape(pos_stats.n, n), neg_stats.values.reshape(neg_stats.n, n),
                                fpr=opts.gate_fpr, method=opts.gate_method, folds=folds, own=own,
                                fpr_strengthen=opts.gate_fpr_strengthen,
                                n_ff=pos_stats.values.shape[2], on_step=step)
        seconds["gate"] = time.perf_counter() - t0

    fp = source.fingerprint()
    meta = {
        "name": name or f"{source.name} {positive.name} vs {negative.name}",
        "prompts_sha256": prompts_digest(positive, negative),
        "tool_version": __version__,
        "selection": {
            "score": opts.score,
            "top_fraction": None if opts.top_k is not None else (opts.top_fraction or DEFAULT_TOP_FRACTION),
            "top_k": k,  # neurons in the mask
            "top_k_asked": k_asked,
            "layer_start": layer_range[0],
            "layer_end": layer_range[1],  # exclusive
            "chat_template": opts.chat_template,
            "backend": getattr(source, "backend", "torch"),
            "positive": {"name": positive.name, "n": len(positive), "sha256": positive.sha256},
            "negative": {"name": negative.name, "n": len(negative), "sha256": negative.sha256},
            "universal_filter": {
                "enabled": opts.universal_filter,
                "threshold": opts.universal_threshold if opts.universal_filter else None,
                "contrasts": [a.name.removesuffix(".a") for a, _ in contrasts] if opts.universal_filter else [],
                "n_universal": n_universal,
                "removed": removed,
            },
        },
    }
    mask = NeuronMask(
        arch=fp.arch, n_layer=fp.n_layer, n_ff=fp.n_ff, n_embd=fp.n_embd, fingerprint=fp.digest,
        model_name=source.name, layers=selection.layers, neurons=selection.neurons, scores=selection.scores,
        multiplier=opts.multiplier, meta=meta, gate=gate,
    )
    return AttributionResult(mask=mask, n_universal=n_universal, n_universal_removed=removed, seconds=seconds,
                             gate_note=gate_note)
