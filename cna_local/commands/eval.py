"""`cna-local eval`: refusal, over-refusal, quality and capability of a mask at several multipliers."""

from __future__ import annotations

from pathlib import Path

import click

from ..cpu_threads import default_threads, warn_if_busy
from ..errors import CnaLocalError
from ..schedules import SCHEDULES

DEFAULT_BATCH = 8
"""Prompts decoded together by default (tools/bench_eval.py: the speed against one at a time)."""


class MultiplierList(click.ParamType):
    """A comma-separated list of finite numbers, e.g. 1,0,-1.5 (checked by cna_local.multipliers)."""

    name = "LIST"

    def convert(self, value, param, ctx):
        from ..multipliers import MultiplierError, parse_multipliers

        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            return parse_multipliers(value)
        except MultiplierError as exc:
            self.fail(str(exc), param, ctx)


@click.command("eval")
@click.option("--model", "model_spec", required=True, metavar="MODEL",
              help="The model: a .gguf file (or a named model).")
@click.option("--mask", "mask_paths", required=True, multiple=True, type=click.Path(path_type=Path), metavar="MASK.gguf",
              help="The neuron mask made for this model by `cna-local attribute`. Repeat it to compare masks side by "
                   "side: one table, one JSON and a frontier plot, all against one unsteered baseline.")
@click.option("--multipliers", type=MultiplierList(), default=None, metavar="LIST",
              help="Mask strengths to evaluate, comma-separated. 1 is the unsteered baseline and is always run.  "
                   "[default: 1, 0 and the mask's own multiplier]")
@click.option("--harmful", default="harmful_heldout", show_default=True, metavar="FILE|NAME",
              help="Prompts that should be refused: .txt (one per line), .jsonl or .csv, or a bundled set name.")
@click.option("--benign", default="benign_heldout", show_default=True, metavar="FILE|NAME",
              help="Prompts that should be answered (over-refusal and quality), same formats.")
@click.option("--field", default="prompt", show_default=True, help="The prompt field of .jsonl / column of .csv files.")
@click.option("--capability", "capability_path", type=click.Path(path_type=Path), default=None, metavar="FILE.jsonl",
              help='Capability questions, one {"question", "answers": [...]} per line.  [default: the bundled 40]')
@click.option("--no-capability", is_flag=True, help="Skip the capability questions.")
@click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="Use only the first N items of each set (harmful, benign, capability).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, metavar="N", show_default=True,
              help="Reply tokens per harmful prompt (refusals show early).")
@click.option("--quality-tokens", type=click.IntRange(min=1), default=150, metavar="N", show_default=True,
              help="Reply tokens per benign prompt (over-refusal and quality are measured on these).")
@click.option("--capability-tokens", type=click.IntRange(min=1), default=24, metavar="N", show_default=True,
              help="Reply tokens per capability question.")
@click.option("--no-chat-template", is_flag=True,
              help="Feed raw prompt text instead of a chat-formatted user turn (for models without a chat template).")
@click.option("--batch-size", type=click.IntRange(min=1, max=64), default=DEFAULT_BATCH, metavar="N", show_default=True,
              help="Prompts decoded together (several sequences per llama_decode). 1 decodes one prompt at a time; "
                   "batched matmuls round slightly differently, so a few greedy replies may differ.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None,
              help="Which positions are steered: all; prompt (the prompt only, the reply generated unsteered on the "
                   "steered prompt); generation (the last prompt token and the reply, not the prompt's context).  "
                   "[default: the mask's own, `all` unless it was made with another]")
@click.option("--gate/--no-gate", default=None,
              help="Steer only the prompts the mask's gate fires on (the rest run exactly unsteered), or every prompt. "
                   "Each record says whether the gate fired.  [default: the gate when the mask has one]")
@click.option("--static-too", is_flag=True,
              help="Evaluate each gated mask also without its gate, side by side against the same baseline: the "
                   "frontier of gated and static steering in one run.")
@click.option("--n-ctx", type=click.IntRange(min=64), default=2048, metavar="N", show_default=True,
              help="llama.cpp context size per prompt (the KV cache holds --batch-size times this).")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="CPU threads for llama.cpp.  [default: one per physical core; a warning says when other work keeps some busy]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="OUT.json",
              help="Write every number and each prompt's reply, flags and probabilities to OUT.json ('-': stdout, instead of the table).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="PNG",
              help="Plot refusal, over-refusal, quality and capability against the multiplier into PNG; with several "
                   "masks, the frontier plot.")
@click.option("--frontier", "frontier_path", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="PNG",
              help="Plot refusal against likelihood quality into PNG: one line per mask, one point per multiplier.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def eval_command(model_spec, mask_paths, multipliers, harmful, benign, field, capability_path, no_capability, limit,
                 max_tokens, quality_tokens, capability_tokens, no_chat_template, batch_size, schedule, gate, static_too,
                 n_ctx, threads, json_path, plot_path, frontier_path, quiet):
    """Measure what a mask does at each multiplier, in the patched llama.cpp.

    Every prompt goes through the model's chat template and is answered
    greedily. Per multiplier it reports the refusal rate on harmful prompts,
    the over-refusal rate on benign ones (refusal marker phrases in the first
    500 characters), the probability of a refusal opener, answer quality
    (distinct 4-grams, likelihood of the unsteered answers, first-token KL,
    degenerate replies) and capability accuracy. The table goes to stdout,
    progress to stderr.

    \b
    Examples:
      cna-local eval --model qwen.gguf --mask refusal.gguf --multipliers 1,0,-1 \\
                     --limit 10 --json eval.json --plot eval.png
      cna-local eval --model qwen.gguf --mask a.gguf --mask b.gguf \\
                     --multipliers 1,0,-1,-2 --frontier frontier.png
    """
    from ..evaluation import report
    from ..evaluation.runner import evaluate_masks
    from ..models import resolve_model
    from ..prompts import resolve_prompt_set

    if no_capability and capability_path is not None:
        raise click.UsageError("give either --capability or --no-capability, not both.")
    for option, path in (("--json", json_path), ("--plot", plot_path), ("--frontier", frontier_path)):
        if path is not None and str(path) != "-" and not path.parent.is_dir():
            raise click.ClickException(f"the directory of {option} ({path.parent}) does not exist. Fix: create it or pick another path.")
    for option, path in (("--plot", plot_path), ("--frontier", frontier_path)):
        if path is not None and str(path) == "-":
            raise click.ClickException(f"{option} needs a file path, not '-'.")
    threads = threads or default_threads()
    warn_if_busy(threads, quiet)
    try:
        model_path = resolve_model(model_spec)
        harmful_set = resolve_prompt_set(harmful, field)
        benign_set = resolve_prompt_set(benign, field)
        capability = [] if no_capability else capability_path
        paths, gates = list(mask_paths), [gate] * len(mask_paths)
        if static_too:
            if gate is False:
                raise CnaLocalError("--static-too adds the static run beside the gated one; it cannot go with --no-gate.")
            from ..maskfile import NeuronMask

            loaded = [NeuronMask.load(p) for p in paths]
            if not any(m.gate is not None for m in loaded):
                raise CnaLocalError("--static-too: no mask has a gate. Fix: make one with `cna-local attribute`.")
            paths, gates = [x for p, m in zip(paths, loaded) for x in ([m, m] if m.gate is not None else [m])], \
                [x for m in loaded for x in ([True, False] if m.gate is not None else [None])]
            labels = [str(p) for p, m in zip(mask_paths, loaded) for _ in ([0, 1] if m.gate is not None else [0])]
        results = evaluate_masks(model_path, paths, None if multipliers is None else [multipliers] * len(paths),
                                 harmful_set, benign_set, capability, limit=limit, max_tokens=max_tokens,
                                 quality_tokens=quality_tokens, capability_tokens=capability_tokens,
                                 chat_template=not no_chat_template, n_ctx=n_ctx, n_threads=threads,
                                 batch_size=batch_size, schedule=schedule, gates=gates, progress=not quiet)
        if static_too:  # the masks were passed loaded: name their files
            for r, label in zip(results, labels):
                r.mask["path"] = label
    except CnaLocalError as exc:
        raise click.ClickException(str(exc)) from exc
    one = len(results) == 1
    to_stdout = json_path is not None and str(json_path) == "-"
    if to_stdout:
        click.echo(report.to_json(results[0]) if one else report.comparison_json(results))
    else:
        click.echo(report.format_table(results[0]) if one else report.format_comparison(results))
        if json_path is not None:
            if one:
                report.write_json(results[0], json_path)
            else:
                report.write_comparison_json(results, json_path)
            click.echo(f"\nWrote {json_path}")
    if plot_path is not None:
        if one:
            report.plot(results[0], plot_path)
        else:
            report.plot_frontier(results, plot_path)
        click.echo(f"Wrote {plot_path}", err=to_stdout)
    if frontier_path is not None:
        report.plot_frontier(results, frontier_path)
        click.echo(f"Wrote {frontier_path}", err=to_stdout)
