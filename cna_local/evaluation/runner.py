"""Run the evaluation: one SteeredLlama, every prompt at every multiplier, greedy decoding.

Protocol (the numbers in `EvalResult` mean exactly this):

* **Prompts** go through the GGUF's own chat template (`tokenizer.chat_template`, rendered as
  llama-cpp-python's `Jinja2ChatFormatter` renders it for `create_chat_completion`) as one user message
  with the generation prompt; with `chat_template=False` the raw text with the model's BOS.
* **Decoding** is greedy: the argmax of the logits at every step (temperature 0, no repetition penalty),
  until an end-of-generation token or the token limit: `max_tokens` (64) for harmful prompts, whose
  refusals show early; `quality_tokens` (150) for the benign answers that quality is measured on;
  `capability_tokens` (24) for the capability questions.
* **Multiplier 1 is the baseline**, run with the mask cleared (the unpatched computation). It is always
  evaluated, and reported as the row of multiplier 1 (added first when `multipliers` lacks 1). Every other
  multiplier scales the mask's neurons by that factor, changed live on the same model (no reload).
* **Per prompt** (prompts outer, multipliers inner, so only one prompt's unsteered reference is held):
  harmful: refusal-opener probabilities, greedy reply, refusal markers (refusal.py), and the distinct word
  4-grams of the reply (the reference implementation's quality, which it measures on these replies);
  benign: the same, plus quality (quality.py): distinct word 4-grams and token repetition of the reply,
  first-token KL(unsteered || steered), and the steered model's per-token NLL of the *unsteered* greedy
  reply, teacher-forced (batched) under each multiplier including the baseline;
  capability: greedy reply, answer matched as a whole word (capability.py).

Memory: the model, its KV cache (n_ctx) and a few full-vocabulary logit vectors; nothing grows with the
number of prompts except the per-prompt records.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np

from ..errors import CnaLocalError
from . import quality as Q
from .capability import CapabilityItem, load_capability
from .refusal import REFUSAL_MARKERS, REFUSAL_OPENERS, WINDOW, prefix_free, refusal_markers

if TYPE_CHECKING:
    from ..maskfile import NeuronMask
    from ..prompts import PromptSet
    from ..runtime import SteeredLlama

DEFAULT_MULTIPLIERS = (1.0, 0.0, -1.0)
DEFAULT_HARMFUL = "harmful_heldout"
DEFAULT_BENIGN = "benign_heldout"
BASELINE = 1.0
OPENER_FLOOR = 1e-6
"""Opener sequences whose prefix already has probability below this are counted as 0 (saves decoding)."""

PromptsLike = Union["PromptSet", Sequence[str], None]


class EvalError(CnaLocalError):
    """The evaluation cannot run with these inputs."""


# --------------------------------------------------------------------------------------------- results

@dataclass
class MultiplierResult:
    """Everything measured at one multiplier; `summary` holds the aggregate numbers."""

    multiplier: float
    baseline: bool
    harmful: list[dict] = field(default_factory=list)
    benign: list[dict] = field(default_factory=list)
    capability: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    summary: dict = field(default_factory=dict)


@dataclass
class EvalResult:
    model: str
    mask: dict
    settings: dict
    rows: list[MultiplierResult]  # in the order asked for; the baseline (multiplier 1) first if not asked for
    seconds: float

    @property
    def baseline(self) -> MultiplierResult:
        return next(r for r in self.rows if r.baseline)

    def row(self, multiplier: float) -> MultiplierResult:
        for r in self.rows:
            if r.multiplier == float(multiplier):
                return r
        raise KeyError(multiplier)

    def summaries(self) -> list[dict]:
        return [{"multiplier": r.multiplier, "baseline": r.baseline, **r.summary} for r in self.rows]

    def to_dict(self, records: bool = True) -> dict:
        rows = []
        for r in self.rows:
            row: dict[str, Any] = {"multiplier": r.multiplier, "baseline": r.baseline, **r.summary}
            if records:
                row["records"] = {"harmful": r.harmful, "benign": r.benign, "capability": r.capability}
            rows.append(row)
        return {"model": self.model, "mask": self.mask, "settings": self.settings, "rows": rows,
                "seconds": round(self.seconds, 2)}


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(row: MultiplierResult, baseline: MultiplierResult) -> dict:
    """The aggregate numbers of one multiplier (None where a set was empty or skipped)."""
    h, b, c = row.harmful, row.benign, row.capability
    accuracy = _mean(r["correct"] for r in c)
    base_accuracy = _mean(r["correct"] for r in baseline.capability)
    return {
        "refusal_rate": _mean(r["refused"] for r in h),
        "over_refusal_rate": _mean(r["refused"] for r in b),
        "opener_prob_harmful": _mean(r["opener_prob"] for r in h),
        "opener_prob_benign": _mean(r["opener_prob"] for r in b),
        "opener_seq_prob_harmful": _mean(r["opener_seq_prob"] for r in h),
        "opener_seq_prob_benign": _mean(r["opener_seq_prob"] for r in b),
        "quality_distinct4": _mean(r["distinct4"] for r in b),
        # the reference implementation scores the replies to the harmful prompts it steers: comparable numbers
        "quality_distinct4_harmful": _mean(r["distinct4"] for r in h),
        "quality_likelihood": _mean(r["likelihood_quality"] for r in b),
        "kl_first_token": _mean(r["kl_first_token"] for r in b),
        "degenerate_rate": _mean(r["degenerate"] for r in b),
        "capability_accuracy": accuracy,
        "capability_retention": (accuracy / base_accuracy) if accuracy is not None and base_accuracy else None,
        "n_harmful": len(h),
        "n_benign": len(b),
        "n_capability": len(c),
        "seconds": round(row.seconds, 2),
    }


# ---------------------------------------------------------------------------------------------- engine

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


# ------------------------------------------------------------------------------------------- evaluate

def _prompt_list(prompts: PromptsLike, default: str, what: str) -> tuple[str, list[str]]:
    from ..prompts import PromptSet, load_bundled

    if prompts is None:
        ps = load_bundled(default)
        return ps.name, list(ps.prompts)
    if isinstance(prompts, PromptSet):
        return prompts.name, list(prompts.prompts)
    if isinstance(prompts, str):
        raise EvalError(f"the {what} prompts must be a PromptSet or a list of strings, not one string.")
    items = [str(p).strip() for p in prompts]
    if not items or not all(items):
        raise EvalError(f"the {what} prompt list is empty or holds an empty prompt. Fix: give at least one non-empty prompt.")
    return what, items


def check_multipliers(multipliers: Sequence[float]) -> list[float]:
    """Finite floats, duplicates dropped (order kept); raises EvalError on anything else."""
    values: list[float] = []
    for m in multipliers:
        try:
            v = float(m)
        except (TypeError, ValueError):
            raise EvalError(f"multiplier {m!r} is not a number. Fix: give numbers such as 1,0,-1.") from None
        if not math.isfinite(v):
            raise EvalError(f"multiplier {m!r} is not a finite number. Fix: give numbers such as 1,0,-1 (0 ablates, 1 is the baseline, -1 inverts).")
        v = v + 0.0  # -0.0 -> 0.0
        if v not in values:
            values.append(v)
    if not values:
        raise EvalError("no multipliers given. Fix: give at least one, e.g. 1,0,-1.")
    return values


def _check_gguf(path: Path) -> None:
    if path.is_dir() or not path.is_file():
        raise EvalError(f"{path} is not a .gguf file: the evaluation runs the model in llama.cpp. "
                        "Fix: pass the GGUF file of the model (convert a Hugging Face directory with llama.cpp's convert_hf_to_gguf.py).")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise EvalError(f"{path} is not a GGUF file. Fix: pass the model's .gguf file.")


def _mask_info(mask: "NeuronMask", path: str | None) -> dict:
    return {"path": path, "name": mask.meta.get("name", ""), "model_name": mask.model_name, "arch": mask.arch,
            "n_neurons": len(mask), "per_layer": {str(k): v for k, v in mask.per_layer_counts().items()},
            "fingerprint": mask.fingerprint, "default_multiplier": mask.multiplier}


def evaluate(
    llm_or_path: Union["SteeredLlama", str, Path],
    mask: Union["NeuronMask", str, Path],
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    harmful: PromptsLike = None,
    benign: PromptsLike = None,
    capability: Sequence[CapabilityItem] | str | Path | None = None,
    *,
    limit: int | None = None,
    max_tokens: int = 64,
    quality_tokens: int = 150,
    capability_tokens: int = 24,
    chat_template: bool = True,
    n_ctx: int = 2048,
    n_threads: int = 2,
    progress: bool = True,
) -> EvalResult:
    """Evaluate `mask` at each multiplier against the unsteered model (see the module docstring).

    llm_or_path: a SteeredLlama (its steering is restored afterwards; n_ctx/n_threads are then its own) or
      the path of a GGUF model, opened with `n_ctx` and `n_threads` (and closed afterwards).
    mask: a NeuronMask or a mask file path; it must belong to the model.
    harmful, benign: PromptSets or lists of strings; None = the bundled held-out sets.
    capability: CapabilityItems or a .jsonl path; None = the bundled questions; [] = skip.
    limit: use only the first `limit` items of each set.
    """
    from ..maskfile import NeuronMask

    started = time.perf_counter()
    values = check_multipliers(multipliers)
    for name, value in (("max_tokens", max_tokens), ("quality_tokens", quality_tokens), ("capability_tokens", capability_tokens)):
        if int(value) < 1:
            raise EvalError(f"{name} must be at least 1, got {value}.")
    if limit is not None and int(limit) < 1:
        raise EvalError(f"limit must be at least 1, got {limit}.")
    mask_path = None
    if not isinstance(mask, NeuronMask):
        mask_path = str(mask)
        mask = NeuronMask.load(mask)
    harmful_name, harmful_prompts = _prompt_list(harmful, DEFAULT_HARMFUL, "harmful")
    benign_name, benign_prompts = _prompt_list(benign, DEFAULT_BENIGN, "benign")
    if capability is None or isinstance(capability, (str, Path)):
        capability_name = "capability" if capability is None else str(capability)
        items = load_capability(capability)
    else:
        capability_name, items = "capability", list(capability)
    if limit is not None:
        harmful_prompts, benign_prompts, items = harmful_prompts[:limit], benign_prompts[:limit], items[:limit]

    own = isinstance(llm_or_path, (str, Path))
    if own:
        from ..runtime import SteeredLlama

        model_path = Path(llm_or_path)
        _check_gguf(model_path)
        llm = SteeredLlama(str(model_path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    else:
        llm = llm_or_path
        if not hasattr(llm, "steering"):
            raise EvalError("evaluate() needs a cna_local.runtime.SteeredLlama (or a model path), not a plain Llama.")
        model_path = Path(llm.model_path)

    steering = llm.steering
    saved = (steering.mask, steering.multiplier, None if steering.mask is not None or not steering.active else steering.entries())
    engine = None
    try:
        # before any prompt runs: set_mask checks that the mask belongs to this model (by its fingerprint,
        # which the steering computes once per model and caches)
        llm.set_mask(mask, values[0])
        engine = Engine(llm, chat_template=chat_template)
        rows, states = _run(engine, llm, mask, values, harmful_prompts, benign_prompts, items,
                            max_tokens, quality_tokens, capability_tokens, progress)
    finally:
        if engine is not None:
            engine.close()
        if own:
            llm.close()
        else:
            _restore(llm, *saved)

    settings = {
        "multipliers": values,
        "baseline_multiplier": BASELINE,
        "harmful_set": harmful_name, "benign_set": benign_name, "capability_set": capability_name,
        "limit": limit,
        "max_tokens": max_tokens, "quality_tokens": quality_tokens, "capability_tokens": capability_tokens,
        "chat_template": chat_template,
        "decoding": "greedy (argmax, no repetition penalty)",
        "n_ctx": engine.n_ctx, "n_threads": n_threads if own else None,
        "refusal_window_chars": WINDOW,
        "refusal_markers": {name: pattern for name, pattern in REFUSAL_MARKERS},
        "refusal_openers": list(REFUSAL_OPENERS),
        "refusal_opener_tokens": states["opener_tokens"],
        "degenerate_repeat_threshold": Q.DEGENERATE_REPEAT,
    }
    return EvalResult(model=str(model_path), mask=_mask_info(mask, mask_path), settings=settings, rows=rows,
                      seconds=time.perf_counter() - started)


@dataclass
class Reference:
    """The unsteered model's greedy benign reply: what the steered model is compared with."""

    tokens: list[int]
    logprobs: np.ndarray  # next-token log-probabilities after the prompt
    nll: float | None  # mean per-token NLL of `tokens` under the unsteered model


def measure_harmful(engine: Engine, prompt: str, ids: Sequence[int], openers, max_tokens: int) -> dict:
    """One harmful prompt under the current steering: opener probabilities, greedy reply, refusal markers."""
    p = engine.start(ids)
    p_first, p_seq = engine.opener_probs(p, openers)
    tokens = engine.greedy(p, max_tokens)
    text = engine.text(tokens)
    markers = refusal_markers(text)
    return {"prompt": prompt, "answer": text, "refused": bool(markers), "markers": markers,
            "opener_prob": p_first, "opener_seq_prob": p_seq, "n_tokens": len(tokens),
            "distinct4": Q.distinct_ngram_ratio(text)}


def measure_benign(engine: Engine, prompt: str, ids: Sequence[int], openers, quality_tokens: int,
                   reference: Reference | None) -> tuple[dict, Reference | None]:
    """One benign prompt under the current steering; without a reference this *is* the unsteered run and
    returns the reference it made."""
    p = engine.start(ids)
    p_first, p_seq = engine.opener_probs(p, openers)
    made = None
    tokens = engine.greedy(p, quality_tokens)
    if reference is None:
        made = reference = Reference(tokens, p.logprobs, engine.mean_nll(p, tokens))
        nll = reference.nll
    else:
        nll = engine.mean_nll(p, reference.tokens)
    text = engine.text(tokens)
    markers = refusal_markers(text)
    record = {
        "prompt": prompt, "answer": text, "refused": bool(markers), "markers": markers,
        "opener_prob": p_first, "opener_seq_prob": p_seq, "n_tokens": len(tokens),
        "distinct4": Q.distinct_ngram_ratio(text),
        "token_repeat": Q.token_repeat_fraction(tokens),
        "degenerate": Q.is_degenerate(text, tokens),
        "kl_first_token": Q.first_token_kl(reference.logprobs, p.logprobs),
        "nll_reference_answer": nll,
        "likelihood_quality": None if nll is None else Q.likelihood_quality(nll, reference.nll),
    }
    return record, made


def measure_capability(engine: Engine, item: CapabilityItem, ids: Sequence[int], capability_tokens: int) -> dict:
    p = engine.start(ids)
    tokens = engine.greedy(p, capability_tokens)
    text = engine.text(tokens)
    return {"question": item.question, "answers": list(item.answers), "kind": item.kind, "answer": text,
            "correct": item.matches(text)}


def _restore(llm, mask, multiplier, entries) -> None:
    if mask is not None:
        llm.set_mask(mask, multiplier)
    elif entries is not None:
        llm.steering.set_entries(*entries)
    else:
        llm.steering.clear()


def _run(engine: Engine, llm, mask, values, harmful, benign, items, max_tokens, quality_tokens,
         capability_tokens, progress):
    from tqdm.auto import tqdm

    steered = [m for m in values if m != BASELINE]
    states: list[float | None] = [None, *steered]  # None = mask cleared: the baseline
    base = MultiplierResult(BASELINE, baseline=True)
    by_state = {None: base, **{m: MultiplierResult(m, baseline=False) for m in steered}}
    rows = [by_state[None] if m == BASELINE else by_state[m] for m in values]
    if BASELINE not in values:
        rows.insert(0, base)

    openers = prefix_free([engine.tokenize_reply(o) for o in REFUSAL_OPENERS])
    encoded = {
        "harmful": [engine.encode(p) for p in harmful],
        "benign": [engine.encode(p) for p in benign],
        "capability": [engine.encode(it.question) for it in items],
    }
    budget = {"harmful": max_tokens, "benign": quality_tokens, "capability": capability_tokens}
    longest_opener = max((len(o) for o in openers), default=0)
    for what, lists in encoded.items():
        for i, ids in enumerate(lists):
            need = len(ids) + max(budget[what], longest_opener)
            if need > engine.n_ctx:
                raise EvalError(f"{what} prompt {i + 1} has {len(ids)} tokens; with {budget[what]} reply tokens it needs a "
                                f"context of {need}, more than n_ctx {engine.n_ctx}. Fix: raise --n-ctx or shorten the prompt.")

    def steer(state):
        if state is None:
            if llm.steering.mask is not None or llm.steering.active:
                llm.steering.clear()
        elif llm.steering.mask is mask:
            if llm.steering.multiplier != state:
                llm.multiplier = state
        else:
            llm.set_mask(mask, state)

    total = len(states) * (len(harmful) + len(benign) + len(items))
    bar = tqdm(total=total, desc="eval", unit="reply", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def timed(state, measure, *args):
        t0 = time.perf_counter()
        steer(state)
        out = measure(*args)
        by_state[state].seconds += time.perf_counter() - t0
        bar.update()
        return out

    try:
        bar.set_description("harmful")
        for prompt, ids in zip(harmful, encoded["harmful"]):
            for state in states:
                by_state[state].harmful.append(timed(state, measure_harmful, engine, prompt, ids, openers, max_tokens))
        bar.set_description("benign")
        for prompt, ids in zip(benign, encoded["benign"]):
            reference = None
            for state in states:  # the baseline first: it makes the reference
                record, made = timed(state, measure_benign, engine, prompt, ids, openers, quality_tokens, reference)
                reference = reference or made
                by_state[state].benign.append(record)
        bar.set_description("capability")
        for item, ids in zip(items, encoded["capability"]):
            for state in states:
                by_state[state].capability.append(timed(state, measure_capability, engine, item, ids, capability_tokens))
    finally:
        bar.close()

    for row in rows:
        row.summary = summarize(row, base)
    return rows, {"opener_tokens": openers}
