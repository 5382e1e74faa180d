"""The `cna-local` command line: a click group that each command module registers on."""

from __future__ import annotations

import click

from . import __version__
from .commands.attribute import attribute
from .commands.chat import chat
from .commands.demo import demo
from .commands.eval import eval_command
from .commands.export import export
from .commands.inspect import inspect
from .commands.serve import serve


def _print_version(ctx: click.Context, _param, value: bool) -> None:
    """--version: ours, and the llama.cpp build underneath (which CPU kernels it runs is a speed question)."""
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"cna-local {__version__}")
    try:
        from .runtime.binding import build_info

        b = build_info()
    except Exception as exc:  # the version must print even when the library does not load
        click.echo(f"llama.cpp: could not be loaded ({exc})")
    else:
        kind = (f"the best of {len(b['cpu_variants'])} variants ({', '.join(b['cpu_variants'])}) for this CPU"
                if b["cpu_variants"] else "a single library")
        click.echo(f"llama.cpp: patched, from llama-cpp-python {b['llama_cpp_python']}, in {b['library_dir']}")
        click.echo(f"CPU backend: {kind}; features: {' '.join(b['cpu_features']) or 'none beyond x86-64'}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version, the llama.cpp build and the CPU kernels it runs, and exit.")
def cli() -> None:
    """Contrastive Neuron Attribution steering for local LLMs.

    \b
    1. Find the MLP neurons behind a behaviour (by default: refusing harmful
       requests) by contrasting two prompt sets, and save them as a mask file:
         cna-local attribute --model model.gguf --out refusal.gguf
    2. Look at what was found:
         cna-local inspect refusal.gguf
    3. Measure refusal, quality and capability at several strengths:
         cna-local eval --model model.gguf --mask refusal.gguf --plot eval.png

    Or all of it at once on the default model: `cna-local demo`.

    \b
    Then use it where you chat:
      cna-local serve --model model.gguf --mask refusal.gguf   (OpenAI API + page)
      cna-local chat  --model model.gguf --mask refusal.gguf   (terminal)
      cna-local export refusal.gguf --model model.gguf --out refusal.lora.gguf
                                       (a LoRA for llama-server, Ollama, vLLM)

    Start with `cna-local demo --help` or `cna-local attribute --help`.
    """


cli.add_command(attribute)
cli.add_command(inspect)
cli.add_command(eval_command)
cli.add_command(demo)
cli.add_command(serve)
cli.add_command(chat)
cli.add_command(export)


if __name__ == "__main__":
    cli()
