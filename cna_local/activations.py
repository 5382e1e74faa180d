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
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import CnaLocalError
from .loading import LoadedModel, decoder_layers
from .templating import encode_prompts


class ActivationError(CnaLocalError):
    """Activations cannot be collected for this input."""


@dataclass
class ActivationStats:
    """Running statistics of last-token activations, arrays shaped [n_layer, n_ff]."""

    n: int
    sum: np.ndarray  # float64
    sumsq: np.ndarray  # float64
    values: np.ndarray | None = None  # float32 [n, n_layer, n_ff] in prompt order, only with keep=True
    n_tokens: int = 0  # real (non-padding) prompt tokens, all positions
    token_sumsq: np.ndarray | None = None  # float64 [n_layer, n_ff]: sum of squares over all n_tokens positions
    resid_sum: np.ndarray | None = None  # float64 [n_layer, n_embd]: sum of each layer's output at the last token

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.n

    @property
    def var(self) -> np.ndarray:
        """Sample variance (n - 1 in the denominator); zero for a single prompt."""
        if self.n < 2:
            return np.zeros_like(self.sum)
        centered = self.sumsq - self.sum * self.sum / self.n
        return np.maximum(centered, 0.0) / (self.n - 1)  # rounding can make it slightly negative

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    @property
    def token_ms(self) -> np.ndarray:
        """Mean square activation over all prompt tokens (not only the last)."""
        if self.token_sumsq is None or self.n_tokens == 0:
            raise ActivationError("these statistics hold no all-token activations; collect them with collect_activations().")
        return self.token_sumsq / self.n_tokens

    @property
    def resid_mean(self) -> np.ndarray:
        """Mean residual stream after each layer at the last token, [n_layer, n_embd]."""
        if self.resid_sum is None:
            raise ActivationError("these statistics hold no residual-stream sums; collect them with collect_activations().")
        return self.resid_sum / self.n

    @property
    def shape(self) -> tuple[int, int]:
        return self.sum.shape


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
    progress: bool = True,
    desc: str = "activations",
) -> ActivationStats:
    """Run the prompts and return per-[layer, neuron] statistics of the last-token down_proj input."""
    if len(prompts) == 0:
        raise ActivationError(f"the prompt set for {desc!r} is empty. Fix: give at least one prompt.")
    if batch_size < 1:
        raise ActivationError(f"batch size must be at least 1, got {batch_size}.")
    encoded = encode_prompts(loaded.tokenizer, prompts, chat_template=chat_template)
    n_layer, n_ff = loaded.n_layer, loaded.n_ff
    total = np.zeros((n_layer, n_ff), np.float64)
    total_sq = np.zeros((n_layer, n_ff), np.float64)
    values = np.zeros((len(encoded), n_layer, n_ff), np.float32) if keep else None

    # Similar lengths in one batch waste less compute on padding; `order` maps back.
    token_sumsq = np.zeros((n_layer, n_ff), np.float64)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    captured: list[torch.Tensor | None] = [None] * n_layer
    real: dict[str, torch.Tensor] = {}  # the current batch's attention mask, [batch, seq, 1]

    def hook_for(il: int):
        def hook(_module, args):
            x = args[0].detach()
            captured[il] = x[:, -1, :]
            token_sumsq[il] += (x.double().square() * real["mask"]).sum(dim=(0, 1)).cpu().numpy()
        return hook

    resid: list[torch.Tensor | None] = [None] * n_layer

    def resid_hook_for(il: int):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            resid[il] = hidden.detach()[:, -1, :]
        return hook

    handles = [proj.register_forward_pre_hook(hook_for(il)) for il, proj in enumerate(loaded.down_projs)]
    handles += [layer.register_forward_hook(resid_hook_for(il)) for il, layer in enumerate(decoder_layers(loaded.model))]
    resid_sum = np.zeros((n_layer, loaded.down_projs[0].out_features), np.float64)  # n_embd wide
    model = loaded.model
    extra = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1  # only the last position's logits; they are not used anyway
    pad_id = _pad_id(loaded.tokenizer)
    from tqdm.auto import tqdm

    try:
        with torch.inference_mode(), tqdm(total=len(encoded), desc=desc, unit="prompt", file=sys.stderr, disable=not progress, leave=False) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                inputs = _left_padded_batch([encoded[i] for i in idx], pad_id)
                device = next(model.parameters()).device
                real["mask"] = inputs["attention_mask"].to(device, torch.float64)[:, :, None]
                model(**{k: v.to(device) for k, v in inputs.items()}, **extra)
                # [batch, n_layer, n_ff]
                acts = torch.stack([c.to("cpu", torch.float64) for c in captured], dim=1).numpy()
                total += acts.sum(axis=0)
                total_sq += (acts * acts).sum(axis=0)
                resid_sum += torch.stack([r.to("cpu", torch.float64) for r in resid], dim=1).sum(0).numpy()
                if values is not None:
                    values[idx] = acts.astype(np.float32)
                bar.update(len(idx))
    finally:
        for handle in handles:
            handle.remove()
    return ActivationStats(n=len(encoded), sum=total, sumsq=total_sq, values=values,
                           n_tokens=sum(len(ids) for ids in encoded), token_sumsq=token_sumsq,
                           resid_sum=resid_sum)
