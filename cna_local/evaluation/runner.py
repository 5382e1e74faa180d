"""evaluate(): one SteeredLlama, every prompt at every multiplier, greedy decoding.

Protocol (the numbers in `EvalResult` mean exactly this):

* **Prompts** go through the GGUF's own chat template (`tokenizer.chat_template`, rendered as
  llama-cpp-python's `Jinja2ChatFormatter` renders it for `create_chat_completion`) as one user message
  with the generation prompt; with `chat_template=False` the raw text with the model's BOS.
* **Decoding** is greedy: the argmax of the logits at every step (temperature 0, no repetition penalty),
  until an end-of-generation token or the token limit: `max_tokens` (64) for harmful prompts, whose
  refusals show early; `quality_tokens` (150) for the benign answers that quality is measured on;
  `capability_tokens` (24) for the capability questions.
* **The schedule** says which positions are steered: `all` (every position, the default), `prompt` (the
  prompt's; the reply's tokens run unsteered on the steered KV cache) or `generation` (the prompt's last
  token and the reply's; the prompt's context unsteered).
* **Multiplier 1 is the baseline**, run with the mask cleared (the unpatched computation). It is always
  evaluated, and reported as the row of multiplier 1 (added first when `multipliers` lacks 1). Every other
  multiplier scales the mask's neurons by that factor, changed live on the same model (no reload).
* **Per prompt** (prompt groups outer, multipliers inner, so only one group's unsteered references are
  held; a group is `batch_size` prompts decoded together, one KV sequence each, see engine.py):
  harmful: refusal-opener probabilities, greedy reply, refusal markers (refusal.py), and the distinct word
  4-grams of the reply (the reference implementation's quality, which it measures on these replies);
  benign: the same, plus quality (quality.py): distinct word 4-grams and token repetition of the reply,
  first-token KL(unsteered || steered), and the steered model's per-token NLL of the *unsteered* greedy
  reply, teacher-forced (batched) under each multiplier including the baseline;
  capability: greedy reply, answer matched as a whole word (capability.py).

Where the parts live: results.py (what is returned), engine.py (decoding over llama.cpp), measures.py
(what one prompt gives), schedule.py (which steering runs when), this file (the entry point and its checks).

Memory: the model, its KV cache (n_ctx) and a few full-vocabulary logit vectors; nothing grows with the
number of prompts except the per-prompt records.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

from ..multipliers import check_multipliers
from . import quality as Q
from .capability import CapabilityItem, load_capability
from ..schedules import SCHEDULES
from .engine import Engine
from .errors import EvalError
from .refusal import REFUSAL_MARKERS, REFUSAL_OPENERS, WINDOW
from .results import BASELINE, EvalResult
from .schedule import run_schedule

if TYPE_CHECKING:
    from ..maskfile import NeuronMask
    from ..prompts import PromptSet
    from ..runtime import SteeredLlama

DEFAULT_HARMFUL = "harmful_heldout"
DEFAULT_BENIGN = "benign_heldout"

PromptsLike = Union["PromptSet", Sequence[str], None]

__all__ = ["EvalError", "default_multipliers", "evaluate", "evaluate_masks"]


def default_multipliers(mask: "NeuronMask", gated: bool | None = None) -> list[float]:
    """What to evaluate when nothing is asked: unsteered, ablated, and the mask's own strength (through its
    gate, or on every prompt; gated=None: through the gate when it has one)."""
    return check_multipliers([BASELINE, 0.0, mask.default_multiplier(mask.gate is not None if gated is None else gated)])


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
            "fingerprint": mask.fingerprint, "default_multiplier": mask.multiplier,
            "has_gate": mask.gate is not None}


def evaluate(
    llm_or_path: Union["SteeredLlama", str, Path],
    mask: Union["NeuronMask", str, Path],
    multipliers: Sequence[float] | None = None,
    harmful: PromptsLike = None,
    benign: PromptsLike = None,
    capability: Sequence[CapabilityItem] | str | Path | None = None,
    **options,
) -> EvalResult:
    """Evaluate `mask` at each multiplier against the unsteered model (see the module docstring).

    llm_or_path: a SteeredLlama (its steering is restored afterwards; n_ctx/n_threads are then its own) or
      the path of a GGUF model, opened with `n_ctx` and `n_threads` (and closed afterwards).
    mask: a NeuronMask or a mask file path; it must belong to the model.
    multipliers: the strengths to evaluate; None = 1, 0 and the mask's own (`default_multipliers`).
    harmful, benign: PromptSets or lists of strings; None = the bundled held-out sets.
    capability: CapabilityItems or a .jsonl path; None = the bundled questions; [] = skip.
    options: those of `evaluate_masks`.
    """
    return evaluate_masks(llm_or_path, [mask], None if multipliers is None else [multipliers], harmful, benign,
                          capability, **options)[0]


def evaluate_masks(
    llm_or_path: Union["SteeredLlama", str, Path],
    masks: Sequence[Union["NeuronMask", str, Path]],
    multipliers: Sequence[Sequence[float] | None] | None = None,
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
    n_threads: int | None = None,
    batch_size: int = 1,
    schedule: str | None = None,
    gates: Sequence[bool | None] | None = None,
    progress: bool = True,
) -> list[EvalResult]:
    """Evaluate several masks side by side: one EvalResult per mask, all sharing one baseline run.

    multipliers: per mask, its strengths (None = `default_multipliers(mask)`); None = the defaults for all.
    limit: use only the first `limit` items of each set.
    n_ctx: the context each prompt (with its reply) must fit in.
    batch_size: prompts decoded together (several sequences per llama_decode); 1 = one at a time.
    schedule: which positions are steered (`cna_local.schedules`): all, prompt or generation; None = the
      masks' own (which must then agree).
    gates: per mask, whether its gate decides which prompts are steered (None: when the mask has one; True
      needs one). The same mask twice with gates [True, False] compares gated with static steering.
    """
    from ..maskfile import NeuronMask

    started = time.perf_counter()
    masks = list(masks)
    if not masks:
        raise EvalError("no mask to evaluate. Fix: give at least one mask.")
    asked = [None] * len(masks) if multipliers is None else list(multipliers)
    if len(asked) != len(masks):
        raise EvalError(f"{len(masks)} masks but {len(asked)} multiplier lists: give one per mask (or none).")
    asked = [None if m is None else check_multipliers(m) for m in asked]  # bad values fail before the masks load
    for name, value in (("max_tokens", max_tokens), ("quality_tokens", quality_tokens), ("capability_tokens", capability_tokens),
                        ("batch_size", batch_size)):
        if int(value) < 1:
            raise EvalError(f"{name} must be at least 1, got {value}.")
    if schedule is not None and schedule not in SCHEDULES:
        raise EvalError(f"unknown schedule {schedule!r}. Fix: use one of {', '.join(SCHEDULES)}.")
    if limit is not None and int(limit) < 1:
        raise EvalError(f"limit must be at least 1, got {limit}.")
    paths = [None if isinstance(m, NeuronMask) else str(m) for m in masks]
    masks = [m if isinstance(m, NeuronMask) else NeuronMask.load(m) for m in masks]
    asked_gates = [None] * len(masks) if gates is None else list(gates)
    if len(asked_gates) != len(masks):
        raise EvalError(f"{len(masks)} masks but {len(asked_gates)} gate settings: give one per mask (or none).")
    used_gates = []
    for i, (m, g) in enumerate(zip(masks, asked_gates)):
        if g and m.gate is None:
            raise EvalError(f"mask {paths[i] or i + 1} has no gate. Fix: make it with `cna-local attribute` (which fits "
                            "one by default), or evaluate it with --no-gate.")
        used_gates.append(m.gate if g or (g is None) else None)
    values = [default_multipliers(m, g is not None) if v is None else v for m, v, g in zip(masks, asked, used_gates)]
    if schedule is None:
        own = sorted({m.schedule for m in masks})
        if len(own) > 1:
            raise EvalError(f"the masks have different default schedules ({', '.join(own)}). Fix: pass --schedule.")
        schedule = own[0]
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
        from ..cpu_threads import default_threads
        from ..runtime import SteeredLlama

        model_path = Path(llm_or_path)
        _check_gguf(model_path)
        n_threads = n_threads or default_threads()  # every physical core: the evaluation is the machine's work
        # one KV cache for the group: each prompt's n_ctx, batch_size times
        llm = SteeredLlama(str(model_path), n_ctx=n_ctx * batch_size, n_threads=n_threads, n_threads_batch=n_threads,
                           n_seq_max=batch_size, verbose=False)
    else:
        llm = llm_or_path
        if not hasattr(llm, "steering"):
            raise EvalError("evaluate() needs a cna_local.runtime.SteeredLlama (or a model path), not a plain Llama.")
        model_path = Path(llm.model_path)

    saved = llm.steering.state
    engine = None
    steerings = [(j, m) for j, vs in enumerate(values) for m in vs if m != BASELINE]
    try:
        # before any prompt runs: set_mask checks that each mask belongs to this model (by its fingerprint,
        # which the steering computes once per model and caches)
        for mask, vs in zip(masks, values):
            llm.set_mask(mask, vs[0])
        engine = Engine(llm, chat_template=chat_template, batch_size=batch_size, schedule=schedule)
        by_state, states = run_schedule(engine, llm, masks, steerings, harmful_prompts, benign_prompts, items,
                                        max_tokens, quality_tokens, capability_tokens, progress,
                                        per_prompt_ctx=n_ctx if own else None, gates=used_gates)
    finally:
        if engine is not None:
            engine.close()
        if own:
            llm.close()
        else:
            llm.steering.restore(saved)

    seconds = time.perf_counter() - started
    out = []
    for j, (mask, vs) in enumerate(zip(masks, values)):
        rows = [by_state[None] if m == BASELINE else by_state[(j, m)] for m in vs]
        if BASELINE not in vs:
            rows.insert(0, by_state[None])
        settings = {
            "multipliers": vs,
            "baseline_multiplier": BASELINE,
            "harmful_set": harmful_name, "benign_set": benign_name, "capability_set": capability_name,
            "limit": limit,
            "max_tokens": max_tokens, "quality_tokens": quality_tokens, "capability_tokens": capability_tokens,
            "chat_template": chat_template,
            "decoding": "greedy (argmax, no repetition penalty)",
            "schedule": schedule,
            "gate": None if used_gates[j] is None else used_gates[j].record(),
            "batch_size": batch_size,
            "n_ctx": n_ctx if own else engine.n_ctx, "n_threads": n_threads if own else None,
            "masks_compared": len(masks),
            "refusal_window_chars": WINDOW,
            "refusal_markers": {name: pattern for name, pattern in REFUSAL_MARKERS},
            "refusal_openers": list(REFUSAL_OPENERS),
            "refusal_opener_tokens": states["opener_tokens"],
            "degenerate_repeat_threshold": Q.DEGENERATE_REPEAT,
        }
        out.append(EvalResult(model=str(model_path), mask=_mask_info(mask, paths[j]), settings=settings, rows=rows,
                              seconds=seconds))
    return out
