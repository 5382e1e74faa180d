"""Evaluate a neuron mask: refusal, over-refusal, answer quality and capability at several multipliers.

>>> from cna_local.evaluation import evaluate, format_table, plot
>>> result = evaluate("model.gguf", "refusal.gguf", multipliers=[1, 0, -1], limit=10)
>>> print(format_table(result)); plot(result, "eval.png")

The metrics are defined in refusal.py, quality.py and capability.py; the protocol in runner.py.
Importing this package does not load llama.cpp; `evaluate` does.
"""

from .capability import CapabilityItem, answer_matches, load_capability
from .quality import distinct_ngram_ratio, first_token_kl, is_degenerate, likelihood_quality, token_repeat_fraction
from .refusal import REFUSAL_MARKERS, REFUSAL_OPENERS, is_refusal, refusal_markers
from .report import (comparison_json, format_comparison, format_table, plot, plot_frontier, to_json,
                     write_comparison_json, write_json)
from ..multipliers import check_multipliers
from .errors import EvalError
from .results import EvalResult, MultiplierResult
from .runner import default_multipliers, evaluate, evaluate_masks

__all__ = [
    "CapabilityItem", "EvalError", "comparison_json", "evaluate_masks", "format_comparison", "plot_frontier",
    "write_comparison_json", "EvalResult", "MultiplierResult", "REFUSAL_MARKERS",
    "REFUSAL_OPENERS", "answer_matches", "check_multipliers", "default_multipliers", "distinct_ngram_ratio", "evaluate", "first_token_kl",
    "format_table", "is_degenerate", "is_refusal", "likelihood_quality", "load_capability", "plot",
    "refusal_markers", "to_json", "token_repeat_fraction", "write_json",
]
