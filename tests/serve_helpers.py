"""A real server on loopback for the serve tests: uvicorn in a thread, and answers from a fresh process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

SETTINGS = dict(n_ctx=1024, n_batch=512, n_ubatch=16, n_threads=2)  # small micro-batches: prefixes get reused
SYSTEM = "You are a concise assistant. Answer in one sentence and never use lists. " * 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app):
    """Serve `app` with uvicorn on a free loopback port; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


FRESH = """
import json, sys
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from cna_local.runtime import SteeredLlama
from cna_local.serve.app import _EXCLUDE
model, masks, settings, jobs = json.loads(sys.stdin.read())
out = []
for multipliers, method, body in jobs:
    # the same arguments the server derives from the request body (its defaults included)
    request = (CreateChatCompletionRequest if method == "create_chat_completion" else CreateCompletionRequest)(**body)
    kwargs = request.model_dump(exclude=_EXCLUDE)
    kwargs.pop("stream", None)
    llm = SteeredLlama(model, **settings)  # a fresh context for every answer
    if masks:
        llm.set_masks(masks, multipliers)
    result = getattr(llm, method)(**kwargs)
    choice = result["choices"][0]
    out.append(choice["message"]["content"] if "message" in choice else choice["text"])
    llm.close()
print(json.dumps(out))
"""


def fresh_answers(model: Path, masks: list[Path], jobs: list[tuple[list[float], str, dict]]) -> list[str]:
    """Each job's answer from a new process and a new context: nothing cached from anything before."""
    payload = json.dumps([str(model), [str(m) for m in masks], SETTINGS, jobs])
    proc = subprocess.run([sys.executable, "-c", FRESH], input=payload, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def chat(user: str, max_tokens: int = 16) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            "max_tokens": max_tokens, "temperature": 0.0}
