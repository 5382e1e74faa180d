"""llama.cpp with a neuron mask reproduces PyTorch with the same neurons scaled.

Both sides run the same weights: transformers loads the very GGUF that llama.cpp runs (dequantized), and
PyTorch scales the neurons with a forward pre-hook on `mlp.down_proj`, the reference's hook point.

Tolerance. llama.cpp and PyTorch never agree bit for bit: llama.cpp quantizes the activation to the weight
type's dot-product type (F32 stays F32; Q8_0 weights use Q8_0 activations) and sums in another order. So
each model first measures that floor, `base_err` = max |llama.cpp - torch| with no mask, and a steered
comparison must stay within `TOL_FACTOR * base_err` (plus a tiny absolute term for an F32 floor near 0).
The factor allows for steered activations of up to 2x magnitude (m=2), which scale the quantization error
with them. To show the bound means something, each case also checks that the mask moves the torch logits
by far more than the tolerance: a mask applied to the wrong neurons, or not at all, would fail. For that,
the tiny models get heavier FFN weights (see `ffn_heavy_gguf`); a single neuron still moves the logits
only about 3x the Q8_0 floor, so that one case proves its sensitivity on F32 only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cna_local.runtime import SteeredLlama

from backend import N_GPU_LAYERS

TOL_FACTOR = 3.0
TOL_ABS = 1e-4
# a mask must move the torch logits by at least this many tolerances, or the comparison proves nothing
SENSITIVITY = 3.0
MULTIPLIERS = [0.0, 0.5, 2.0, -1.0]
# token ids present in the SmolLM2 vocabulary the tiny models use
TOKENS = [1, 504, 3458, 314, 260, 1345, 28, 2095, 30, 198, 2, 5356]


def masks_for(n_layer: int, n_ff: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    every = [(il, n) for il in range(n_layer) for n in rng.choice(n_ff, n_ff // 8, replace=False)]
    return {
        "one layer, one neuron": (np.array([n_layer - 1]), np.array([7])),
        "first layer only": (np.zeros(16, int), rng.choice(n_ff, 16, replace=False)),
        "every layer": tuple(np.array(x) for x in zip(*every)),
    }


def torch_logits(model, tokens, layers=None, neurons=None, scale=1.0) -> np.ndarray:
    handles = []
    if layers is not None:
        for il in sorted(set(layers.tolist())):
            idx = torch.tensor(neurons[layers == il], dtype=torch.long)

            def pre_hook(module, args, idx=idx):
                x = args[0].clone()
                x[..., idx] *= scale
                return (x,)

            handles.append(model.model.layers[il].mlp.down_proj.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            out = model(torch.tensor([tokens])).logits[0].double().numpy()
    finally:
        for h in handles:
            h.remove()
    return out


def llama_logits(llm: SteeredLlama, tokens) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


FFN_GAIN = 4.0


@pytest.fixture(scope="module")
def ffn_heavy_gguf(tiny_hf, tmp_path_factory):
    """Tiny models whose FFN weights are scaled up, so the FFN, not the residual, dominates the output.

    With HF's default init the FFN adds little to the residual stream, and masking even a quarter of the
    neurons moves the logits by about the Q8_0 floor; with FFN_GAIN the effect is well above it.
    """
    from transformers import AutoModelForCausalLM

    from tiny_models import to_gguf

    made = {}

    def make(arch, outtype):
        if arch not in made:
            model = AutoModelForCausalLM.from_pretrained(str(tiny_hf(arch)), dtype=torch.float32)
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                        proj.weight.mul_(FFN_GAIN)
            out = tmp_path_factory.mktemp(f"ffn-heavy-{arch}")
            model.save_pretrained(out)
            for f in tiny_hf(arch).glob("*token*"):
                (out / f.name).write_bytes(f.read_bytes())
            made[arch] = out
        return to_gguf(made[arch], outtype, made[arch] / f"model-{outtype}.gguf")

    return make


@pytest.fixture(scope="module", params=[("llama", "f32"), ("qwen2", "f32"), ("llama", "q8_0"), ("qwen2", "q8_0")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request, ffn_heavy_gguf):
    """(SteeredLlama, torch model from the same GGUF, no-mask error floor)."""
    from transformers import AutoModelForCausalLM

    arch, outtype = request.param
    path = ffn_heavy_gguf(arch, outtype)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    llm = SteeredLlama(str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False, n_gpu_layers=N_GPU_LAYERS)
    base_err = np.abs(llama_logits(llm, TOKENS) - torch_logits(model, TOKENS)).max()
    yield llm, model, base_err
    llm.close()


def test_no_mask_floor_is_small(pair):
    """Without a mask both runtimes agree closely: F32 to 0.1% of the largest logit; Q8_0, which also
    quantizes every activation to 8 bits, to 5% (measured: about 3%). A wrong load is far off both.
    On CUDA, ggml runs F32 matmuls through cuBLAS in TF32 (CUBLAS_TF32_TENSOR_OP_MATH: 10-bit mantissa,
    unit roundoff 2^-11), so F32 gets 1% there (measured on an H200: 0.25%)."""
    llm, model, base_err = pair
    scale = np.abs(torch_logits(model, TOKENS)).max()
    f32 = 1e-2 if N_GPU_LAYERS else 1e-3
    rel = f32 if llm.metadata.get("general.file_type") == "0" else 5e-2
    assert base_err < rel * scale, f"no-mask floor {base_err:.3g} vs largest logit {scale:.3g}"


@pytest.mark.parametrize("multiplier", MULTIPLIERS)
def test_masked_logits_match_torch_hook(pair, multiplier):
    llm, model, base_err = pair
    n_layer, n_ff = model.config.num_hidden_layers, model.config.intermediate_size
    tol = TOL_FACTOR * base_err + TOL_ABS
    base_torch = torch_logits(model, TOKENS)
    for name, (layers, neurons) in masks_for(n_layer, n_ff).items():
        llm.steering.set_entries(layers, neurons, np.full(len(layers), multiplier, np.float32))
        got = llama_logits(llm, TOKENS)
        want = torch_logits(model, TOKENS, layers, neurons, multiplier)
        err = np.abs(got - want).max()
        effect = np.abs(want - base_torch).max()
        assert err <= tol, f"{name}, m={multiplier}: max |llama.cpp - torch| = {err:.3g} > {tol:.3g}"
        if name == "one layer, one neuron" and base_err > 1e-3:
            continue  # one neuron moves the logits only ~3x the Q8_0 floor: its sensitivity is proven on F32
        assert effect > SENSITIVITY * tol, f"{name}, m={multiplier}: the mask moves logits by only {effect:.3g}; test too weak"
    llm.steering.clear()


def test_multiplier_one_is_exactly_no_mask(pair):
    llm, model, _ = pair
    llm.steering.clear()
    baseline = llama_logits(llm, TOKENS)
    layers, neurons = masks_for(model.config.num_hidden_layers, model.config.intermediate_size)["every layer"]
    llm.steering.set_entries(layers, neurons, np.ones(len(layers), np.float32))
    assert np.array_equal(llama_logits(llm, TOKENS), baseline)
    llm.steering.clear()


def test_clear_restores_baseline_exactly(pair):
    llm, model, _ = pair
    llm.steering.clear()
    baseline = llama_logits(llm, TOKENS)
    layers, neurons = masks_for(model.config.num_hidden_layers, model.config.intermediate_size)["every layer"]
    llm.steering.set_entries(layers, neurons, np.zeros(len(layers), np.float32))
    assert not np.array_equal(llama_logits(llm, TOKENS), baseline)
    llm.steering.clear()
    assert not llm.steering.active
    assert np.array_equal(llama_logits(llm, TOKENS), baseline)


def test_live_value_change_equals_fresh_set(pair):
    """Changing only the scales reuses the graph; the result must equal setting that mask from scratch."""
    llm, model, _ = pair
    layers, neurons = masks_for(model.config.num_hidden_layers, model.config.intermediate_size)["first layer only"]
    llm.steering.clear()
    llm.steering.set_entries(layers, neurons, np.full(len(layers), 2.0, np.float32))
    fresh = llama_logits(llm, TOKENS)
    llm.steering.set_entries(layers, neurons, np.zeros(len(layers), np.float32))
    llama_logits(llm, TOKENS)  # graph built and run at m=0
    llm.steering.set_entries(layers, neurons, np.full(len(layers), 2.0, np.float32))  # values only
    assert np.array_equal(llama_logits(llm, TOKENS), fresh)
    llm.steering.clear()
