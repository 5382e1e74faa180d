"""`cna-local chat`: a steered chat in the terminal."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import CnaLocalError


@click.command()
@click.option("--model", "model_spec", required=True, metavar="MODEL",
              help="The model: a .gguf file or a named model (default, qwen-coder-1.5b, smollm2).")
@click.option("--mask", "mask_path", type=click.Path(path_type=Path), default=None, metavar="MASK.gguf",
              help="A neuron mask made for this model (without one, the chat is unsteered).")
@click.option("--multiplier", type=float, default=None, metavar="X",
              help="The mask's strength to start with.  [default: the mask's own]")
@click.option("--gate/--no-gate", default=None,
              help="Steer only the messages the mask's gate fires on (the rest exactly unsteered), or every message.  "
                   "[default: the gate when the mask has one]")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.7, show_default=True,
              help="Sampling temperature (0: always the most likely token).")
@click.option("--seed", type=int, default=None, help="Sampling seed, for replies that repeat.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, metavar="N",
              help="Longest reply.")
@click.option("--n-ctx", type=click.IntRange(min=64), default=4096, show_default=True, metavar="N",
              help="Context size: the whole conversation must fit.")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N", help="CPU threads for llama.cpp.")
def chat(model_spec, mask_path, multiplier, gate, temperature, seed, max_tokens, n_ctx, threads):
    """Chat with MODEL in the terminal, with the mask's strength changed live.

    Replies stream as they are generated; the conversation goes through the
    model's own chat template. Commands between messages:

    \b
      /multiplier X   strength from the next reply on (0 ablates, 1 is off, -1 inverts)
      /off            the unsteered model
      /compare        the last message answered unsteered and steered, side by side
      /reset          forget the conversation
      /help, /quit

    It reads standard input, so it also runs from a pipe:

    \b
      printf 'How do I pick a lock?\\n/off\\nHow do I pick a lock?\\n' | \\
          cna-local chat --model default --mask refusal.gguf --temperature 0
    """
    from ..chat import ChatSession
    from ..models import resolve_model
    from ..multipliers import check_multiplier
    from ..runtime import SteeredLlama
    from ..runtime.llama import load_mask

    try:
        if multiplier is not None:
            if mask_path is None:
                raise CnaLocalError("--multiplier needs --mask: there is nothing to scale without a mask.")
            check_multiplier(multiplier, what="--multiplier")
        mask = None if mask_path is None else load_mask(mask_path)
        model_path = resolve_model(model_spec, progress=lambda m: click.echo(m, err=True))
        kwargs = {"n_ctx": n_ctx}
        if threads is not None:
            kwargs.update(n_threads=threads, n_threads_batch=threads)
        llm = SteeredLlama(str(model_path), mask=mask, multiplier=multiplier, gate=gate, **kwargs)
    except CnaLocalError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        session = ChatSession(llm, out=sys.stdout, max_tokens=max_tokens, temperature=temperature, seed=seed)
        session.run(sys.stdin, prompt=sys.stdin.isatty())
    except KeyboardInterrupt:
        click.echo("", err=True)
    finally:
        llm.close()
