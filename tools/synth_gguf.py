"""Write a GGUF with a real model's shapes, tensor types and tokenizer, and random weights: a stand-in for
a 7-8B Q4_K_M model that no PyPI package ships, so attribution's time and memory on one can be measured here.

Not a model: its weights are random (valid Q4_K/Q6_K blocks, scaled so each weight's spread is about 0.02,
as in trained models), so whatever it says is noise. What it is good for is what depends only on shapes and
tensor types: how long llama.cpp takes per token, and how much memory attribution holds. The tensor types
follow llama.cpp's Q4_K_M rule (llama_tensor_get_type: Q4_K everywhere, Q6_K for the output layer and for
attn_v and ffn_down in the layers `use_more_bits` picks); the tokenizer and chat template are the default
model's (Qwen2.5's, the Qwen 7B's own vocabulary; for the Llama shape 152k tokens where Llama 3 has 128k).

    python tools/synth_gguf.py --shape qwen2.5-7b --out /tmp/synth-7b.gguf       # 4.4 GB, about a minute
    cna-local attribute --model /tmp/synth-7b.gguf --score delta --multiplier -1 --out /tmp/m.gguf --json

(`--score delta`: random weights leave the selective score nothing above zero.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Hugging Face config values of the models these stand in for (their config.json).
SHAPES = {
    "qwen2.5-7b": dict(arch="qwen2", n_embd=3584, n_ff=18944, n_layer=28, n_head=28, n_head_kv=4, tied=False, rope=1e6),
    "qwen2.5-3b": dict(arch="qwen2", n_embd=2048, n_ff=11008, n_layer=36, n_head=16, n_head_kv=2, tied=True, rope=1e6),
    "qwen2.5-1.5b": dict(arch="qwen2", n_embd=1536, n_ff=8960, n_layer=28, n_head=12, n_head_kv=2, tied=False, rope=1e6),
    # Llama-3.1-8B's shapes (its rope scaling left out: it changes no cost); the tokenizer stays --tokenizer-from's
    "llama-3.1-8b": dict(arch="llama", n_embd=4096, n_ff=14336, n_layer=32, n_head=32, n_head_kv=8, tied=False, rope=5e5),
}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule for which layers Q4_K_M gives Q6_K (src/llama-quant.cpp)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_plan(s: dict, n_vocab: int):
    """(name, numpy shape (rows, columns), type name) of every tensor, in llama.cpp's order."""
    e, f, hd = s["n_embd"], s["n_ff"], s["n_embd"] // s["n_head"]
    kv = hd * s["n_head_kv"]
    plan = [("token_embd.weight", (n_vocab, e), "Q6_K" if s["tied"] else "Q4_K")]
    for i in range(s["n_layer"]):
        more = use_more_bits(i, s["n_layer"])
        p = f"blk.{i}."
        bias = s["arch"] == "qwen2"  # Qwen2 has q/k/v biases, Llama none
        plan += [(p + "attn_norm.weight", (e,), "F32"),
                 (p + "attn_q.weight", (e, e), "Q4_K"), *[(p + "attn_q.bias", (e,), "F32")] * bias,
                 (p + "attn_k.weight", (kv, e), "Q4_K"), *[(p + "attn_k.bias", (kv,), "F32")] * bias,
                 (p + "attn_v.weight", (kv, e), "Q6_K" if more else "Q4_K"), *[(p + "attn_v.bias", (kv,), "F32")] * bias,
                 (p + "attn_output.weight", (e, e), "Q4_K"),
                 (p + "ffn_norm.weight", (e,), "F32"),
                 (p + "ffn_gate.weight", (f, e), "Q4_K"), (p + "ffn_up.weight", (f, e), "Q4_K"),
                 (p + "ffn_down.weight", (e, f), "Q6_K" if more else "Q4_K")]
    plan.append(("output_norm.weight", (e,), "F32"))
    if not s["tied"]:
        plan.append(("output.weight", (n_vocab, e), "Q6_K"))
    return plan


def random_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: str) -> np.ndarray:
    """Valid quantized rows: random quants and sub-block scales, super-block scales set so the weights'
    spread is about 0.02 and their mean about 0 (Q4_K: d * sc * q - dmin * m, q in 0..15, sc and m in 0..63;
    Q6_K: d * scale * (q - 32), q in 0..63, scale int8)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    n_blocks = rows * cols // block
    data = np.frombuffer(rng.bytes(n_blocks * size), dtype=np.uint8).reshape(n_blocks, size).copy()
    if qtype == "Q4_K":  # d, dmin (f16) lead the block
        d = np.float16(0.02 / 202)  # std of sc * q with both uniform
        data[:, 0:2] = np.frombuffer(d.tobytes(), np.uint8)
        data[:, 2:4] = np.frombuffer(np.float16(d * 236 / 31.5).tobytes(), np.uint8)  # E[sc q] / E[m]
    else:  # Q6_K: d (f16) ends the block
        data[:, size - 2:] = np.frombuffer(np.float16(0.02 / 1347).tobytes(), np.uint8)
    return data.reshape(rows, cols // block * size)


def copy_tokenizer(writer, source: Path) -> int:
    """The source GGUF's tokenizer.* keys (vocabulary, merges, special ids, chat template); its vocabulary size."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source)
    n_vocab = None
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[1]) if vtype == GGUFValueType.ARRAY else None
        value = field.contents()
        writer.add_key_value(name, value, vtype, sub)
        if name == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    if n_vocab is None:
        raise click.ClickException(f"{source} has no tokenizer.ggml.tokens")
    return n_vocab


@click.command()
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default="qwen2.5-7b", show_default=True)
@click.option("--tokenizer-from", default="default", show_default=True, help="A .gguf or named model whose tokenizer to copy.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--seed", type=int, default=0, show_default=True)
def main(shape, tokenizer_from, out, seed):
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quant_shape_to_byte_shape
    from tqdm import tqdm

    from cna_local.models import resolve_model

    s = SHAPES[shape]
    tmp = out.with_name(out.name + ".partial")  # renamed when whole
    writer = GGUFWriter(tmp, s["arch"])
    writer.add_name(f"synthetic {shape} (random weights)")
    writer.add_context_length(32768)
    writer.add_embedding_length(s["n_embd"])
    writer.add_feed_forward_length(s["n_ff"])
    writer.add_block_count(s["n_layer"])
    writer.add_head_count(s["n_head"])
    writer.add_head_count_kv(s["n_head_kv"])
    writer.add_rope_freq_base(s["rope"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(15)  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    n_vocab = copy_tokenizer(writer, resolve_model(tokenizer_from))
    plan = tensor_plan(s, n_vocab)
    for name, shp, qtype in plan:
        if qtype == "F32":
            writer.add_tensor_info(name, shp, np.dtype(np.float32), 4 * int(np.prod(shp)))
        else:
            qt = GGMLQuantizationType[qtype]
            byte_shape = quant_shape_to_byte_shape(shp, qt)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shp, qtype in tqdm(plan, desc=f"writing {out.name}", unit="tensor"):
        if qtype == "F32":
            writer.write_tensor_data(np.ones(shp, np.float32) if name.endswith("norm.weight") else np.zeros(shp, np.float32))
        else:
            writer.write_tensor_data(random_blocks(rng, shp[0], shp[1], qtype))
    writer.close()
    tmp.replace(out)
    click.echo(f"{out}: {out.stat().st_size / 1e9:.2f} GB, {shape} shapes, {len(plan)} tensors, random weights")


if __name__ == "__main__":
    main()
