"""How many CPU threads llama.cpp gets, and whether the cores they would spin on are free.

llama.cpp's worker threads spin-wait on each other at every op: with more threads than idle cores, decoding
gets 10-100x slower (measured: 1.4 instead of 23 tokens/s with 2 threads on 2 cores, one of them busy).
"""

from __future__ import annotations

import os

import click


def default_threads() -> int:
    """One thread per physical core this process may run on, as llama.cpp's own tools count them (hyperthread
    siblings share one core's arithmetic, and spinning threads on them slow each other down). Attribution, its
    calibrations and an evaluation are the machine's only work while they run, and their time is prompt
    processing and decoding, both of which scale with cores."""
    try:
        allowed = len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        allowed = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except Exception:
        physical = None
    return max(1, min(allowed, physical or allowed))


def busy_cores(sample_s: float = 0.3) -> float | None:
    """How many cores other processes keep busy now: the system's CPU use over a short sample. Not the load
    average, which trails by a minute (right after an `attribute` run it still reads ~1.5 on idle cores)."""
    try:
        import psutil

        return psutil.cpu_percent(interval=sample_s) / 100.0 * (psutil.cpu_count() or 1)
    except Exception:  # no /proc, a sandbox: say nothing rather than guess
        return None


def warn_if_busy(threads: int, quiet: bool = False, busy: float | None = None) -> None:
    """Warn (on stderr) when `threads` llama.cpp threads would not each find an idle core."""
    if quiet or threads <= 1:
        return
    busy = busy_cores() if busy is None else busy
    cores = os.cpu_count() or 1
    if busy is not None and threads > cores - busy + 0.5:
        click.echo(f"warning: {busy:.1f} of {cores} cores are busy: with --threads {threads} llama.cpp may run "
                   f"many times slower; consider --threads {max(1, int(cores - busy + 0.5))}.", err=True)
