"""A decoding engine over llama.cpp: greedy replies, teacher-forced likelihoods and next-token
distributions on a llama_cpp.Llama, from the same batches under every steering."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import quality as Q
from .errors import EvalError

OPENER_FLOOR = 1e-6
"""Opener sequences whose prefix already has probability below this are counted as 0 (saves decoding)."""


@dataclass
class _Prompt:
    """A prompt evaluated under the current steering: its tokens and the next-token logits after it."""

    ids: list[int]
    logits: np.ndarray  # float32 [n_vocab]
    logprobs: np.ndarray  # float64 [n_vocab]


class Engine:
    """Greedy generation, teacher forcing and next-token distributions on a llama_cpp.Llama.

    Uses the Llama's own bookkeeping (`n_tokens`, `input_ids`) for what the KV cache holds, so a steering
    change (which resets it) is never mixed with cached state. Each prompt is evaluated from an empty cache,
    and everything after it (opener continuations, the greedy reply, teacher forcing) reuses the cached
    prompt, in the same order under every steering, so the numbers of two steerings differ only by the
    steering. Multi-position logits come from its own `llama_batch` through the public llama.cpp C API.
    """

    def __init__(self, llm, chat_template: bool = True):
        import llama_cpp

        self._c = llama_cpp
        self.llm = llm
        self.n_vocab = int(llm.n_vocab())
        self.n_ctx = int(llm.n_ctx())
        self._n_batch = int(llm.n_batch)
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._recurrent = bool(getattr(llm, "_is_recurrent", False) or getattr(llm, "_is_hybrid", False))
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._formatter = self._make_formatter() if chat_template else None

    def close(self) -> None:
        if self._batch is not None:
            self._c.llama_batch_free(self._batch)
            self._batch = None

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

    # -- decoding

    def _last_logits(self) -> np.ndarray:
        ptr = self._c.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Make the KV cache hold exactly `ids`, reusing the longest cached prefix; the logits after the last id."""
        llm = self.llm
        if len(ids) > self.n_ctx:
            raise EvalError(f"{len(ids)} tokens do not fit in the context of {self.n_ctx}. Fix: raise --n-ctx.")
        keep, cached = 0, int(llm.n_tokens)
        if cached and not self._recurrent:
            m = min(cached, len(ids) - 1)  # evaluate at least one token, to get its logits
            if m > 0:
                same = llm.input_ids[:m] == np.asarray(ids[:m], dtype=llm.input_ids.dtype)
                keep = m if same.all() else int(np.argmin(same))
        if keep == 0:
            llm.reset()
        else:
            llm.n_tokens = keep  # Llama.eval removes the KV cells from here on before decoding
        llm.eval(list(ids[keep:]))
        return self._last_logits()

    def start(self, ids: Sequence[int]) -> _Prompt:
        """Evaluate a prompt from an empty KV cache (always the same batches, so comparable across steerings)."""
        self.llm.reset()
        logits = self.prefill(ids)
        return _Prompt(list(ids), logits, Q.log_softmax(logits))

    def _truncate(self, prompt: _Prompt) -> None:
        """Keep the prompt in the KV cache and drop what follows it."""
        n = len(prompt.ids)
        if self.llm.n_tokens < n or not np.array_equal(self.llm.input_ids[:n], prompt.ids):
            raise RuntimeError("the KV cache no longer holds the prompt (was the steering changed mid-prompt?)")
        self.llm.n_tokens = n

    def greedy(self, prompt: _Prompt, max_tokens: int) -> list[int]:
        """Greedy reply tokens (argmax) after the prompt, without the end-of-generation token."""
        self._truncate(prompt)
        logits, out = prompt.logits, []
        limit = min(max_tokens, self.n_ctx - len(prompt.ids))
        while len(out) < limit:
            token = int(np.argmax(logits))
            if self.is_eog(token):
                break
            out.append(token)
            if len(out) >= limit:
                break
            self.llm.eval([token])
            logits = self._last_logits()
        return out

    def _decode_all(self, tokens: Sequence[int]) -> np.ndarray:
        """Decode `tokens` after the cached ones with logits at every position: a [len, n_vocab] view."""
        c, llm, batch = self._c, self.llm, self._batch
        n_past = int(llm.n_tokens)
        c.llama_memory_seq_rm(c.llama_get_memory(llm.ctx), -1, n_past, -1)
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = n_past + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        rc = c.llama_decode(llm.ctx, batch)
        if rc != 0:
            llm.reset()
            raise RuntimeError(f"llama_decode returned {rc}")
        llm.input_ids[n_past:n_past + len(tokens)] = tokens
        llm.n_tokens = n_past + len(tokens)
        return np.ctypeslib.as_array(c.llama_get_logits(llm.ctx), shape=(len(tokens), self.n_vocab))

    def reply_logprobs(self, prompt: _Prompt, reply: Sequence[int]) -> np.ndarray:
        """log P(reply[i] | prompt, reply[:i]) for every i: the reply teacher-forced after the prompt.

        Always computed the same way (reply[:-1] decoded in batches of n_batch right after the prompt), so
        the values under two steerings are comparable: on quantized models one-token-at-a-time decoding
        gives logits that differ from batched decoding by up to ~0.1 nats, more than small steering effects.
        """
        reply = list(reply)
        if not reply:
            return np.zeros(0)
        if len(prompt.ids) + len(reply) - 1 > self.n_ctx:
            raise EvalError(f"prompt and reply ({len(prompt.ids)} + {len(reply)} tokens) exceed the context of {self.n_ctx}. Fix: raise --n-ctx.")
        self._truncate(prompt)
        out = [float(prompt.logprobs[reply[0]])]
        feed, targets = reply[:-1], reply[1:]
        for c0 in range(0, len(feed), self._n_batch):
            chunk = feed[c0:c0 + self._n_batch]
            rows = self._decode_all(chunk)
            for r0 in range(0, len(chunk), 16):  # bound the float64 temporaries
                out.extend(_row_logprobs(rows[r0:r0 + 16], targets[c0 + r0:c0 + min(r0 + 16, len(chunk))]))
        return np.asarray(out)

    def mean_nll(self, prompt: _Prompt, reply: Sequence[int]) -> float | None:
        """Mean per-token negative log-likelihood (nats) of `reply` after `prompt`; None for an empty reply."""
        if not reply:
            return None
        return float(-self.reply_logprobs(prompt, reply).mean())

    def opener_probs(self, prompt: _Prompt, openers: Sequence[Sequence[int]]) -> tuple[float, float]:
        """(mass of the openers' distinct first tokens, summed probability of the complete opener sequences)."""
        first = float(sum(math.exp(prompt.logprobs[t]) for t in {o[0] for o in openers}))
        memo: dict[tuple[int, ...], np.ndarray] = {(): prompt.logprobs}
        floor = math.log(OPENER_FLOOR)
        total = 0.0
        for opener in openers:
            logp = 0.0
            for i, token in enumerate(opener):
                key = tuple(opener[:i])
                if key not in memo:
                    memo[key] = Q.log_softmax(self.prefill(prompt.ids + list(key)))
                logp += float(memo[key][token])
                if logp < floor:
                    break
            else:
                total += math.exp(logp)
        return first, min(total, 1.0)


def _row_logprobs(rows: np.ndarray, targets: Sequence[int]) -> list[float]:
    """log softmax(rows[i])[targets[i]]; exp in float32 after subtracting the row max, sums in float64."""
    mx = rows.max(axis=1)
    sums = np.exp(rows - mx[:, None]).sum(axis=1, dtype=np.float64)
    picked = rows[np.arange(len(rows)), np.asarray(targets)].astype(np.float64)
    return (picked - mx.astype(np.float64) - np.log(sums)).tolist()
