"""Per-neuron MLP activations at the last prompt token, for every layer.

The activation of neuron j in layer l is the j-th input of that layer's
`mlp.down_proj` (act(gate) * up), read with a forward pre-hook. Prompts run in
batches with LEFT padding, so position -1 is every prompt's last real token.
Only running sums and sums of squares (float64) are kept per [layer, neuron],
so memory does not grow with the number of prompts (unless keep=True).

The same forward passes also give, for free, each neuron's mean square over ALL
real prompt tokens (`token_ms`): how active it is on ordinary text, which is
what scaling it at every position costs; and the residual stream after every
layer at the last token (`resid_mean`): the direction along which the two sets
differ there. The `selective` score uses both.
"""

from __future__ import annotations

import inspect
import sys
from typing import Sequence

import numpy as np
import torch

from .activation_stats import ActivationError, ActivationStats, as_source  # noqa: F401 (re-exported)
from .loading import LoadedModel, decoder_layers, input_device, module_weight
from .templating import encode_prompts


def _left_padded_batch(batch: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    # Positions count real tokens only, so a padded prompt sees the same
    # positions as when it runs alone.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def collect_activations(
    loaded: LoadedModel,
    prompts: Sequence[str],
    batch_size: int = 8,
    chat_template: bool = True,
    keep: bool = False,
    keep_residual: bool = False,
    progress: bool = True,
    desc: str = "activations",
    bar=None,
) -> ActivationStats:
    """Run the prompts and return per-[layer, neuron] statistics of the last-token down_proj input.

    bar: a tqdm bar shared with other sets (it is advanced, not closed); else the set gets its own."""
    if len(prompts) == 0:
        raise ActivationError(f"the prompt set for {desc!r} is empty. Fix: give at least one prompt.")
    if batch_size < 1:
        raise ActivationError(f"batch size must be at least 1, got {batch_size}.")
    encoded = encode_prompts(loaded.tokenizer, prompts, chat_template=chat_template)
    n_layer, n_ff = loaded.n_layer, loaded.n_ff
    total = np.zeros((n_layer, n_ff), np.float64)
    total_sq = np.zeros((n_layer, n_ff), np.float64)
    values = np.zeros((len(encoded), n_layer, n_ff), np.float32) if keep else None
    n_embd = loaded.down_projs[0].out_features
    resid_values = np.zeros((len(encoded), n_layer, n_embd), np.float32) if keep_residual else None

    # Similar lengths in one batch waste less compute on padding; `order` maps back.
    token_sumsq = np.zeros((n_layer, n_ff), np.float64)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    captured: list[torch.Tensor | None] = [None] * n_layer
    real: dict[str, torch.Tensor] = {}  # the current batch's attention mask, [batch, seq, 1]

    def hook_for(il: int):
        def hook(_module, args):
            x = args[0].detach()
            captured[il] = x[:, -1, :]
            # on the layer's own device (accelerate may have put it on another GPU); MPS has no float64
            wide = torch.float32 if x.device.type == "mps" else torch.float64
            mask = real["mask"].to(x.device, wide)
            token_sumsq[il] += (x.to(wide).square() * mask).sum(dim=(0, 1)).cpu().double().numpy()
        return hook

    resid: list[torch.Tensor | None] = [None] * n_layer

    def resid_hook_for(il: int):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            resid[il] = hidden.detach()[:, -1, :]
        return hook

    handles = [proj.register_forward_pre_hook(hook_for(il)) for il, proj in enumerate(loaded.down_projs)]
    handles += [layer.register_forward_hook(resid_hook_for(il)) for il, layer in enumerate(decoder_layers(loaded.model))]
    resid_sum = np.zeros((n_layer, n_embd), np.float64)
    model = loaded.model
    extra = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1  # only the last position's logits; they are not used anyway
    pad_id = _pad_id(loaded.tokenizer)
    from tqdm.auto import tqdm

    try:
        own = tqdm(total=len(encoded), desc=desc, unit="prompt", file=sys.stderr, disable=not progress or bar is not None,
                   leave=False)
        bar = bar if bar is not None else own
        with torch.inference_mode(), own:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                inputs = _left_padded_batch([encoded[i] for i in idx], pad_id)
                device = input_device(model)
                real["mask"] = inputs["attention_mask"][:, :, None]
                model(**{k: v.to(device) for k, v in inputs.items()}, **extra)
                # [batch, n_layer, n_ff]
                acts = torch.stack([c.to("cpu", torch.float64) for c in captured], dim=1).numpy()
                total += acts.sum(axis=0)
                total_sq += (acts * acts).sum(axis=0)
                res = torch.stack([r.to("cpu", torch.float64) for r in resid], dim=1).numpy()
                resid_sum += res.sum(0)
                if values is not None:
                    values[idx] = acts.astype(np.float32)
                if resid_values is not None:
                    resid_values[idx] = res.astype(np.float32)
                bar.update(len(idx))
    finally:
        for handle in handles:
            handle.remove()
    return ActivationStats(n=len(encoded), sum=total, sumsq=total_sq, values=values,
                           n_tokens=sum(len(ids) for ids in encoded), token_sumsq=token_sumsq,
                           resid_sum=resid_sum, resid_values=resid_values)


class TorchSource:
    """A model loaded in PyTorch (float32 weights) for attribution: the reference backend, and the one for
    Hugging Face directories. The llama backend (cna_local.capture.LlamaSource) has the same interface."""

    backend = "torch"

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.source, self.name = loaded.source, loaded.name
        self.n_layer, self.n_ff = loaded.n_layer, loaded.n_ff

    def collect(self, prompts: Sequence[str], *, desc: str = "activations", token_stats: bool = True,
                keep: bool = False, keep_residual: bool = False, bar=None, progress: bool = True,
                batch_size: int = 8, chat_template: bool = True) -> ActivationStats:
        # all-token sums come with the same forward passes here, so token_stats costs nothing to keep
        return collect_activations(self.loaded, prompts, batch_size=batch_size, chat_template=chat_template, keep=keep,
                                   keep_residual=keep_residual, progress=progress, desc=desc, bar=bar)

    def down_weights(self, progress: bool = False):
        return [module_weight(p) for p in self.loaded.down_projs]

    def fingerprint(self):
        from pathlib import Path

        from .fingerprint import fingerprint_from_gguf, fingerprint_from_hf_dir, fingerprint_from_model

        params = list(self.loaded.model.parameters())
        if all(p.dtype == torch.float32 and p.device.type != "meta" for p in params):
            return fingerprint_from_model(self.loaded.model)
        # bf16 norms (or offloaded ones) would not hash like the file's: hash the file
        source = Path(self.loaded.source)
        return fingerprint_from_gguf(source) if source.suffix.lower() == ".gguf" else fingerprint_from_hf_dir(source)

    def close(self) -> None:
        pass

