"""Export a neuron mask as a LoRA adapter, for runtimes without the patch: stock llama.cpp (llama-server,
Ollama, LM Studio) and transformers + peft or vLLM.

Scaling neuron i of layer l by f changes the layer's down projection W (n_embd x n_ff) into
W + (f - 1) W[:, i] e_i^T, so a layer's steered neurons S are a rank-|S| update of `ffn_down`:
A = the one-hot rows e_i^T (i in S), B = the columns (f_i - 1) W[:, i]. At adapter scale c a runtime
computes W x + c B (A x): neuron i is scaled by 1 + c (f_i - 1), that is, the mask runs at multiplier
m = 1 + c (M0 - 1), where M0 is the multiplier the adapter was exported at (scale 1 = M0, 0 = off).

lowrank.py    the per-layer A and B, from the mask and the model's own (dequantized) down weights
gguf_lora.py  a llama.cpp LoRA GGUF (`--lora`, `--lora-scaled FILE:c`, Ollama's ADAPTER)
peft_lora.py  a PEFT LoRA directory (transformers + peft, vLLM --enable-lora)
"""

from .gguf_lora import write_gguf_lora
from .lowrank import ExportError, LayerUpdate, low_rank_updates, multiplier_at_scale
from .peft_lora import write_peft_lora

__all__ = ["ExportError", "LayerUpdate", "low_rank_updates", "multiplier_at_scale", "write_gguf_lora",
           "write_peft_lora"]
