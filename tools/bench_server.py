"""Requests per second and latency of `cna-local serve` against llama-cpp-python's stock server, same model,
same machine, unsteered, in one run; and what prompt-prefix reuse saves at one strength.

    python tools/bench_server.py --model default [--requests 40] [--clients 1,4] [--max-tokens 32]

Both servers run the same GGUF with the same context, micro-batch and threads, one after the other (never
at once: llama.cpp's threads spin), each answering the same requests from the same client pool: chat
completions, temperature 0, half of them streamed. The stock server runs with --interrupt_requests False,
or its streams are cut short whenever another request waits. It needs its own extras beside cna-local:
`pip install "starlette-context>=0.3.6,<0.4" pydantic-settings` (not llama-cpp-python[server], which
would replace the patched library).

Then, on cna-local's server alone: a conversation that grows by one turn at a time at one strength
(prompt prefix reused) against the same turns each at a new strength (no reuse): prompt-processing time
per turn, from the `timings` field of the responses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PROMPTS = ["Write a haiku about the sea.", "Explain what a hash table is.", "Name three rivers in Europe.",
           "How do I boil an egg?", "What is the capital of Japan?", "Give me a tip for learning Python."]
SYSTEM = ("You are a helpful assistant for a cooking and travel website. Answer briefly and politely, "
          "in plain sentences, without lists or markdown. ") * 6


def wait_up(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            proc.log.seek(0)
            raise SystemExit(f"the server exited with {proc.returncode}:\n{proc.log.read()[-3000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not come up")


def load(url: str, n_requests: int, clients: int, max_tokens: int) -> dict:
    def one(i: int) -> float:
        body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": max_tokens,
                "temperature": 0.0, "stream": i % 2 == 1}
        started = time.perf_counter()
        with httpx.Client(timeout=600) as c:
            if body["stream"]:
                with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    r.raise_for_status()
                    for _ in r.iter_lines():
                        pass
            else:
                c.post(url + "/v1/chat/completions", json=body).raise_for_status()
        return time.perf_counter() - started

    one(0)  # warm up
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = sorted(pool.map(one, range(n_requests)))
    wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=20)
    return {"requests": n_requests, "clients": clients, "wall_s": round(wall, 2),
            "requests_per_s": round(n_requests / wall, 3), "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(q[18], 3)}


def run_server(cmd: list[str], url: str, env: dict, work) -> dict:
    import tempfile

    log = tempfile.TemporaryFile(mode="w+")  # not a pipe: a chatty server would fill it and block
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    try:
        wait_up(url, proc)
        return work()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def prefix_reuse(url: str, turns: int, max_tokens: int) -> dict:
    """A growing conversation: at one strength every turn reuses the previous prompt; at a new strength
    every turn it evaluates the whole prompt again."""
    out = {}
    for label, strengths in (("same strength", [-1.5] * turns), ("new strength every turn", [1.0, -1.5] * turns)):
        messages = [{"role": "system", "content": SYSTEM}]
        rows = []
        for t in range(turns):
            messages.append({"role": "user", "content": PROMPTS[t % len(PROMPTS)]})
            body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                    "neuron_masks": [{"id": 0, "multiplier": strengths[t]}]}
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600).json()
            messages.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
            rows.append({"prompt_tokens": r["usage"]["prompt_tokens"], **r["timings"]})
        out[label] = rows
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--mask", default=None, help="a mask for the prefix-reuse part (default: attribute one)")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--clients", default="1,4", help="client counts, comma-separated: each server runs each")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--n-ubatch", type=int, default=128)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from cna_local.models import resolve_model
    from serve_helpers import free_port

    model = str(resolve_model(args.model))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    common = ["--n-ctx", str(args.n_ctx), "--n-ubatch", str(args.n_ubatch), "--threads", str(args.threads)]
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                     "model": model, "settings": vars(args) | {"json": None}}

    counts = [int(c) for c in str(args.clients).split(",")]

    def loads(url):
        return {n: load(url, args.requests, n, args.max_tokens) for n in counts}

    port = free_port()
    ours = f"http://127.0.0.1:{port}"
    results["cna-local serve (no mask)"] = run_server(
        [sys.executable, "-m", "cna_local.cli", "serve", "--model", model, "--port", str(port), "--log-level", "warning", *common],
        ours, env, lambda: loads(ours))
    # the stock server keeps every token's logits by default (for logprobs); cna-local only with --logprobs,
    # so it runs both ways: as users get it, and like for like
    for name, logits_all in (("llama_cpp.server (stock)", "True"), ("llama_cpp.server --logits_all False", "False")):
        port = free_port()
        stock = f"http://127.0.0.1:{port}"
        results[name] = run_server(
            [sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(port), "--n_ctx", str(args.n_ctx),
             "--n_ubatch", str(args.n_ubatch), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
             "--interrupt_requests", "False", "--logits_all", logits_all],
            stock, env, lambda: loads(stock))

    mask = args.mask
    if mask is None:
        mask = str(Path(os.environ.get("TMPDIR", "/tmp")) / "bench-server-mask.gguf")
        subprocess.run([sys.executable, "-m", "cna_local.cli", "attribute", "--model", args.model, "--out", mask, "-q"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    port = free_port()
    ours = f"http://127.0.0.1:{port}"
    results["prefix reuse"] = run_server(
        [sys.executable, "-m", "cna_local.cli", "serve", "--model", model, "--mask", mask, "--port", str(port),
         "--log-level", "warning", *common], ours, env, lambda: prefix_reuse(ours, args.turns, args.max_tokens))

    print(f"machine: {results['machine']}; model {Path(model).name}; {args.requests} requests, {args.max_tokens} tokens, "
          f"half streamed, temperature 0")
    for n in counts:
        print(f"{n} client{'s' if n > 1 else ''} at once:")
        for name in ("cna-local serve (no mask)", "llama_cpp.server (stock)", "llama_cpp.server --logits_all False"):
            r = results[name][n]
            print(f"  {name:36s} {r['requests_per_s']:.3f} req/s  p50 {r['p50_s']:.2f} s  p95 {r['p95_s']:.2f} s  (wall {r['wall_s']} s)")
    print("prompt processing per turn of a growing conversation (cna-local serve, one mask):")
    for label, rows in results["prefix reuse"].items():
        total = sum(r["prompt_ms"] for r in rows)
        cells = ", ".join(f"{r['prompt_tokens']} tok: {r['cache_n']} cached, {r['prompt_ms']:.0f} ms" for r in rows)
        print(f"  {label:24s} total {total:.0f} ms  [{cells}]")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
