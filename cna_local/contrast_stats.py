"""Activation statistics of the unrelated contrast pairs, cached per model.

The universal-neuron filter runs ten contrast pairs (about 2.4x the prompts of a
default attribution). Their statistics depend only on the model file, the
contrast prompts and the chat-template switch, so they are computed once and
kept in the cache as .npz (sums and sums of squares per [layer, neuron], at the
last token and over all tokens).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from .activation_stats import ActivationStats, as_source
from .prompts import PromptSet
from .cache import cache_dir

log = logging.getLogger(__name__)

Pair = tuple[PromptSet, PromptSet]


def contrast_cache_dir() -> Path:
    return cache_dir() / "contrast-stats"


def cache_key(loaded, contrasts: list[Pair], chat_template: bool) -> str:
    # The model file itself (not just its fingerprint): two quantizations of one
    # model share a fingerprint but not their activations.
    source = Path(loaded.source).resolve()
    st = source.stat()
    parts = {
        "format": 3,  # 2: with all-token sums of squares; 3: with last-token residual sums
        "source": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns if source.is_file() else None,
        "n_layer": loaded.n_layer, "n_ff": loaded.n_ff, "chat_template": chat_template,
        "pairs": [[a.sha256, b.sha256] for a, b in contrasts],
    }
    backend = getattr(loaded, "backend", "torch")
    if backend != "torch":  # another backend rounds differently (torch's keys stay as they were)
        parts["backend"] = backend
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _save(path: Path, stats: list[tuple[ActivationStats, ActivationStats]]) -> None:
    arrays = {}
    for i, (a, b) in enumerate(stats):
        for side, s in (("a", a), ("b", b)):
            arrays[f"{i}_{side}_n"] = np.array(s.n)
            arrays[f"{i}_{side}_sum"] = s.sum
            arrays[f"{i}_{side}_sumsq"] = s.sumsq
            arrays[f"{i}_{side}_n_tokens"] = np.array(s.n_tokens)
            arrays[f"{i}_{side}_token_sumsq"] = s.token_sumsq
            arrays[f"{i}_{side}_resid_sum"] = s.resid_sum
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=path.parent)
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: readers never see half a file


def _load(path: Path, n_pairs: int) -> list[tuple[ActivationStats, ActivationStats]]:
    with np.load(path) as data:
        def side(i, s):
            return ActivationStats(int(data[f"{i}_{s}_n"]), data[f"{i}_{s}_sum"], data[f"{i}_{s}_sumsq"],
                                   n_tokens=int(data[f"{i}_{s}_n_tokens"]), token_sumsq=data[f"{i}_{s}_token_sumsq"],
                                   resid_sum=data[f"{i}_{s}_resid_sum"])
        return [(side(i, "a"), side(i, "b")) for i in range(n_pairs)]


def contrast_stats(
    loaded, contrasts: list[Pair], batch_size: int = 8, chat_template: bool = True,
    progress: bool = True, use_cache: bool = True,
) -> list[tuple[ActivationStats, ActivationStats]]:
    """(a, b) activation statistics for every contrast pair, from the cache when possible."""
    loaded = as_source(loaded)
    path = contrast_cache_dir() / f"{cache_key(loaded, contrasts, chat_template)}.npz"
    if use_cache and path.is_file():
        try:
            return _load(path, len(contrasts))
        except (OSError, KeyError, ValueError) as exc:  # a damaged entry is recomputed
            log.warning("ignoring unreadable contrast cache %s: %s", path, exc)

    def run(prompts: PromptSet) -> ActivationStats:
        return loaded.collect(prompts.prompts, batch_size=batch_size, chat_template=chat_template,
                              progress=progress, desc=f"contrast {prompts.name}", token_stats=True)

    stats = [(run(a), run(b)) for a, b in contrasts]
    if use_cache:
        try:
            _save(path, stats)
        except OSError as exc:
            log.warning("could not cache contrast statistics in %s: %s", path, exc)
    return stats
