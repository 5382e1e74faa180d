"""One model, one thread: every request runs on the same SteeredLlama, one at a time, in arrival order.

A request brings the multiplier of every mask. The worker sets them (composed into one neuron mask) before
it generates; when they equal what is set, nothing changes and the cached prompt prefix is reused, else the
cache is dropped (NeuronSteering), so a prefix computed at one strength never serves another.

Streams are produced on the worker thread and handed to the event loop chunk by chunk. A client that goes
away stops its generation at the next token, and the next request starts only after that: the model is
never used by two requests at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

import numpy as np

from ..runtime import SteeredLlama
from .masks import MaskRegistry, echo

_END = object()


def plain(obj):
    """JSON-ready: llama-cpp-python puts numpy floats in logprobs, which no JSON encoder takes."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


@dataclass
class Job:
    method: str  # "create_chat_completion" or "create_completion"
    kwargs: dict
    multipliers: list[float]
    gates: list[bool] = field(default_factory=list)  # per mask: its gate decides (a gate needs one mask)
    cancelled: threading.Event = field(default_factory=threading.Event)


class ModelWorker:
    def __init__(self, llm: SteeredLlama, registry: MaskRegistry):
        self.llm = llm
        self.registry = registry
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cna-serve-model")
        self.history: list[tuple[str, list[float]]] = []  # (method, multipliers) of every job, for tests and logs

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    # -- on the worker thread

    def _steer(self, job: Job) -> None:
        masks = self.registry.masks()
        if masks:  # a no-op when it is already what is set
            self.llm.steering.set_masks(masks, job.multipliers, gate=any(job.gates))
        self.llm.last_gate = None

    def _extras(self, job: Job, timings: dict) -> dict:
        # what the gate decided for this prompt (null where no gate was in use)
        decided = self.llm.last_gate.as_dict() if any(job.gates) and self.llm.last_gate is not None else None
        gated = {"gate": decided} if any(s.mask.gate is not None for s in self.registry.slots) else {}
        return {"neuron_masks": self._echo(job), **gated, "timings": timings}

    def _echo(self, job: Job) -> list[dict]:
        has = [s.mask.gate is not None for s in self.registry.slots]
        return echo(job.multipliers, [g if h else None for g, h in zip(job.gates, has)])

    def _timed(self, job: Job, call: Callable[[], Any]) -> tuple[Any, Callable[[], dict]]:
        started = time.perf_counter()

        def timings() -> dict:
            # measured by SteeredLlama itself: llama-cpp-python resets llama.cpp's counters every completion
            total = (time.perf_counter() - started) * 1000
            return {
                "cache_n": self.llm.last_reused,  # prompt tokens taken from the KV cache
                "prompt_n": self.llm.last_prompt_n,  # prompt tokens evaluated
                "prompt_ms": round(self.llm.last_prompt_ms, 3),
                "predicted_ms": round(total - self.llm.last_prompt_ms, 3),  # everything after the prompt
                "total_ms": round(total, 3),
            }

        self.history.append((job.method, list(job.multipliers)))
        self._steer(job)
        return call(), timings

    def _run(self, job: Job) -> dict:
        result, timings = self._timed(job, lambda: getattr(self.llm, job.method)(**job.kwargs))
        return plain({**result, **self._extras(job, timings())})

    def _stream(self, job: Job, push: Callable[[Any], None]) -> None:
        try:
            chunks, timings = self._timed(job, lambda: getattr(self.llm, job.method)(stream=True, **job.kwargs))
            chunks: Iterator[dict]
            previous = None
            for chunk in chunks:
                if job.cancelled.is_set():
                    break
                if previous is not None:
                    push(plain({**previous, "neuron_masks": self._echo(job)}))
                previous = chunk
            if previous is not None and not job.cancelled.is_set():
                push(plain({**previous, **self._extras(job, timings())}))  # the last chunk carries the timings
            chunks.close()
        except BaseException as exc:  # handed to the event loop, raised there
            push(exc)
        finally:
            push(_END)

    # -- on the event loop

    async def run(self, job: Job) -> dict:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, job)

    async def stream(self, job: Job) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = loop.run_in_executor(self._executor, self._stream, job,
                                    lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()  # a client that left: stop at the next token
            await asyncio.shield(done)
