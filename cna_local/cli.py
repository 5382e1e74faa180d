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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="cna-local")
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
