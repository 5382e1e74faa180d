"""The one check of a mask strength (multiplier), used by the mask file, the runtime, the CLI and the server.

A multiplier is a finite number: 0 ablates the mask's neurons, 1 leaves them as they are (the unsteered
model), -1 inverts them, 2 doubles them.
"""

from __future__ import annotations

import math
from typing import Iterable

from .errors import CnaLocalError

HINT = "Multipliers are numbers such as -1.5, 0 or 1 (0 ablates the neurons, 1 leaves them, -1 inverts them)."


class MultiplierError(CnaLocalError):
    """A multiplier that is not a finite number."""


def check_multiplier(value, what: str = "the multiplier") -> float:
    """`value` as a float; raises MultiplierError for anything but a finite number (or its text)."""
    if isinstance(value, bool):  # float(True) is 1.0: never what was meant
        raise MultiplierError(f"{what} must be a number, got {value!r}. {HINT}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MultiplierError(f"{what} must be a number, got {value!r}. {HINT}") from None
    if not math.isfinite(number):
        raise MultiplierError(f"{what} must be a finite number, got {value!r}. {HINT}")
    return number + 0.0  # -0.0 -> 0.0


def check_multipliers(values: Iterable) -> list[float]:
    """Each value checked, duplicates dropped (first order kept); at least one."""
    out: list[float] = []
    for value in values:
        number = check_multiplier(value, what="each multiplier")
        if number not in out:
            out.append(number)
    if not out:
        raise MultiplierError(f"no multiplier given. {HINT}")
    return out


def parse_multipliers(text: str) -> list[float]:
    """'1,0,-1.5' -> [1.0, 0.0, -1.5]; an empty item or a non-number raises MultiplierError."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise MultiplierError(f"no multiplier given. Give comma-separated numbers, e.g. 1,0,-1.5. {HINT}")
    for part in parts:
        if not part:
            raise MultiplierError(f"{text!r} has an empty item. Give comma-separated numbers, e.g. 1,0,-1.5.")
    return check_multipliers(parts)
