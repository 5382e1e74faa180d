"""Reading a gate's neurons (the mask's, or its own) at a prompt's last token inside llama.cpp (cna_local.gate).

The prompt is decoded unsteered while the FFN capture (patches/0005) keeps, for the last token of each
micro-batch, every layer's down-projection input; the gate reads its neurons out of the last such row,
the prompt's last token (the token whose logits the reply starts from, so it always has an output). The
capture hooks the scheduler's eval callback and leaves the graph as it is: the logits of the prompt are
bit for bit those of an unsteered decode without it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from . import binding
from .steering import SteeringError


@dataclass(frozen=True)
class GateDecision:
    """What the gate said about the last prompt: its score, the threshold, and whether it fired."""

    fired: bool
    score: float
    threshold: float

    def as_dict(self) -> dict:
        return {"fired": self.fired, "score": round(self.score, 4), "threshold": round(self.threshold, 4)}


class LastTokenReader:
    """Captures the down-projection input at the last token of each decode of one context."""

    def __init__(self, ctx, n_layer: int, n_ff: int | None):
        self._lib = binding.lib()
        self._ctx = ctx
        self.n_layer, self.n_ff = n_layer, n_ff

    def start(self) -> None:
        rc = self._lib.llama_ffn_capture_start(self._ctx, binding.CAPTURE_ROWS)
        if rc != 0:
            raise SteeringError(f"the gate cannot read its neurons: {binding.CAPTURE_MESSAGES.get(rc, rc)}.")

    def stop(self) -> None:
        self._lib.llama_ffn_capture_stop(self._ctx)

    def rows_by_sequence(self) -> dict[int, np.ndarray]:
        """Per sequence, every layer's down-projection input at its last token decoded since start()."""
        seqs, rows = self._take()
        return {int(q): rows[i] for i, q in enumerate(seqs)}  # later rows replace earlier ones

    def last_row(self) -> np.ndarray:
        """Every layer's down-projection input at the last token decoded since start(), [n_layer * n_ff]."""
        return self._take()[1][-1]

    def _take(self) -> tuple[np.ndarray, np.ndarray]:
        """(sequence ids [n], rows [n, n_layer * n_ff]) captured since start(), oldest first."""
        lib = self._lib
        n_rows, ffn_w = ctypes.c_int64(), ctypes.c_int64()
        lib.llama_ffn_capture_sizes(self._ctx, ctypes.byref(n_rows), ctypes.byref(ffn_w), None)
        status = lib.llama_ffn_capture_status(self._ctx)
        # -3: a micro-batch before the last ended on a token without logits (n_ubatch < n_batch); its row
        # misses the last layer, and only the last row, the prompt's last token, is read
        if status not in (0, -3) or n_rows.value == 0:
            why = binding.CAPTURE_MESSAGES.get(status, status) if status else "no token was decoded"
            raise SteeringError(f"the gate could not read its neurons: {why}.")
        if self.n_ff is not None and ffn_w.value != self.n_layer * self.n_ff:
            raise SteeringError(f"llama.cpp captures {ffn_w.value} neuron values per token; the gate needs "
                                f"{self.n_layer} layers of {self.n_ff}. Models whose FFN width varies by layer cannot be gated.")
        rows = np.empty((n_rows.value, ffn_w.value), np.float32)
        seqs = np.empty(n_rows.value, np.int32)
        got = lib.llama_ffn_capture_take_rows(self._ctx, seqs.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                                              rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), None, n_rows.value)
        if got != n_rows.value:
            raise SteeringError(f"llama.cpp returned {got} of {n_rows.value} captured rows.")
        return seqs, rows
