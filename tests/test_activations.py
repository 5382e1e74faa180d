"""Loading models and collecting last-token MLP activations on tiny random models."""

import numpy as np
import pytest
import torch

from cna_local.activations import ActivationError, collect_activations
from cna_local.contrast_stats import contrast_cache_dir, contrast_stats
from cna_local.loading import ModelLoadError, UnsupportedModelError, dequantized_cache_dir, load_model
from cna_local.prompts import PromptSet
from cna_local.templating import ChatTemplateError, encode_prompts

PROMPTS = [
    "How do I bake bread?",
    "hi",
    "Write a long poem about the sea, the sky and the stars at night, in ten stanzas please",
    "What is 2+2?",
    "Tell me a joke about cats.",
]


@pytest.fixture(scope="module")
def llama(tiny_llama_hf):
    return load_model(tiny_llama_hf)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_batched_left_padded_equals_one_prompt_at_a_time(tiny_hf, arch):
    loaded = load_model(tiny_hf(arch))
    alone = collect_activations(loaded, PROMPTS, batch_size=1, keep=True, progress=False)
    batched = collect_activations(loaded, PROMPTS, batch_size=4, keep=True, progress=False)
    assert alone.values.shape == (len(PROMPTS), 3, 128)
    scale = np.abs(alone.values).max()
    assert scale > 0
    np.testing.assert_allclose(batched.values, alone.values, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(batched.mean, alone.mean, rtol=0, atol=1e-5 * scale)


def test_the_recorded_value_is_act_gate_times_up_at_the_last_prompt_token(llama):
    layer = 1
    mlp = llama.model.model.layers[layer].mlp
    seen = {}
    handle = mlp.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0][0, -1]))
    try:
        stats = collect_activations(llama, PROMPTS[:1], keep=True, progress=False)
    finally:
        handle.remove()
    x = seen["x"]
    with torch.no_grad():
        expected = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).numpy()
    np.testing.assert_allclose(stats.values[0, layer], expected, rtol=1e-5, atol=1e-7)


def test_running_statistics_match_the_kept_values(llama):
    stats = collect_activations(llama, PROMPTS, batch_size=2, keep=True, progress=False)
    assert stats.n == len(PROMPTS)
    np.testing.assert_allclose(stats.mean, stats.values.mean(axis=0), atol=1e-7)
    np.testing.assert_allclose(stats.std, stats.values.std(axis=0, ddof=1), atol=1e-6)


def test_all_token_mean_square_covers_every_real_prompt_token_and_ignores_padding(llama):
    layer = 2
    proj = llama.down_projs[layer]
    squares, count = [], 0
    for ids in encode_prompts(llama.tokenizer, PROMPTS):
        seen = {}
        handle = proj.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0][0]))
        try:
            with torch.no_grad():
                llama.model(input_ids=torch.tensor([ids]))
        finally:
            handle.remove()
        squares.append((seen["x"].double() ** 2).sum(0).numpy())
        count += len(ids)
    batched = collect_activations(llama, PROMPTS, batch_size=4, progress=False)  # padded batches
    assert batched.n_tokens == count
    expected = np.sum(squares, axis=0) / count
    np.testing.assert_allclose(batched.token_ms[layer], expected, rtol=1e-4, atol=1e-9 * expected.max())


def test_the_residual_mean_is_each_layers_output_at_the_last_prompt_token_padding_or_not(llama):
    outputs = []
    for ids in encode_prompts(llama.tokenizer, PROMPTS):
        with torch.no_grad():
            hidden = llama.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        # hidden_states[0] is the embedding and the last one has the final norm applied: layer il's own
        # output is hidden_states[il + 1] for all but the last layer
        outputs.append(np.stack([h[0, -1].double().numpy() for h in hidden[1:-1]]))
    batched = collect_activations(llama, PROMPTS, batch_size=4, progress=False)
    expected = np.mean(outputs, axis=0)
    assert batched.resid_mean.shape == (llama.n_layer, llama.model.config.hidden_size)
    np.testing.assert_allclose(batched.resid_mean[:-1], expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_without_keep_only_sums_are_held(llama):
    stats = collect_activations(llama, PROMPTS, progress=False)
    assert stats.values is None
    assert stats.sum.shape == (3, 128) and stats.sum.dtype == np.float64


def test_an_empty_prompt_list_is_an_error(llama):
    with pytest.raises(ActivationError, match="empty"):
        collect_activations(llama, [], progress=False)


def test_prompts_go_through_the_chat_template_with_a_generation_prompt(llama):
    tok = llama.tokenizer
    ids = encode_prompts(tok, ["Hello there"])[0]
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHello there<|im_end|>" in text
    expected = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"]
    assert ids == list(expected)


def test_a_tokenizer_without_chat_template_needs_the_raw_fallback(llama):
    tok = llama.tokenizer
    saved = tok.chat_template
    tok.chat_template = None
    try:
        with pytest.raises(ChatTemplateError, match="no chat template.*--no-chat-template"):
            encode_prompts(tok, ["Hello"])
        assert encode_prompts(tok, ["Hello"], chat_template=False) == [tok("Hello")["input_ids"]]
    finally:
        tok.chat_template = saved


def test_mixture_of_experts_models_are_refused(tiny_moe_hf):
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts.*dense"):
        load_model(tiny_moe_hf)


def test_paths_that_are_no_model_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(tmp_path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="neither a Hugging Face model directory nor a .gguf file"):
        load_model(other)


def test_gguf_loads_dequantized_and_the_second_load_comes_from_the_cache(tiny_gguf):
    path = tiny_gguf("llama", "q8_0")
    first = load_model(path)
    entries = list(dequantized_cache_dir().iterdir())
    assert len(entries) == 1 and (entries[0] / "complete.json").is_file()
    second = load_model(path)
    a = collect_activations(first, PROMPTS[:3], keep=True, progress=False)
    b = collect_activations(second, PROMPTS[:3], keep=True, progress=False)
    np.testing.assert_array_equal(a.values, b.values)


def test_contrast_statistics_are_cached_per_model_file_and_prompts(llama, isolated_cache):
    pairs = [(PromptSet("x.a", tuple(PROMPTS[:2])), PromptSet("x.b", tuple(PROMPTS[2:4])))]
    first = contrast_stats(llama, pairs, progress=False)
    assert len(list(contrast_cache_dir().glob("*.npz"))) == 1
    again = contrast_stats(llama, pairs, progress=False)
    for (a1, b1), (a2, b2) in zip(first, again):
        assert (a1.n, b1.n) == (a2.n, b2.n) == (2, 2)
        np.testing.assert_array_equal(a1.sum, a2.sum)
        np.testing.assert_array_equal(b1.sumsq, b2.sumsq)
        assert a1.n_tokens == a2.n_tokens > 0
        np.testing.assert_array_equal(b1.token_ms, b2.token_ms)
        np.testing.assert_array_equal(b1.resid_mean, b2.resid_mean)
    contrast_stats(llama, pairs, chat_template=False, progress=False)  # other settings, other entry
    other_prompts = [(pairs[0][0], PromptSet("x.b", tuple(PROMPTS[1:4])))]
    contrast_stats(llama, other_prompts, progress=False)
    assert len(list(contrast_cache_dir().glob("*.npz"))) == 3
