"""`cna-local serve`: an OpenAI-compatible server with live neuron steering, and a chat page at `/`."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import CnaLocalError


@click.command()
@click.option("--model", "model_spec", required=True, metavar="MODEL",
              help="The model: a .gguf file or a named model (default, qwen-coder-1.5b, smollm2).")
@click.option("--mask", "mask_paths", multiple=True, type=click.Path(path_type=Path), metavar="MASK.gguf",
              help="A neuron mask made for this model; repeat for several. Numbered 0, 1, ... in the order given, "
                   "each starting at its own default multiplier.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--api-key", envvar="CNA_LOCAL_API_KEY", default=None, metavar="KEY",
              help="Require `Authorization: Bearer KEY` on the API (also $CNA_LOCAL_API_KEY). The page asks for it.")
@click.option("--alias", default=None, metavar="NAME", help="The model id in /v1/models.  [default: the file name]")
@click.option("--n-ctx", type=click.IntRange(min=64), default=4096, show_default=True, metavar="N",
              help="Context size (tokens) shared by the conversation and the reply.")
@click.option("--n-ubatch", type=click.IntRange(min=1), default=128, show_default=True, metavar="N",
              help="Micro-batch size. A cached prompt prefix is reused in whole micro-batches, so that a reply never "
                   "depends on earlier requests; smaller reuses more (on CPU prompt speed barely changes).")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="CPU threads for llama.cpp.  [default: llama-cpp-python's, half the cores]")
@click.option("--n-gpu-layers", type=int, default=-1, show_default=True, metavar="N",
              help="Layers to offload to the GPU in a CUDA or Metal build (-1: all; a CPU build ignores it).")
@click.option("--logprobs", is_flag=True,
              help="Keep every token's logits so that requests may ask for logprobs (slower prompt processing).")
@click.option("--chat-format", default=None, metavar="NAME",
              help="llama-cpp-python chat format.  [default: the GGUF's own chat template]")
@click.option("--gate/--no-gate", default=None,
              help="Server-wide: steer only the prompts the mask's gate fires on (the rest exactly unsteered), or every "
                   "prompt; a request's \"gate\" overrides it.  [default: the gate when the one mask served has one]")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="uvicorn's log level.")
def serve(model_spec, mask_paths, host, port, api_key, alias, n_ctx, n_ubatch, threads, n_gpu_layers, logprobs,
          chat_format, gate, log_level):
    """Serve MODEL with an OpenAI-compatible API, neuron masks and a chat page.

    Every request may set the strength of each mask for itself, with an
    extra field (llama-server's `"lora": [{"id", "scale"}]`, for masks):

    \b
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' -d '{
        "messages": [{"role": "user", "content": "Hi!"}],
        "neuron_masks": [{"id": 0, "multiplier": -1.5}]}'

    A mask a request does not list runs at its server-wide multiplier:
    `GET /neuron-masks` lists them, `POST /neuron-masks` with
    `[{"id": 0, "multiplier": 0}]` sets them. Responses say the multipliers
    they ran with (`neuron_masks`, beside `usage`). Open http://127.0.0.1:8080/
    for a chat with a strength slider per mask.

    A mask with a gate steers only the prompts its gate fires on; a request
    may say `"gate": false` (or `true`), and the response's `gate` says
    whether it fired.

    \b
    Example:
      cna-local serve --model default --mask refusal.gguf --port 8080
    """
    try:
        app = _build(model_spec, mask_paths, api_key, alias, n_ctx, n_ubatch, threads, n_gpu_layers, chat_format, logprobs,
                     gate)
    except CnaLocalError as exc:
        raise click.ClickException(str(exc)) from exc
    import uvicorn

    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    click.echo(f"cna-local: page http://{shown}:{port}/  API http://{shown}:{port}/v1  masks http://{shown}:{port}/neuron-masks",
               err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _build(model_spec, mask_paths, api_key, alias, n_ctx, n_ubatch, threads, n_gpu_layers, chat_format, logprobs=False,
           gate=None):
    """Everything that can fail does so here, before the server listens: the model, the masks, their fingerprints."""
    from ..models import resolve_model
    from ..runtime import SteeredLlama
    from ..serve import MaskRegistry, create_app

    registry = MaskRegistry.load(mask_paths)  # a missing or damaged mask file fails before the model loads
    if gate is not None:
        if not registry.slots:
            raise CnaLocalError("--gate/--no-gate needs --mask: there is no mask to gate.")
        try:
            registry.for_request(None, gate)  # the request's checks: a gate needs one mask that has one
        except CnaLocalError as exc:
            raise CnaLocalError(str(exc).replace("gate: ", "--gate: ", 1)) from None
        registry.set_server_wide([{"id": s.id, "gate": gate} for s in registry.slots if gate is False or s.mask.gate is not None])
    model_path = resolve_model(model_spec, progress=lambda m: click.echo(m, err=True))
    if model_path.is_dir() or model_path.suffix.lower() != ".gguf":
        raise CnaLocalError(f"{model_path} is not a .gguf file: the server runs the model in llama.cpp. "
                            "Fix: pass the model's GGUF file (convert a Hugging Face directory with llama.cpp's convert_hf_to_gguf.py).")
    kwargs = dict(n_ctx=n_ctx, n_batch=max(512, n_ubatch), n_ubatch=n_ubatch, n_gpu_layers=n_gpu_layers, logits_all=logprobs)
    if threads is not None:
        kwargs.update(n_threads=threads, n_threads_batch=threads)
    if chat_format is not None:
        kwargs["chat_format"] = chat_format
    llm = SteeredLlama(str(model_path), **kwargs)
    if registry.slots:
        # every mask must belong to this model: the fingerprint error stops the server here, not at a request
        llm.steering.set_masks(registry.masks(), registry.multipliers(), gate=any(registry.gates()))
        for slot in registry.slots:
            gated = ", gated" if registry.gates()[slot.id] else ""
            click.echo(f"mask {slot.id}: {slot.name} ({len(slot.mask)} neurons, multiplier {slot.mask.multiplier:g}{gated}) "
                       f"from {slot.path}", err=True)
    return create_app(llm, registry, model_alias=alias or model_path.stem, api_key=api_key)
