"""Steering schedules: which positions of a conversation the mask is applied at.

The runtime (SteeredLlama), the evaluation and the mask file's default all use these names.
"""

from __future__ import annotations

from .errors import CnaLocalError

SCHEDULES = ("all", "prompt", "generation")
"""all: every position (the reference's way); prompt: the prompt's positions only, the reply's tokens
unsteered (the KV cache keeps the steered prompt); generation: the positions that predict a reply token
(the prompt's last token and every reply token), the rest of the prompt unsteered."""

CONTEXT, LAST, REPLY = "context", "last", "reply"
"""Kinds of positions: the prompt before its last token, the prompt's last token, the reply's tokens."""


class ScheduleError(CnaLocalError):
    """An unknown steering schedule."""


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {schedule!r}. Fix: use one of {', '.join(SCHEDULES)}.")
    return schedule


def steered_in(schedule: str, phase: str) -> bool:
    """Whether a schedule steers the positions of a phase."""
    check_schedule(schedule)
    if schedule == "all":
        return True
    if schedule == "prompt":
        return phase in (CONTEXT, LAST)
    return phase in (LAST, REPLY)
