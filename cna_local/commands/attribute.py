"""`cna-local attribute`: find the neurons that separate two prompt sets and write a mask file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..errors import CnaLocalError
from ..schedules import SCHEDULES
from ..capture import DEFAULT_TOKEN_BUDGET  # light: numpy and ctypes, already loaded by the CLI
from ..scoring import SCORES

BACKENDS = ("llama", "torch")

DEFAULT_POSITIVE = "harmful_train"
DEFAULT_NEGATIVE = "benign_train"
CALIBRATION_PROMPTS = 20
FALLBACK_MULTIPLIER = -1.5
"""The default multiplier where it cannot be calibrated (a Hugging Face directory): the 0.5B model's (REPORT.md)."""


@click.command()
@click.option("--model", "model_spec", required=True, metavar="PATH",
              help="Model: a Hugging Face directory or a .gguf file.")
@click.option("--positive", default=DEFAULT_POSITIVE, show_default=True, metavar="FILE|NAME",
              help="Prompts showing the behaviour: a .txt (one per line), .jsonl or .csv file, or a bundled set name.")
@click.option("--negative", default=DEFAULT_NEGATIVE, show_default=True, metavar="FILE|NAME",
              help="Prompts without the behaviour, same formats.")
@click.option("--field", default="prompt", show_default=True,
              help="The prompt field of .jsonl files / column of .csv files.")
@click.option("--top-fraction", type=float, default=None,
              help="Keep this fraction of ALL MLP neurons (n_layer x n_ff), by |score|, at least one.  [default: 0.001]")
@click.option("--top-k", type=int, default=None, help="Keep exactly this many neurons (instead of --top-fraction).")
@click.option("--score", "score_method", type=click.Choice(SCORES), default="selective",
              show_default=True,
              help="How neurons are ranked. selective: the part of |mean(pos) - mean(neg)| that ablation fixes, minus "
                   "the neuron's activity on ordinary text, times how much it writes along the direction in which "
                   "the positive prompts' residual stream differs (REPORT.md); "
                   "delta: |mean(pos) - mean(neg)|, the reference implementation's; "
                   "normalized: delta / pooled standard deviation.")
@click.option("--layers", default=None, metavar="START:END",
              help="Only pick neurons in layers START..END-1 (END exclusive, like a Python slice; '8:', ':-2' work).")
@click.option("--universal-filter/--no-universal-filter", default=False, show_default=True,
              help="Drop neurons that also top the bundled unrelated contrasts (style, language, topic ...). "
                   "The contrasts' activations are cached per model file, so only the first run pays for them.")
@click.option("--universal-threshold", type=float, default=0.8, show_default=True,
              help="A neuron is universal if it is in the top set of at least this fraction of the contrasts.")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Where the activations are computed. llama: inside the patched llama.cpp, on the quantized "
                   "GGUF, in the memory its file takes (several prompts per decode); torch: in PyTorch on float32 "
                   "weights (4 bytes per parameter; the reference, and the only one for Hugging Face directories). "
                   "Both write the same mask file.  [default: llama for a .gguf file, torch for a directory]")
@click.option("--device", type=click.Choice(("cpu", "cuda", "mps")), default="cpu", show_default=True,
              help="torch backend: where the model runs, float32 on the CPU, bfloat16 on a GPU that has it. "
                   "llama backend: cuda/mps offload every layer to the GPU (a llama.cpp built with it).")
@click.option("--device-map", type=click.Choice(("auto",)), default=None,
              help="torch backend: let accelerate spread a model larger than one device over every GPU, then "
                   "the CPU, then the disk.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts per forward pass (torch backend; the llama backend packs whole prompts into "
                   f"{DEFAULT_TOKEN_BUDGET}-token decodes).")
@click.option("--no-chat-template", is_flag=True,
              help="Feed raw prompt text instead of a chat-formatted user turn (for models without a chat template).")
@click.option("--multiplier", type=float, default=None,
              help="The mask's default strength: 0 ablates the neurons, 1 leaves them, >1 amplifies, <0 inverts. "
                   "Any strength can be chosen again at run time.  [default: calibrated on a GGUF model (see "
                   f"--calibration-prompts); {FALLBACK_MULTIPLIER:g} for a Hugging Face directory]")
@click.option("--calibration-prompts", type=click.IntRange(min=0), default=None, metavar="N",
              help="Hold the last N NEGATIVE prompts out of the attribution and choose the default multiplier on "
                   "them, in llama.cpp: the strongest whose likelihood quality stays >= 0.97 and first-token KL "
                   "<= 0.1 (both as `cna-local eval` measures them). With a gate, also the default through it: the "
                   "strongest whose steered replies to the last N POSITIVE prompts it fires on stay coherent, with "
                   "benign quality >= 0.99 and KL <= 0.02 through the gate. 0, or --multiplier, skips it.  [default: "
                   f"{CALIBRATION_PROMPTS} when NEGATIVE has at least {2 * CALIBRATION_PROMPTS} prompts, else 0]")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="all", show_default=True,
              help="The mask's default steering schedule: all positions, the prompt's, or those that predict a "
                   "reply token (generation). Runtimes can choose again.")
@click.option("--gate/--no-gate", default=True, show_default=True,
              help="Also fit a gate: a detector that reads neurons, unsteered, at the prompt's last token, so "
                   "runtimes steer only the prompts it fires on (the rest run exactly unsteered). Runtimes use it "
                   "by default and can turn it off.")
@click.option("--gate-neurons", default="auto", show_default=True, metavar="auto|mask|N",
              help="The neurons the gate reads: auto, as many as the mask holds, the ones that separate POSITIVE "
                   "from NEGATIVE best over every layer (chosen again inside each fold); mask, the mask's own; N, "
                   "the best N. Reading a neuron does not steer it.")
@click.option("--gate-fpr", type=float, default=0.05, show_default=True, metavar="RATE",
              help="The most NEGATIVE prompts the gate may fire on, measured out of fold (each prompt scored by a "
                   "gate fitted without it). A cap: under it the threshold lets through the most positive prompts "
                   "net of negative ones (true-positive minus false-positive rate), so it often fires on fewer.")
@click.option("--gate-fpr-strengthen", type=float, default=0.01, show_default=True, metavar="RATE",
              help="The same cap for a second threshold, used when the multiplier is above 1 (strengthening): there "
                   "a NEGATIVE prompt the gate fires on is pushed toward the behaviour (an over-refusal), while a "
                   "missed positive that already shows it costs nothing, so the gate is stricter. Never below the "
                   "first threshold.")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="CPU threads for llama.cpp: the llama backend's capture and the calibrations.  [default: one per "
                   "physical core; a warning says when other work keeps some busy]")
@click.option("--name", default=None, help="A label stored in the mask file.")
@click.option("--no-cache", is_flag=True,
              help="Do not read or write the caches (dequantized GGUF weights, contrast-pair statistics).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), metavar="MASK.gguf",
              help="Where to write the mask file.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def attribute(model_spec, positive, negative, field, top_fraction, top_k, score_method, layers, universal_filter,
              universal_threshold, backend, device, device_map, batch_size, no_chat_template, multiplier, calibration_prompts, schedule, gate,
              gate_neurons, gate_fpr, gate_fpr_strengthen, threads, name, no_cache, out, as_json, quiet):
    """Find the MLP neurons that separate POSITIVE from NEGATIVE prompts and save them as a mask.

    Every prompt runs through the model's chat template; at the last prompt
    token the input of each layer's MLP down projection is recorded. Neurons
    are ranked by --score (default: selective, neurons that fire on POSITIVE,
    are quiet on NEGATIVE and on ordinary text, so ablating them changes the
    behaviour and little else); the top ones over all layers go into MASK.gguf,
    which `cna-local inspect` shows and the runtime applies (`cna-local eval`).

    \b
    Example:
      cna-local attribute --model qwen2.5-0.5b-instruct-q8_0.gguf --out refusal.gguf
    """
    try:
        summary = run_attribute(model_spec, positive, negative, field, top_fraction, top_k, score_method, layers,
                       universal_filter, universal_threshold, batch_size, not no_chat_template, multiplier,
                       name, not no_cache, out, not quiet, calibration_prompts, schedule, backend, device, device_map,
                                gate=gate, gate_fpr=gate_fpr, gate_neurons=gate_neurons,
                                gate_fpr_strengthen=gate_fpr_strengthen, threads=threads)
    except CnaLocalError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)


def run_attribute(model_spec, positive, negative, field, top_fraction, top_k, score_method, layers, universal_filter,
         universal_threshold, batch_size, chat_template, multiplier, name, use_cache, out, progress,
         calibration_prompts=0, schedule="all", backend=None, device="cpu", device_map=None, gate=True,
         gate_fpr=0.05, gate_neurons="auto", gate_fpr_strengthen=0.01, threads=None) -> dict:
    """The whole `attribute` command (the demo runs it too); returns the summary it prints."""
    # Heavy imports here so that `cna-local --help` stays fast.
    from ..attribution import AttributionOptions, attribute as run_attribution
    from ..multipliers import check_multiplier
    from ..models import resolve_model
    from ..calibration import calibrate as calibrate_multiplier
    from ..cache import write_atomic_with
    from ..cpu_threads import default_threads, warn_if_busy
    from ..prompts import PromptSet, load_contrast_pairs, resolve_prompt_set
    from ..scoring import ScoringError, check_threshold, parse_layer_spec

    started = time.perf_counter()
    # Everything that can be checked without the model is checked first.
    if top_fraction is not None and top_k is not None:
        raise ScoringError("give either --top-fraction or --top-k, not both.")
    parse_layer_spec(layers)
    if multiplier is not None:
        check_multiplier(multiplier)
    check_threshold(universal_threshold)
    if gate and not 0.0 <= gate_fpr < 1.0:
        raise CnaLocalError(f"--gate-fpr {gate_fpr} is not a rate in [0, 1). Fix: pass 0.05, say, or --no-gate.")
    if gate and not 0.0 <= gate_fpr_strengthen < 1.0:
        raise CnaLocalError(f"--gate-fpr-strengthen {gate_fpr_strengthen} is not a rate in [0, 1). Fix: pass 0.01, say.")
    model_path = resolve_model(model_spec, progress=(lambda m: click.echo(f"      {m}", err=True)) if progress else None)
    if out.resolve() == model_path.resolve():
        raise CnaLocalError(f"--out {out} is the model file itself. Fix: write the mask to another file.")
    if not out.parent.is_dir():
        raise CnaLocalError(f"the directory of --out ({out.parent}) does not exist. Fix: create it or pick another path.")
    is_gguf = model_path.is_file() and model_path.suffix.lower() == ".gguf"
    backend = backend or ("llama" if is_gguf else "torch")
    if backend not in BACKENDS:
        raise CnaLocalError(f"unknown backend {backend!r}. Fix: use one of {', '.join(BACKENDS)}.")
    if backend == "llama" and not is_gguf:
        raise CnaLocalError(f"the llama backend runs GGUF files and {model_path} is not one. Fix: pass a .gguf model, "
                            "or --backend torch for a Hugging Face directory.")
    if backend == "llama" and device_map is not None:
        raise CnaLocalError("--device-map is for the torch backend (llama.cpp places layers with --device). "
                            "Fix: add --backend torch, or drop --device-map.")
    n_gpu_layers = 0
    if backend == "llama" and device != "cpu":
        import llama_cpp

        if not llama_cpp.llama_supports_gpu_offload():
            raise CnaLocalError(f"--device {device}: this llama.cpp is built for the CPU only. Fix: reinstall with "
                                "CMAKE_ARGS=\"-DGGML_CUDA=ON\" (or -DGGML_METAL=ON) and pip's --no-cache-dir, or use "
                                "--backend torch.")
        n_gpu_layers = -1
    if backend == "torch":
        from ..loading import check_device

        check_device(device, device_map)
    pos = resolve_prompt_set(positive, field)
    neg = resolve_prompt_set(negative, field)
    if calibration_prompts is None:  # automatic: only where enough prompts are left for the attribution
        calibration_prompts = CALIBRATION_PROMPTS if len(neg) >= 2 * CALIBRATION_PROMPTS else 0
    calibrate = multiplier is None and calibration_prompts > 0 and model_path.suffix.lower() == ".gguf"
    held_out = None
    if calibrate:
        if len(neg) < 2 * calibration_prompts:
            raise CnaLocalError(f"{len(neg)} negative prompts are too few to hold {calibration_prompts} out for calibration "
                                f"(at least twice as many are needed). Fix: give more negative prompts, a smaller "
                                "--calibration-prompts, or --multiplier.")
        held_out = neg.prompts[-calibration_prompts:]
        neg = PromptSet(neg.name, neg.prompts[:-calibration_prompts])
    contrasts = load_contrast_pairs() if universal_filter else None
    if backend == "llama" or calibrate:  # llama.cpp's spinning threads crawl on busy cores: say so before minutes go
        warn_if_busy(threads or default_threads(), quiet=not progress)

    t0 = time.perf_counter()
    if backend == "llama":
        from ..capture import LlamaSource
        from ..memory_check import check_llama_fits
        from ..progress import step

        if n_gpu_layers == 0:
            check_llama_fits(model_path, len(pos) + len(neg))
        # a live count: a 7B takes 15-30 s here (llama.cpp repacks its Q4_K weights)
        with step(f"opening {model_path.name} in llama.cpp", progress):
            loaded = LlamaSource(model_path, chat_template=chat_template, use_cache=use_cache, n_gpu_layers=n_gpu_layers,
                                 n_threads=threads)
    else:
        from ..loading import load_model

        loaded = load_model(model_path, use_cache=use_cache, progress=progress, device=device, device_map=device_map)
    load_seconds = time.perf_counter() - t0

    options = AttributionOptions(
        top_fraction=top_fraction, top_k=top_k, score=score_method, layers=layers,
        universal_filter=universal_filter, universal_threshold=universal_threshold, batch_size=batch_size,
        chat_template=chat_template, multiplier=FALLBACK_MULTIPLIER if multiplier is None else multiplier,
        progress=progress, cache_contrasts=use_cache, gate=gate, gate_fpr=gate_fpr, gate_neurons=gate_neurons,
        gate_fpr_strengthen=gate_fpr_strengthen,
    )
    try:
        result = run_attribution(loaded, pos, neg, options, contrasts=contrasts, name=name)
    finally:
        if backend == "llama":
            loaded.close()
    mask = result.mask
    mask.schedule = schedule
    calibration_seconds = 0.0
    if calibrate:
        del loaded  # free the torch copy before llama.cpp loads the model
        t0 = time.perf_counter()
        cal = calibrate_multiplier(model_path, mask, held_out, schedule=schedule, chat_template=chat_template, n_threads=threads,
                                   progress=(lambda m: click.echo(f"      {m}", err=True)) if progress else None,
                                   prompt_source=f"the last {len(held_out)} of {negative} (not used for attribution)")
        mask.multiplier = cal.chosen
        mask.meta["calibration"] = cal.record
        if mask.gate is not None:
            # through the gate ordinary prompts are left alone: its own, stronger default (calibration.py)
            from ..calibration import CalibrationError, calibrate_gated

            harmful = pos.prompts[-calibration_prompts:]
            try:
                gcal = calibrate_gated(model_path, mask, held_out, harmful, schedule=schedule, chat_template=chat_template,
                                       n_threads=threads,
                                       progress=(lambda m: click.echo(f"      {m}", err=True)) if progress else None,
                                       prompt_source=f"benign: the last {len(held_out)} of {negative} (not used for "
                                                     f"attribution); harmful: the last {len(harmful)} of {positive} (used for attribution)")
            except CalibrationError as exc:  # the static default serves both ways; say why
                mask.gate.info["calibration"] = {"error": str(exc)}
                if progress:
                    click.echo(f"      no gated default ({exc}); the static one, {cal.chosen:g}, serves both", err=True)
            else:
                mask.static_multiplier, mask.multiplier = cal.chosen, gcal.chosen
                mask.gate.info["calibration"] = gcal.record
        calibration_seconds = time.perf_counter() - t0
    write_atomic_with(out, mask.save)
    return {
        "out": str(out),
        "file_bytes": out.stat().st_size,
        "model": str(model_path),
        "arch": mask.arch,
        "n_layer": mask.n_layer,
        "n_ff": mask.n_ff,
        "fingerprint": mask.fingerprint,
        "backend": backend,
        "device": device if device_map is None else f"map:{device_map}",
        **({"threads": threads or default_threads()} if backend == "llama" or calibrate else {}),
        "n_neurons": len(mask),
        "multiplier": mask.multiplier,
        "static_multiplier": mask.static_multiplier,
        "per_layer": {str(k): v for k, v in mask.per_layer_counts().items()},
        "selection": mask.meta["selection"],
        "schedule": mask.schedule,
        "calibration": mask.meta.get("calibration"),
        "gate": None if mask.gate is None else mask.gate.record(),
        **({"gate_note": result.gate_note} if result.gate_note else {}),
        "seconds": {"load": round(load_seconds, 2), **{k: round(v, 2) for k, v in result.seconds.items()},
                    **({"calibration": round(calibration_seconds, 2)} if calibrate else {}),
                    "total": round(time.perf_counter() - started, 2)},
    }


def _print_summary(s: dict) -> None:
    sel = s["selection"]
    click.echo(f"Wrote {s['out']} ({s['file_bytes'] / 1024:.1f} KB): {s['n_neurons']} neurons in "
               f"{len(s['per_layer'])} of {s['n_layer']} layers, score {sel['score']}, multiplier {s['multiplier']:g}")
    click.echo(f"  model {s['model']} ({s['arch']}, n_ff {s['n_ff']}, fingerprint {s['fingerprint'][:12]}), "
               f"activations in {s.get('backend', 'torch')}")
    click.echo(f"  prompts: {sel['positive']['n']} positive ({sel['positive']['name']}) vs "
               f"{sel['negative']['n']} negative ({sel['negative']['name']})")
    cal = s.get("calibration")
    if cal:
        click.echo(f"  multiplier {cal['chosen']:g} calibrated on {cal['n_prompts']} held-out negative prompts: quality "
                   f"{cal['quality']}, KL {cal['kl']} ({cal['rule']}; {len(cal['tried'])} strengths tried)")
    if s.get("gate_note"):
        click.echo(f"  {s['gate_note']}")
    g = s.get("gate")
    if g:
        oof = g["out_of_fold"]
        whose = "the mask's" if g.get("neurons", "mask") == "mask" else "its own"
        click.echo(f"  gate ({g['method']}, {g['n_neurons']} neurons, {whose}): fires on {oof['tpr']:.0%} of positive and "
                   f"{oof['fpr']:.0%} of negative prompts, out of fold (cap {g['fpr_target']:.0%}; AUC {oof['auc']:.3f})")
        st = g.get("strengthen")
        if st:
            click.echo(f"    strengthening (multiplier > 1): fires on {st['out_of_fold']['tpr']:.0%} of positive and "
                       f"{st['out_of_fold']['fpr']:.0%} of negative prompts, out of fold (cap {st['fpr_target']:.0%})")
        gcal = g.get("calibration")
        if gcal and "chosen" in gcal:
            click.echo(f"  multiplier {gcal['chosen']:g} through the gate ({len(gcal['tried'])} strengths tried: harmful replies "
                       f"{gcal['degenerate']:.0%} degenerate, {gcal['fluency_nll']:.2f} nats/token against "
                       f"{gcal['reference_fluency_nll']:.2f}); {s['static_multiplier']:g} on every prompt (--no-gate)")
    if sel.get("top_k_asked", s["n_neurons"]) > s["n_neurons"]:
        click.echo(f"  {s['n_neurons']} of the {sel['top_k_asked']} neurons asked for: only these have a positive "
                   "selective score (ablating any other is not expected to help)")
    uf = sel["universal_filter"]
    if uf["enabled"]:
        click.echo(f"  universal filter: {uf['n_universal']} neurons top >= {uf['threshold']:.0%} of "
                   f"{len(uf['contrasts'])} unrelated contrasts; {uf['removed']} of them removed from the selection")
    click.echo("  neurons per layer:")
    width = max(s["per_layer"].values())
    for layer, count in s["per_layer"].items():
        click.echo(f"    {int(layer):>3} {'#' * max(1, round(20 * count / width))} {count}")
    t = s["seconds"]
    click.echo("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))
