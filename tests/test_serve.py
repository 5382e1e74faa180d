"""`cna-local serve`: an OpenAI-compatible server where each request sets its own mask strengths.

Every answer is compared with the library's answer at that strength, computed in a fresh process with a
fresh context (serve_helpers.fresh_answers), so a cached prompt prefix or another client's request can
never have leaked into it. Runs a real uvicorn server on loopback, with a tiny random model and two masks.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from cna_local.cli import cli
from cna_local.fingerprint import fingerprint_from_gguf
from cna_local.maskfile import NeuronMask

from serve_helpers import SETTINGS, chat, fresh_answers, live_server

A_DEFAULT, B_DEFAULT = -1.5, 0.5


def make_mask(model, path, seed: int, multiplier: float, digest: str | None = None, name: str = "",
              per_layer: int = 96) -> NeuronMask:
    # most of the tiny model's 128 neurons per layer: strong enough that strengths change greedy answers
    fp = fingerprint_from_gguf(model)
    rng = np.random.default_rng(seed)
    layers = np.repeat(np.arange(fp.n_layer), per_layer)
    neurons = np.concatenate([np.sort(rng.choice(fp.n_ff, per_layer, replace=False)) for _ in range(fp.n_layer)])
    mask = NeuronMask(arch=fp.arch, n_layer=fp.n_layer, n_ff=fp.n_ff, n_embd=fp.n_embd, fingerprint=digest or fp.digest,
                      model_name="tiny", layers=layers, neurons=neurons, scores=np.ones(len(layers)),
                      multiplier=multiplier, meta={"name": name})
    mask.save(path)
    return mask


@pytest.fixture(scope="module")
def files(tiny_gguf, tmp_path_factory):
    model = tiny_gguf("llama", "f32")
    d = tmp_path_factory.mktemp("serve")
    make_mask(model, d / "a.gguf", seed=1, multiplier=A_DEFAULT, name="refusal")
    make_mask(model, d / "b.gguf", seed=2, multiplier=B_DEFAULT, name="style")
    make_mask(model, d / "other.gguf", seed=1, multiplier=0.0, digest="0" * 64)
    return {"model": model, "a": d / "a.gguf", "b": d / "b.gguf", "other": d / "other.gguf"}


def build_app(files, api_key=None, logprobs=False):
    from cna_local.commands.serve import _build

    return _build(str(files["model"]), [files["a"], files["b"]], api_key, "tiny", SETTINGS["n_ctx"],
                  SETTINGS["n_ubatch"], SETTINGS["n_threads"], -1, None, logprobs)


@pytest.fixture(scope="module")
def server(files):
    app = build_app(files)
    with live_server(app) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client, app


def content(response: dict) -> str:
    choice = response["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def streamed(client, path: str, body: dict) -> tuple[str, list[dict]]:
    text, chunks = "", []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                return text, chunks
            chunk = json.loads(data)
            chunks.append(chunk)
            choice = chunk["choices"][0]
            text += (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    raise AssertionError("the stream ended without [DONE]")


def fresh(files, *jobs):
    return fresh_answers(files["model"], [files["a"], files["b"]], list(jobs))


# ----------------------------------------------------------------------------------------------- 1

def test_models_and_masks_are_listed(server, files):
    client, _ = server
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    masks = client.get("/neuron-masks").json()
    assert [(m["id"], m["name"], m["neurons"], m["multiplier"]) for m in masks] == [
        (0, "refusal", 288, A_DEFAULT), (1, "style", 288, B_DEFAULT)]
    assert masks[0]["path"] == str(files["a"]) and masks[0]["schedule"] == "all"


@pytest.mark.parametrize("path, body, method", [
    ("/v1/chat/completions", chat("Name a fruit."), "create_chat_completion"),
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0.0}, "create_completion"),
])
def test_answers_streamed_or_not_equal_the_librarys_at_that_strength(server, files, path, body, method):
    client, _ = server
    body = {**body, "neuron_masks": [{"id": 0, "multiplier": -1.0}]}
    plain = client.post(path, json=body).json()
    text, chunks = streamed(client, path, body)
    want = fresh(files, ([-1.0, B_DEFAULT], method, {k: v for k, v in body.items() if k != "neuron_masks"}))[0]
    assert content(plain) == text == want
    # the response says what it ran with, beside usage; every chunk of a stream too
    assert plain["neuron_masks"] == [{"id": 0, "multiplier": -1.0}, {"id": 1, "multiplier": B_DEFAULT}]
    assert "usage" in plain and plain["timings"]["prompt_n"] >= 1 and plain["timings"]["total_ms"] > 0
    assert all(c["neuron_masks"] == plain["neuron_masks"] for c in chunks)


# ----------------------------------------------------------------------------------------------- 2

def test_server_wide_multipliers_are_set_by_post_and_used_by_requests_that_do_not_list_a_mask(server, files):
    client, _ = server
    try:
        got = client.post("/neuron-masks", json=[{"id": 1, "multiplier": 2.0}]).json()
        assert [m["multiplier"] for m in got] == [A_DEFAULT, 2.0]
        r = client.post("/v1/chat/completions", json={**chat("Say hello."), "neuron_masks": [{"id": 0, "multiplier": 0.0}]}).json()
        assert r["neuron_masks"] == [{"id": 0, "multiplier": 0.0}, {"id": 1, "multiplier": 2.0}]
        # several masks compose: the library's set_masks at the same multipliers gives the same answer
        assert content(r) == fresh(files, ([0.0, 2.0], "create_chat_completion", chat("Say hello.")))[0]
    finally:
        client.post("/neuron-masks", json=[{"id": 0, "multiplier": A_DEFAULT}, {"id": 1, "multiplier": B_DEFAULT}])
    assert [m["multiplier"] for m in client.get("/neuron-masks").json()] == [A_DEFAULT, B_DEFAULT]


# ----------------------------------------------------------------------------------------------- 3

@pytest.mark.parametrize("path, body, method", [
    ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0.0}, "create_completion"),
    ("/v1/chat/completions", chat("What is the tallest mountain?"), "create_chat_completion"),
], ids=["completion", "chat"])
def test_a_prefix_cached_at_one_strength_never_serves_another(server, files, path, body, method):
    """A, then B, then A again (temperature 0): each answer is a fresh process's at that strength."""
    client, app = server
    a = [-1.5, B_DEFAULT] if method == "create_completion" else [3.0, -2.0]  # strengths this random model shows
    sequence = [a, [1.0, 1.0], a]
    got = []
    for multipliers in sequence:
        r = client.post(path, json={**body, "neuron_masks": [
            {"id": i, "multiplier": m} for i, m in enumerate(multipliers)]}).json()
        got.append((content(r), r["timings"]["cache_n"]))
    want = fresh(files, *[(m, method, body) for m in sequence])
    assert want[0] != want[1]  # the strengths really differ in this model, so a leak would show
    assert [g for g, _ in got] == want
    assert all(cache_n == 0 for _, cache_n in got)  # every request changed the strength: nothing was reused


def test_requests_at_the_same_strength_reuse_the_prefix_and_answer_the_same(server, files):
    client, _ = server
    first = client.post("/v1/chat/completions", json=chat("Name a river.")).json()
    second = client.post("/v1/chat/completions", json=chat("Name a lake.")).json()  # the same system prompt
    assert first["timings"]["cache_n"] == 0 or first["timings"]["cache_n"] % SETTINGS["n_ubatch"] == 0
    assert second["timings"]["cache_n"] >= SETTINGS["n_ubatch"]  # the shared system prompt came from the cache
    assert second["timings"]["prompt_n"] + second["timings"]["cache_n"] == second["usage"]["prompt_tokens"]
    assert content(second) == fresh(files, ([A_DEFAULT, B_DEFAULT], "create_chat_completion", chat("Name a lake.")))[0]


# ----------------------------------------------------------------------------------------------- 4

def test_concurrent_clients_each_get_their_strengths_answer(server, files):
    """100 requests from 8 clients at once, mixed strengths, streamed or not: 0 errors, and every answer
    equals the answer its (prompt, strength) gets when asked alone."""
    client, _ = server
    prompts = ["The capital of France is", "Once upon a time", "The best way to learn is"]
    strengths = [[-1.5, B_DEFAULT], [0.0, 1.0], [1.0, 1.0], [3.0, -2.0]]
    cases = [(p, s) for p in prompts for s in strengths]

    def body(case):
        prompt, multipliers = case
        return {"prompt": prompt, "max_tokens": 10, "temperature": 0.0,
                "neuron_masks": [{"id": i, "multiplier": m} for i, m in enumerate(multipliers)]}

    sequential = {i: content(client.post("/v1/completions", json=body(c)).json()) for i, c in enumerate(cases)}
    for p in prompts:  # the strengths give different answers, so a request run at another's strength would show
        assert len({sequential[i] for i, c in enumerate(cases) if c[0] == p}) >= 2
    rng = random.Random(7)
    plan = [(rng.randrange(len(cases)), rng.random() < 0.5) for _ in range(100)]

    def one(item):
        index, stream = item
        with httpx.Client(base_url=str(client.base_url), timeout=300) as c:
            if stream:
                return index, streamed(c, "/v1/completions", body(cases[index]))[0]
            r = c.post("/v1/completions", json=body(cases[index]))
            assert r.status_code == 200, r.text
            return index, content(r.json())

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, plan))
    assert len(results) == 100
    wrong = [(cases[i], got, sequential[i]) for i, got in results if got != sequential[i]]
    assert not wrong, wrong[:3]


def test_a_client_that_leaves_mid_stream_does_not_disturb_the_next(server, files):
    client, _ = server
    long = {**chat("Tell a long story.", max_tokens=200), "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=long) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))  # one chunk, then hang up
    r = client.post("/v1/chat/completions", json=chat("Name a fruit.")).json()
    assert content(r) == fresh(files, ([A_DEFAULT, B_DEFAULT], "create_chat_completion", chat("Name a fruit.")))[0]


# ----------------------------------------------------------------------------------------------- 5

BAD = [
    (b'{"messages": [{"role": "user", "content": "hi"}], "neuron_masks": [{"id": 7, "multiplier": 0}]}',
     "neuron_masks[0].id", "there is no mask 7.*mask ids 0-1"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "neuron_masks": [{"id": 0, "multiplier": NaN}]}',
     "neuron_masks[0].multiplier", "must be a finite number, got nan"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "neuron_masks": [{"id": 0, "multiplier": -Infinity}]}',
     "neuron_masks[0].multiplier", "must be a finite number, got -inf"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "neuron_masks": [{"id": 0, "multiplier": "-1.5"}]}',
     "neuron_masks[0].multiplier", "must be a JSON number, got the string '-1.5'"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "neuron_masks": [{"id": 0, "multiplier": true}]}',
     "neuron_masks[0].multiplier", "must be a number, got True"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "neuron_masks": {"id": 0, "multiplier": 1}}',
     "neuron_masks", "must be a list"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "neuron_masks": [{"id": 0}]}',
     "neuron_masks[0].multiplier", 'has no "multiplier"'),
    (b'{"messages": [{"role": "user", "content": "hi"}], "neuron_masks": [{"id": 1, "multiplier": 0}, {"id": 1, "multiplier": 2}]}',
     "neuron_masks[1].id", "listed twice"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "neuron_masks": [{"id": "0", "multiplier": 0}]}',
     "neuron_masks[0].id", "must be an integer mask id"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "neuron_masks": [{"id": 0, "multiplier": 1, "scale": 2}]}',
     "neuron_masks[0]", "unknown field"),
    (b'{"messages": "hi"}', "messages", "valid list"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}', "max_tokens", "valid integer"),
    (b'{"messages": [', "body", "not valid JSON"),
    (b'[1, 2]', "body", "must be a JSON object"),
]


@pytest.mark.parametrize("raw, param, message", BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_bad_requests_get_400_naming_the_field_and_the_server_keeps_serving(server, raw, param, message):
    import re

    client, _ = server
    r = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and re.search(message, error["message"]), error
    assert error["type"] == "invalid_request_error"
    assert client.post("/v1/chat/completions", json=chat("Hi.", max_tokens=2)).status_code == 200


def test_bad_server_wide_settings_get_400_and_change_nothing(server):
    client, _ = server
    before = client.get("/neuron-masks").json()
    r = client.post("/neuron-masks", json=[{"id": 0, "multiplier": 0}, {"id": 5, "multiplier": 1}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "body[1].id"
    assert client.get("/neuron-masks").json() == before  # all or nothing


def test_a_prompt_longer_than_the_context_is_a_400(server):
    client, _ = server
    r = client.post("/v1/completions", json={"prompt": "word " * 2000, "max_tokens": 4})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_logprobs_need_the_server_started_with_logprobs(server, files):
    from fastapi.testclient import TestClient

    client, _ = server
    r = client.post("/v1/chat/completions", json={**chat("Hi."), "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 400 and "--logprobs" in r.json()["error"]["message"]
    with TestClient(build_app(files, logprobs=True)) as c:
        r = c.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 3, "logprobs": 2, "temperature": 0.0})
        assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["top_logprobs"]) == 3


def test_the_api_key_is_enforced_when_set(files):
    from fastapi.testclient import TestClient

    with TestClient(build_app(files, api_key="sesame")) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.post("/v1/chat/completions", json=chat("Hi.")).status_code == 401
        r = c.get("/neuron-masks", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "api key" in r.json()["error"]["message"].lower()
        assert c.get("/neuron-masks", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert c.get("/").status_code == 200  # the page itself is public; it asks for the key


def test_a_mask_for_another_model_stops_the_server_before_it_listens(files, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started listening"))
    result = CliRunner().invoke(cli, ["serve", "--model", str(files["model"]), "--mask", str(files["a"]),
                                      "--mask", str(files["other"])])
    assert result.exit_code == 1
    assert "Error: the mask was made for" in result.output and "different weights" in result.output


def test_a_missing_mask_file_stops_the_server_before_the_model_loads(files, tmp_path, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started listening"))
    result = CliRunner().invoke(cli, ["serve", "--model", str(files["model"]), "--mask", str(tmp_path / "nope.gguf")])
    assert result.exit_code == 1 and "does not exist" in result.output


# ----------------------------------------------------------------------------------------------- openai

def test_the_official_openai_client_reaches_all_of_it(server, files):
    from openai import OpenAI

    client, _ = server
    oai = OpenAI(base_url=str(client.base_url).rstrip("/") + "/v1", api_key="unused")
    assert [m.id for m in oai.models.list()] == ["tiny"]
    body = chat("Name a fruit.")
    r = oai.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=body["max_tokens"],
                                    temperature=0.0, extra_body={"neuron_masks": [{"id": 0, "multiplier": 0.0}]})
    assert r.model_extra["neuron_masks"] == [{"id": 0, "multiplier": 0.0}, {"id": 1, "multiplier": B_DEFAULT}]
    stream = oai.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=body["max_tokens"],
                                         temperature=0.0, stream=True,
                                         extra_body={"neuron_masks": [{"id": 0, "multiplier": 0.0}]})
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    want = fresh(files, ([0.0, B_DEFAULT], "create_chat_completion", body))[0]
    assert r.choices[0].message.content == text == want
    done = oai.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0.0,
                                  extra_body={"neuron_masks": [{"id": 1, "multiplier": 1.0}]})
    assert done.model_extra["neuron_masks"][1] == {"id": 1, "multiplier": 1.0}
    with pytest.raises(Exception) as info:  # the 400 arrives as the client's BadRequestError
        oai.chat.completions.create(model="tiny", messages=body["messages"],
                                    extra_body={"neuron_masks": [{"id": 9, "multiplier": 0.0}]})
    assert getattr(info.value, "status_code", None) == 400 and "no mask 9" in str(info.value)
