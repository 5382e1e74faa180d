"""A decoding engine over llama.cpp: greedy replies, teacher-forced likelihoods and next-token
distributions on a llama_cpp.Llama, for a group of prompts decoded together.

Each prompt of a group is one sequence of the KV cache (sequence ids 0..B-1, a unified cache), and every
`llama_decode` carries tokens of several sequences: the prompts are packed whole into batches of up to
n_batch tokens, the greedy replies advance one token per sequence per decode, and the teacher-forced
replies are packed like the prompts. A group of one prompt is the one-at-a-time evaluation.

Batched matmuls round differently from single ones (quantized kernels process rows in blocks), so a
prompt's numbers depend slightly on what it was batched with. What is compared across steerings is made
the same way under each: the prompts and teacher-forced replies are packed identically, and the greedy
replies differ only where the steering made them differ.

The schedule says which positions are steered (`SCHEDULES`); the engine calls `phase(name)` before each
kind of position is decoded, and the caller sets the steering for it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from . import quality as Q
from ..schedules import CONTEXT, LAST, REPLY, SCHEDULES
from .errors import EvalError

@dataclass
class Prompt:
    """A prompt evaluated under the current steering: its tokens, its sequence in the KV cache, and the
    next-token logits after it."""

    ids: list[int]
    seq: int
    logits: np.ndarray  # float32 [n_vocab]
    logprobs: np.ndarray  # float64 [n_vocab]
    row: np.ndarray | None = None  # with read_rows: every layer's down-projection input at the last token


@dataclass
class _Segment:
    """Tokens appended to one sequence, from position `pos`; `outputs`: None, "last" or "all"."""

    seq: int
    pos: int
    tokens: list[int]
    outputs: str | None


class Engine:
    """Greedy generation, teacher forcing and next-token distributions for groups of prompts.

    llm: a llama_cpp.Llama whose context has n_seq_max >= batch_size and a unified KV cache when
    batch_size > 1 (`SteeredLlama(..., n_seq_max=N)` opens one). The engine owns the KV cache while it
    runs: every group starts from an empty cache, so a prompt's numbers do not depend on what ran before.
    """

    def __init__(self, llm, chat_template: bool = True, batch_size: int = 1, schedule: str = "all",
                 phase: Callable[[str], None] | None = None):
        import llama_cpp

        if int(batch_size) < 1:
            raise EvalError(f"batch_size must be at least 1, got {batch_size}.")
        if schedule not in SCHEDULES:
            raise EvalError(f"unknown schedule {schedule!r}. Fix: use one of {', '.join(SCHEDULES)}.")
        self._c = llama_cpp
        self.llm = llm
        self.batch_size = int(batch_size)
        self.schedule = schedule
        self.phase = phase or (lambda name: None)
        self.n_vocab = int(llm.n_vocab())
        self.n_ctx = int(llm.n_ctx())
        self._n_batch = int(llm.n_batch)
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._mem = llama_cpp.llama_get_memory(llm.ctx)
        if getattr(llm, "_is_recurrent", False) or getattr(llm, "_is_hybrid", False):
            raise EvalError("the evaluation needs a transformer's KV cache; recurrent and hybrid models are not supported.")
        n_seq_max = int(llama_cpp.llama_n_seq_max(llm.ctx))
        unified = bool(llm.context_params.kv_unified)
        if self.batch_size > 1 and (n_seq_max < self.batch_size or not unified):
            raise EvalError(f"batch size {self.batch_size} needs a context opened for {self.batch_size} sequences in one "
                            f"KV cache; this one has n_seq_max {n_seq_max}, kv_unified {unified}. Fix: open the model "
                            f"with SteeredLlama(..., n_seq_max={self.batch_size}), or use batch size 1.")
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._reader = None  # llama.cpp's FFN capture, for start(read_rows=True)
        self._formatter = self._make_formatter() if chat_template else None

    def close(self) -> None:
        if self._batch is not None:
            self._c.llama_batch_free(self._batch)
            self._batch = None
            self._forget()

    # -- text <-> tokens

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return (self._c.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", errors="replace")

    def _make_formatter(self):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise EvalError(
                f"{self.llm.model_path} has no chat template (no tokenizer.chat_template in the GGUF), so prompts "
                "cannot be formatted as a user turn. Fix: use an instruct/chat model, or pass --no-chat-template."
            )
        return Jinja2ChatFormatter(template=template, eos_token=self._token_text(self.llm.token_eos()),
                                   bos_token=self._token_text(self.llm.token_bos()), add_generation_prompt=True)

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt: a templated user turn with the generation prompt (or the raw text)."""
        if self._formatter is not None:
            try:
                rendered = self._formatter(messages=[{"role": "user", "content": prompt}])
            except Exception as exc:  # jinja errors, raise_exception() in the template
                raise EvalError(f"the model's chat template failed on a prompt ({type(exc).__name__}: {exc}). "
                                "Fix: pass --no-chat-template.") from exc
            ids = self.llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
        else:
            ids = self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
        if not ids:
            raise EvalError(f"prompt {prompt!r} encodes to no tokens. Fix: remove empty prompts.")
        return list(ids)

    def tokenize_reply(self, text: str) -> list[int]:
        """Tokens of text as the start of a reply (no BOS, no special tokens)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def text(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._c.llama_vocab_is_eog(self._vocab, token))

    # -- the KV cache and llama_decode

    def _forget(self) -> None:
        """Empty the KV cache, and tell the Llama its cached prefix is gone (it must not reuse it)."""
        self._c.llama_memory_clear(self._mem, True)
        self.llm.reset()

    def _cut(self, prompt: Prompt) -> None:
        """Keep the prompt's tokens in its sequence and drop whatever followed them."""
        self._c.llama_memory_seq_rm(self._mem, prompt.seq, len(prompt.ids), -1)

    def _run(self, segments: Sequence[_Segment], consume: Callable[[int, int, np.ndarray], None]) -> None:
        """Decode segments, packed whole into batches of up to n_batch tokens (a longer one is split at
        n_batch boundaries, alone); consume(segment index, first row's offset in it, logits rows)."""
        pending: list[tuple[int, int, int]] = []  # (segment, start, stop) in the batch being filled
        filled = 0

        def flush():
            nonlocal filled
            if pending:
                self._decode(segments, pending, consume)
            pending.clear()
            filled = 0

        for i, seg in enumerate(segments):
            n = len(seg.tokens)
            if n > self._n_batch - filled:
                flush()
            for start in range(0, n, self._n_batch):
                stop = min(n, start + self._n_batch)
                pending.append((i, start, stop))
                filled += stop - start
                if filled >= self._n_batch:
                    flush()
        flush()

    def _decode(self, segments, parts, consume) -> None:
        c, batch = self._c, self._batch
        k = 0
        wanted: list[tuple[int, int, int]] = []  # (segment, offset, rows)
        for i, start, stop in parts:
            seg = segments[i]
            rows = 0
            for j in range(start, stop):
                batch.token[k] = seg.tokens[j]
                batch.pos[k] = seg.pos + j
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = seg.seq
                out = seg.outputs == "all" or (seg.outputs == "last" and j == len(seg.tokens) - 1)
                batch.logits[k] = out
                rows += out
                k += 1
            if rows:
                wanted.append((i, start if seg.outputs == "all" else len(seg.tokens) - 1, rows))
        batch.n_tokens = k
        rc = c.llama_decode(self.llm.ctx, batch)
        if rc != 0:
            self._forget()
            raise EvalError(f"llama_decode returned {rc} (1: no room in the KV cache). Fix: raise --n-ctx or lower --batch-size.")
        n_out = sum(r for _, _, r in wanted)
        if n_out:
            logits = np.ctypeslib.as_array(c.llama_get_logits(self.llm.ctx), shape=(n_out, self.n_vocab))
            row = 0
            for i, offset, rows in wanted:
                consume(i, offset, logits[row:row + rows])
                row += rows

    # -- what the measures use

    def start(self, ids_list: Sequence[Sequence[int]], read_rows: bool = False) -> list[Prompt]:
        """Evaluate a group of prompts from an empty KV cache, one sequence each; the logits after each.

        Under the "generation" schedule the prompts' last tokens are decoded in a batch of their own (the
        positions before them unsteered); under the others each prompt is decoded whole. read_rows: also
        read every layer's down-projection input at each prompt's last token (llama.cpp's FFN capture, which
        leaves the logits as they are), for a gate.
        """
        if len(ids_list) > self.batch_size:
            raise EvalError(f"{len(ids_list)} prompts in a group of at most {self.batch_size}.")
        self._forget()
        last: dict[int, np.ndarray] = {}

        def keep_last(i, offset, rows):
            last[i] = rows[-1].copy()

        rows: dict[int, np.ndarray] = {}
        if self.schedule == "generation":
            self.phase(CONTEXT)
            heads = [_Segment(s, 0, list(ids[:-1]), None) for s, ids in enumerate(ids_list) if len(ids) > 1]
            self._run(heads, lambda *a: None)
            self.phase(LAST)
            with self._reading(read_rows, rows):
                self._run([_Segment(s, len(ids) - 1, [ids[-1]], "last") for s, ids in enumerate(ids_list)], keep_last)
        else:
            self.phase(CONTEXT)  # the prompt's positions share one phase here: CONTEXT and LAST steer alike
            with self._reading(read_rows, rows):
                self._run([_Segment(s, 0, list(ids), "last") for s, ids in enumerate(ids_list)], keep_last)
        if read_rows and sorted(rows) != list(range(len(ids_list))):
            raise EvalError(f"llama.cpp's capture returned rows for sequences {sorted(rows)} of {len(ids_list)} prompts.")
        return [Prompt(list(ids), s, last[s], Q.log_softmax(last[s]), rows.get(s)) for s, ids in enumerate(ids_list)]

    @contextlib.contextmanager
    def _reading(self, on: bool, rows: dict):
        if not on:
            yield
            return
        from ..runtime.gating import LastTokenReader

        if self._reader is None:
            shape = self.llm.steering.shape  # a SteeredLlama: the capture is the patched libllama's
            self._reader = LastTokenReader(self.llm.ctx, shape.n_layer, shape.n_ff)
        self._reader.start()
        try:
            yield
            rows.update(self._reader.rows_by_sequence())
        finally:
            self._reader.stop()

    def greedy(self, prompts: Sequence[Prompt], max_tokens: int) -> list[list[int]]:
        """Greedy reply tokens (argmax) after each prompt, without the end-of-generation token; all
        unfinished replies advance together, one token per sequence per decode."""
        for p in prompts:
            self._cut(p)
        self.phase(REPLY)
        outs: list[list[int]] = [[] for _ in prompts]
        nxt = {i: int(np.argmax(p.logits)) for i, p in enumerate(prompts)}  # the next token of each unfinished reply
        while nxt:
            feed, who = [], []
            for i, token in nxt.items():
                if self.is_eog(token):
                    continue
                outs[i].append(token)
                if len(outs[i]) < max_tokens:
                    p = prompts[i]
                    feed.append(_Segment(p.seq, len(p.ids) + len(outs[i]) - 1, [token], "last"))
                    who.append(i)
            nxt = {}

            def keep(j, offset, rows, who=who):
                nxt[who[j]] = int(np.argmax(rows[-1]))

            self._run(feed, keep)
        return outs

    def reply_logprobs(self, prompts: Sequence[Prompt], replies: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """log P(reply[i] | prompt, reply[:i]) for every i: each reply teacher-forced after its prompt.

        Always computed the same way (reply[:-1] packed whole right after the prompt, the replies of a
        group together), so the values under two steerings are comparable: on quantized models
        one-token-at-a-time decoding gives logits that differ from batched decoding by up to ~0.1 nats,
        more than small steering effects.
        """
        out = [[float(p.logprobs[r[0]])] if len(r) else [] for p, r in zip(prompts, replies)]
        segs, owner = [], []
        for i, (p, r) in enumerate(zip(prompts, replies)):
            self._cut(p)
            if len(r) > 1:
                segs.append(_Segment(p.seq, len(p.ids), list(r[:-1]), "all"))
                owner.append(i)
        self.phase(REPLY)

        def consume(j, offset, rows):
            i = owner[j]
            targets = replies[i][1 + offset:1 + offset + len(rows)]
            for r0 in range(0, len(rows), 16):  # bound the float64 temporaries
                out[i].extend(_row_logprobs(rows[r0:r0 + 16], targets[r0:r0 + 16]))

        self._run(segs, consume)
        return [np.asarray(o) for o in out]

    def mean_nll(self, prompts: Sequence[Prompt], replies: Sequence[Sequence[int]]) -> list[float | None]:
        """Mean per-token negative log-likelihood (nats) of each reply after its prompt; None for an empty one."""
        return [None if len(lp) == 0 else float(-lp.mean()) for lp in self.reply_logprobs(prompts, replies)]

    def opener_probs(self, prompts: Sequence[Prompt], openers: Sequence[Sequence[int]]) -> list[tuple[float, float]]:
        """Per prompt: (mass of the openers' distinct first tokens, summed probability of the complete
        opener sequences, each teacher-forced after the prompt; the group's prompts together, one opener
        at a time)."""
        firsts = sorted({o[0] for o in openers})
        out = []
        total = [0.0] * len(prompts)
        for opener in openers:
            for i, lp in enumerate(self.reply_logprobs(prompts, [opener] * len(prompts))):
                total[i] += float(np.exp(lp.sum()))
        for i, p in enumerate(prompts):
            first = float(np.exp(p.logprobs[firsts]).sum())
            out.append((first, min(total[i], 1.0)))
        return out


def _row_logprobs(rows: np.ndarray, targets: Sequence[int]) -> list[float]:
    """log softmax(rows[i])[targets[i]]; exp in float32 after subtracting the row max, sums in float64."""
    mx = rows.max(axis=1)
    sums = np.exp(rows - mx[:, None]).sum(axis=1, dtype=np.float64)
    picked = rows[np.arange(len(rows)), np.asarray(targets)].astype(np.float64)
    return (picked - mx.astype(np.float64) - np.log(sums)).tolist()
