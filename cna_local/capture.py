"""Per-neuron activations collected inside llama.cpp: the attribution's `llama` backend.

The patched libllama's FFN capture (patches/0005, `llama_ffn_capture_*`) reads, while llama_decode runs,
the tensor the neuron mask multiplies (each layer's down-projection input) and the residual stream after
each layer. It hooks the scheduler's eval callback: the graph is unchanged, the scheduler stops after those
nodes and hands them over while they are still in memory, on any backend. Nothing grows with the tokens:
  * at the last token of each sequence a row comes back (every layer's neuron values and residual), and
  * where a set needs it, the per-neuron sum of squares over all its tokens accumulates in llama.cpp.

The model runs quantized, in the memory its file takes: no float32 copy. Prompts are packed whole, several
sequences per decode, each decode from an empty KV cache, so a prompt sees what it would alone. The tokens
every prompt of a set begins with (the chat template's system turn: 24 of the default model's 42 tokens a
prompt) are decoded once, and each sequence of a decode starts from a copy of their KV cells; their values
are the same for every prompt, so their all-token sums count once per prompt. The result
is the torch backend's `ActivationStats`, so every score, the layer range and the universal filter work on
either backend. Numbers differ from torch's by the quantized matmuls' rounding (llama.cpp rounds the
activations to the weights' dot-product type; tests/test_capture.py derives the bound). Q5_0 weights are
held as F16 for the capture on x86-64 with AVX2 (Q5_0_AS_F16): faster, and closer to torch's float32.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import numpy as np

from .activation_stats import ActivationError, ActivationStats
from .cpu_threads import default_threads
from .errors import CnaLocalError

DEFAULT_TOKEN_BUDGET = 128
"""Tokens per llama_decode (one micro-batch): CPU prompt throughput is about flat from 64 up, and every
decode that sums squares over all tokens asks for logits on all of them (n_vocab floats each, twice:
the graph's and the context's buffer), so the budget bounds that memory."""
MAX_SEQS = 64
MIN_SHARED_PREFIX = 4
"""Shorter common prefixes are decoded with each prompt: an extra decode would cost more than it saves."""


Q5_0_AS_F16 = "GGML_CPU_Q5_0_AS_F16"
"""patches/0008's switch, read while a model loads: its Q5_0 matmul weights are held as F16 in the CPU
backend's repack buffer, and prompt-sized matmuls on them take ggml's F16 GEMM instead of the Q5_0 kernel.
A Q4_K_M file whose hidden size is not a multiple of 256 (the default 0.5B model: 896) keeps ~70% of its
matmul weights in Q5_0; its capture ran 1.4x as fast with them as F16 (AVX2; REPORT section 7, stop 35),
at about 2.9x those weights' bytes. Attribution only: decoding one token at a time would be slower on
three times the bytes, so the runtime's models load without it. Set to 0 to keep Q5_0."""


def q5_0_as_f16_applies() -> bool:
    """Whether the capture's model loads with its Q5_0 weights as F16: where it was measured, an x86-64 CPU
    backend built with AVX2 and F16C (llamafile's F16 GEMM), unless GGML_CPU_Q5_0_AS_F16 is set (to 0: keep
    Q5_0)."""
    if Q5_0_AS_F16 in os.environ:
        return os.environ[Q5_0_AS_F16] != "0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    import llama_cpp

    features = llama_cpp.llama_print_system_info().decode(errors="replace")
    return "AVX2 = 1" in features and "F16C = 1" in features


@contextmanager
def _q5_0_as_f16():
    """The switch on for one model load (a user's own setting wins), then restored: later loads, the
    runtime's, keep Q5_0."""
    if Q5_0_AS_F16 in os.environ or not q5_0_as_f16_applies():
        yield
        return
    os.environ[Q5_0_AS_F16] = "1"
    try:
        yield
    finally:
        os.environ.pop(Q5_0_AS_F16, None)


class CaptureError(CnaLocalError):
    """llama.cpp could not capture the activations."""


class LlamaSource:
    """A GGUF model opened in the patched llama.cpp for attribution: prompts in, ActivationStats out."""

    backend = "llama"

    def __init__(self, path: str | Path, *, chat_template: bool = True, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 n_threads: int | None = None, n_gpu_layers: int = 0, use_cache: bool = True,
                 share_prefix: bool = True, skip_output_layer: bool = True):
        from .fingerprint import fingerprint_from_gguf

        self.source = Path(path)
        self.name = self.source.stem
        self.chat_template = chat_template
        self._fp = fingerprint_from_gguf(self.source, use_cache=use_cache)
        self.arch, self.n_layer, self.n_ff, self.n_embd = self._fp.arch, self._fp.n_layer, self._fp.n_ff, self._fp.n_embd
        self._threads = n_threads
        self._gpu_layers = n_gpu_layers
        self.llm = None
        self._down = None
        self.budget = int(token_budget)
        self.share_prefix = share_prefix
        self.shared_prefix = 0  # tokens decoded once for the whole set by the last collect
        # stop each decode after the last layer: attribution reads no logits, and the output layer over a
        # 150k vocabulary is a quarter of a small model's work when every token has an output (token_stats)
        self.skip_output_layer = skip_output_layer
        self._open(self.budget)

    # -- the context

    def _open(self, budget: int) -> None:
        from .evaluation.engine import Engine
        from .runtime.llama import SteeredLlama

        self.close()
        threads = self._threads or default_threads()  # nothing else runs meanwhile: every physical core
        kwargs = {"n_threads": threads, "n_threads_batch": threads}
        # one micro-batch per decode: the capture's rows are "the last token of each sequence in a micro-batch"
        # use_mmap=False: the CPU backend repacks most Q4_K weights into a copy of its own, and the mapped
        # file pages it read them from would stay resident beside it (measured on the 1.5B model: peak
        # RSS 1.99 GB mapped, 1.38 GB read; the same activations)
        with _q5_0_as_f16():  # Q5_0 weights as F16 for this model only (Q5_0_AS_F16)
            self.llm = SteeredLlama(str(self.source), n_ctx=budget, n_batch=budget, n_ubatch=budget,
                                    use_mmap=False, n_seq_max=min(MAX_SEQS, budget), n_gpu_layers=self._gpu_layers,
                                    **kwargs)
        self.budget = budget
        self._encoder = Engine(self.llm, chat_template=self.chat_template)  # the runtime's own prompt encoding

    def release(self) -> None:
        """Free the llama.cpp model and context (reopened when prompts come again): the scores are computed
        after the activations, and need not hold both in memory at once."""
        if self.llm is not None:
            self._encoder.close()
            self.llm.close()
            self.llm = None

    def close(self) -> None:
        self.release()
        self._down = None

    def fingerprint(self):
        return self._fp

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        if self.llm is None:
            self._open(self.budget)
        return [self._encoder.encode(p) for p in prompts]

    # -- collecting

    def collect(self, prompts: Sequence[str], *, desc: str = "activations", token_stats: bool = True,
                keep: bool = False, keep_residual: bool = False, bar=None, progress: bool = True,
                **_ignored) -> ActivationStats:
        """Statistics of the down-projection input at each prompt's last token (and, with token_stats, the
        per-neuron sum of squares over all its tokens, which asks llama.cpp for logits on every token).
        keep: each prompt's values too; keep_residual: each prompt's residual rows too (a study's, not
        attribution's: the gate reads neurons)."""
        import llama_cpp

        from .runtime import binding

        if len(prompts) == 0:
            raise ActivationError(f"the prompt set for {desc!r} is empty. Fix: give at least one prompt.")
        if self.llm is None:
            self._open(self.budget)
        encoded = self.encode(prompts)
        longest = max(len(ids) for ids in encoded)
        if longest > self.budget:  # whole prompts per decode: widen the context to the longest one
            self._open(-(-longest // 64) * 64)
        lib = binding.lib()
        ctx = self.llm.ctx
        flags = binding.CAPTURE_ROWS | (binding.CAPTURE_TOKEN_SUMSQ if token_stats else 0)
        flags |= binding.CAPTURE_NO_LOGITS if self.skip_output_layer else 0
        rc = lib.llama_ffn_capture_start(ctx, flags)
        if rc != 0:
            raise CaptureError(f"llama.cpp refused to capture activations: {binding.CAPTURE_MESSAGES.get(rc, rc)}.")
        n_layer, n_ff, n_embd = self.n_layer, self.n_ff, self.n_embd
        total = np.zeros((n_layer, n_ff), np.float64)
        total_sq = np.zeros((n_layer, n_ff), np.float64)
        resid_sum = np.zeros((n_layer, n_embd), np.float64)
        values = np.zeros((len(encoded), n_layer, n_ff), np.float32) if keep else None
        resid_values = np.zeros((len(encoded), n_layer, n_embd), np.float32) if keep_residual else None
        ffn_w, resid_w = ctypes.c_int64(), ctypes.c_int64()
        lib.llama_ffn_capture_sizes(ctx, None, ctypes.byref(ffn_w), ctypes.byref(resid_w))
        if ffn_w.value != n_layer * n_ff or resid_w.value != n_layer * n_embd:
            lib.llama_ffn_capture_stop(ctx)
            raise CaptureError(f"llama.cpp captures rows of {ffn_w.value} neuron and {resid_w.value} residual values; "
                               f"this {n_layer}-layer model needs {n_layer * n_ff} and {n_layer * n_embd}. "
                               "Models with a different FFN width per layer are not supported.")
        mem = llama_cpp.llama_get_memory(ctx)
        limit = int(llama_cpp.llama_n_seq_max(ctx))
        shared = self._common_prefix(encoded) if self.share_prefix and limit > 1 else 0
        self.shared_prefix = shared
        prefix_seq = limit - 1  # the prefix's cells live in the last sequence; prompts use the others
        batch = llama_cpp.llama_batch_init(self.budget, 0, 1)
        own_bar = None
        if bar is None:
            from tqdm.auto import tqdm

            bar = own_bar = tqdm(total=len(encoded), desc=desc, unit="prompt", file=sys.stderr,
                                 disable=not progress, leave=False)

        def decode(seqs_tokens, n_group):
            """Decode [(seq, ids, first position)] and take the capture's rows: (seq ids, ffn, resid)."""
            n = 0
            for seq, ids, start in seqs_tokens:
                for k, token in enumerate(ids):
                    batch.token[n] = token
                    batch.pos[n] = start + k
                    batch.n_seq_id[n] = 1
                    batch.seq_id[n][0] = seq
                    batch.logits[n] = token_stats or k == len(ids) - 1
                    n += 1
            batch.n_tokens = n
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise CaptureError(f"llama_decode failed with code {rc} on {n_group} prompts of {n} tokens.")
            status = lib.llama_ffn_capture_status(ctx)
            if status != 0:
                raise CaptureError(f"llama.cpp could not capture the activations: {binding.CAPTURE_MESSAGES.get(status, status)}.")
            seqs = np.zeros(n_group, np.int32)
            ffn = np.empty((n_group, n_layer * n_ff), np.float32)
            res = np.empty((n_group, n_layer * n_embd), np.float32)
            got = lib.llama_ffn_capture_take_rows(
                ctx, seqs.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                ffn.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                res.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n_group)
            if got != n_group:
                raise CaptureError(f"llama.cpp returned {got} rows for {n_group} sequences (sequences {seqs.tolist()}).")
            return seqs, ffn, res

        try:
            llama_cpp.llama_memory_clear(mem, True)
            prefix_sumsq = None
            if shared:
                decode([(prefix_seq, encoded[0][:shared], 0)], 1)  # its row is not a prompt's: dropped
                if token_stats:
                    prefix_sumsq = np.zeros(n_layer * n_ff, np.float64)
                    lib.llama_ffn_capture_sumsq(ctx, prefix_sumsq.ctypes.data_as(ctypes.POINTER(ctypes.c_double)))
            capacity = self.budget - shared  # the prefix's cells stay in the cache
            order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths pack well
            for group in self._packs([encoded[i][shared:] for i in order], order, capacity, limit - (1 if shared else 0)):
                if shared:
                    for seq in range(len(group)):
                        llama_cpp.llama_memory_seq_cp(mem, prefix_seq, seq, 0, shared)
                seqs, ffn, res = decode([(seq, ids, shared) for seq, (_, ids) in enumerate(group)], len(group))
                if sorted(seqs.tolist()) != list(range(len(group))):
                    raise CaptureError(f"llama.cpp returned rows for sequences {seqs.tolist()}, not 0..{len(group) - 1}.")
                acts = np.empty((len(group), n_layer, n_ff), np.float64)
                acts[seqs] = ffn.reshape(len(group), n_layer, n_ff)
                if not np.isfinite(acts).all():
                    raise CaptureError("some captured activations are NaN or infinite: a layer was not captured, or the "
                                       "model overflows. Fix: check the model file with `cna-local eval`.")
                total += acts.sum(axis=0)
                total_sq += (acts * acts).sum(axis=0)
                rows = np.empty((len(group), n_layer, n_embd), np.float32)
                rows[seqs] = res.reshape(len(group), n_layer, n_embd)
                resid_sum += rows.astype(np.float64).sum(axis=0)
                if values is not None:
                    values[[i for i, _ in group]] = acts.astype(np.float32)
                if resid_values is not None:
                    resid_values[[i for i, _ in group]] = rows
                for seq in range(len(group)):  # drop the prompts' cells, keep the prefix's
                    llama_cpp.llama_memory_seq_rm(mem, seq, -1, -1)
                bar.update(len(group))
            token_sumsq, n_tokens = None, sum(len(ids) for ids in encoded)
            if token_stats:
                sums = np.zeros(n_layer * n_ff, np.float64)
                summed = lib.llama_ffn_capture_sumsq(ctx, sums.ctypes.data_as(ctypes.POINTER(ctypes.c_double)))
                repeats = len(encoded) - 1 if shared else 0  # the prefix was decoded once, for every prompt
                if summed + repeats * shared != n_tokens:
                    raise CaptureError(f"llama.cpp summed {summed} tokens, the prompts hold {n_tokens - repeats * shared}.")
                if shared:
                    sums += repeats * prefix_sumsq
                token_sumsq = sums.reshape(n_layer, n_ff)
        finally:
            llama_cpp.llama_batch_free(batch)
            lib.llama_ffn_capture_stop(ctx)
            llama_cpp.llama_memory_clear(mem, True)
            if own_bar is not None:
                own_bar.close()
        return ActivationStats(n=len(encoded), sum=total, sumsq=total_sq, values=values,
                               n_tokens=n_tokens if token_stats else 0, token_sumsq=token_sumsq, resid_sum=resid_sum,
                               resid_values=resid_values)

    @staticmethod
    def _common_prefix(encoded: list[list[int]]) -> int:
        """Tokens every prompt begins with, leaving each at least its last token; 0 when too few to pay."""
        if len(encoded) < 2:
            return 0
        first, shortest = encoded[0], min(len(ids) for ids in encoded)
        n = 0
        while n < shortest - 1 and all(ids[n] == first[n] for ids in encoded):
            n += 1
        return n if n >= MIN_SHARED_PREFIX else 0

    @staticmethod
    def _packs(encoded: list[list[int]], index: list[int], capacity: int, limit: int):
        """Groups of (prompt index, ids), whole prompts, at most capacity tokens and limit sequences each."""
        group, used = [], 0
        for i, ids in zip(index, encoded):
            if group and (used + len(ids) > capacity or len(group) == limit):
                yield group
                group, used = [], 0
            group.append((i, ids))
            used += len(ids)
        if group:
            yield group

    # -- weights the selective score needs

    def down_weights(self, progress: bool = False) -> "DownWeights":
        if self._down is None:  # one reader for every score of this source (the contrasts' too)
            self._down = DownWeights(self.source, self.n_layer, progress)
        return self._down


class DownWeights:
    """Each layer's down projection [n_embd, n_ff] as float32, dequantized from the GGUF one layer at a time
    (the selective score reads one row product per layer; no full float32 copy is ever held). The file's
    tensor table comes from ggml's parser (cna_local.gguf_index): milliseconds, not gguf-py's seconds."""

    def __init__(self, path: Path, n_layer: int, progress: bool = False):
        self.path, self.n_layer, self.progress = path, n_layer, progress
        self._index = None

    def __len__(self) -> int:
        return self.n_layer

    def __iter__(self):
        from tqdm.auto import tqdm

        from .gguf_index import GGUFIndex

        if self._index is None:
            self._index = GGUFIndex(self.path)
        for il in tqdm(range(self.n_layer), desc="down projections", unit="layer", file=sys.stderr,
                       disable=not self.progress, leave=False):
            name = f"blk.{il}.ffn_down.weight"
            if name not in self._index.tensors:
                raise CaptureError(f"{self.path} has no tensor {name}: not a dense FFN model.")
            yield self._index.array(name)
