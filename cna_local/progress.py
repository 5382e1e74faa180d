"""Progress for steps that run silently for seconds to minutes (reading a GGUF's tokenizer, converting its
weights): one stderr line per step that counts the seconds while it runs and keeps the total when done."""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def step(what: str, enabled: bool = True) -> Iterator[None]:
    """`with step("reading the tokenizer"): ...` shows `reading the tokenizer: 00:07` live on stderr."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=f"      {what}", bar_format="{desc}: {elapsed}", file=sys.stderr, disable=False,
               leave=True, dynamic_ncols=True)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        bar.close()
