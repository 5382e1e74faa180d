"""`cna-local export`: a mask as a LoRA adapter for stock runtimes."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import CnaLocalError


@click.command("export")
@click.argument("mask_path", metavar="MASK.gguf", type=click.Path(path_type=Path))
@click.option("--model", "model_spec", required=True, metavar="MODEL",
              help="The model the mask was made for: its .gguf file (or a named model) for gguf-lora; for peft its "
                   "Hugging Face directory (a .gguf works too, with its dequantized weights).")
@click.option("--format", "fmt", type=click.Choice(["gguf-lora", "peft"]), default="gguf-lora", show_default=True,
              help="gguf-lora: one file for llama.cpp, llama-server, Ollama, LM Studio. peft: a directory for "
                   "transformers + peft and vLLM.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), metavar="PATH",
              help="The adapter file (gguf-lora) or directory (peft).")
@click.option("--multiplier", "m0", type=float, default=None, metavar="M0",
              help="The mask multiplier adapter scale 1 stands for.  [default: the mask's own]")
@click.option("--dtype", type=click.Choice(["f32", "f16"]), default="f32", show_default=True,
              help="gguf-lora tensor type (f16 halves the file; the README gives its measured error).")
@click.option("--force", is_flag=True, help="peft: replace an existing, non-empty --out directory.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def export(mask_path, model_spec, fmt, out, m0, dtype, force, as_json):
    """Write MASK as a LoRA adapter that stock runtimes load, no patch needed.

    A neuron mask is exactly a low-rank change of each steered layer's down
    projection. The adapter's scale becomes the strength: at scale c the mask
    runs at multiplier 1 + c (M0 - 1), so 0 is off and 1 is M0.

    \b
    Examples:
      cna-local export refusal.gguf --model model.gguf --out refusal.lora.gguf
      llama-server -m model.gguf --lora-scaled refusal.lora.gguf:1
      cna-local export refusal.gguf --model ./Qwen2.5-0.5B-Instruct --format peft --out refusal-lora/
      vllm serve ./Qwen2.5-0.5B-Instruct --enable-lora --lora-modules refusal=refusal-lora/
    """
    import json

    try:
        report = _export(mask_path, model_spec, fmt, out, m0, dtype, force)
    except CnaLocalError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"Wrote {report['out']} ({report['bytes'] / 1024:.1f} KB): {report['neurons']} neurons in "
               f"{len(report['ranks'])} layers as a LoRA on ffn_down, scale 1 = multiplier {report['m0']:g}")
    click.echo("  scale -> multiplier: " + ", ".join(f"{c:g} -> {m:g}" for c, m in report["scale_table"]))
    if fmt == "peft":
        vr = report["vllm_max_lora_rank"]
        click.echo(f"  padded rank {report['padded_rank']}; vLLM: --enable-lora"
                   + (f" --max-lora-rank {vr}" if vr else " (rank above vLLM's largest --max-lora-rank, 512)"))


def _export(mask_path, model_spec, fmt, out, m0, dtype, force) -> dict:
    from ..export.gguf_lora import write_gguf_lora
    from ..export.lowrank import ExportError, gguf_down_weights, hf_down_weights, low_rank_updates, multiplier_at_scale
    from ..export.peft_lora import vllm_max_lora_rank, write_peft_lora
    from ..fingerprint import fingerprint_from_gguf, fingerprint_from_hf_dir
    from ..maskfile import NeuronMask
    from ..models import resolve_model
    from ..multipliers import check_multiplier

    mask = NeuronMask.load(mask_path)
    m0 = check_multiplier(mask.default_multiplier(False) if m0 is None else m0, what="--multiplier")
    model = resolve_model(model_spec)
    if model.is_dir():
        if fmt == "gguf-lora":
            raise ExportError(f"{model} is a Hugging Face directory; a llama.cpp adapter is built from the GGUF the runtime "
                              "loads, so that its columns are the ones that model computes with. Fix: pass the .gguf file.")
        fingerprint, weights = fingerprint_from_hf_dir(model), hf_down_weights(model)
    else:
        fingerprint, weights = fingerprint_from_gguf(model), gguf_down_weights(model)
    mask.check_matches(fingerprint, model_label=model.name)
    updates = low_rank_updates(mask, weights, m0)
    if fmt == "gguf-lora":
        written = write_gguf_lora(out, mask, updates, m0, dtype)
        size = written.stat().st_size
    else:
        written = write_peft_lora(out, mask, updates, m0, base_model=str(model), force=force)
        size = sum(f.stat().st_size for f in written.iterdir())
    rank = max(u.rank for u in updates)
    return {"out": str(written), "format": fmt, "bytes": size, "m0": m0, "neurons": sum(u.rank for u in updates),
            "ranks": {str(u.layer): u.rank for u in updates}, "padded_rank": rank if fmt == "peft" else None,
            "vllm_max_lora_rank": vllm_max_lora_rank(rank) if fmt == "peft" else None,
            "scale_table": [(c, multiplier_at_scale(c, m0)) for c in (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)]}
