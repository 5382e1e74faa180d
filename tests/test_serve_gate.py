"""`cna-local serve` with a gated mask: a request is steered only when the gate fires on its prompt, says so
in its response, and may turn the gate off ("gate": false); every answer equals the library's (the static
mask where the gate fired, the unsteered model where it did not), from a fresh process."""

from __future__ import annotations

import dataclasses
import json

import httpx
import numpy as np
import pytest

from cna_local.gate import Gate
from cna_local.maskfile import NeuronMask
from cna_local.runtime import SteeredLlama

from serve_helpers import SETTINGS, chat, fresh_answers, live_server
from test_serve import make_mask

PROMPTS = ["Say hello to the moon", "Explain what a river is"]
M = -1.5


@pytest.fixture(scope="module")
def files(tiny_gguf, tmp_path_factory):
    model = tiny_gguf("llama", "f32")
    d = tmp_path_factory.mktemp("serve-gate")
    static = make_mask(model, d / "static.gguf", seed=1, multiplier=M, name="refusal")
    # a gate whose threshold lies between the two prompts' scores: it fires on exactly one of them
    probe = dataclasses.replace(static, gate=Gate(np.random.default_rng(0).normal(size=len(static)), 0.0))
    llm = SteeredLlama(str(model), mask=probe, gate=True, **SETTINGS)
    scores = []
    try:
        for prompt in PROMPTS:
            llm.create_chat_completion(**chat(prompt, max_tokens=1))
            scores.append(llm.last_gate.score)
    finally:
        llm.close()
    assert scores[0] != scores[1]
    fires_on = int(np.argmax(scores))
    # ... and whose strengthening threshold (multiplier > 1) lies above both: it fires on neither
    gated = dataclasses.replace(probe, gate=Gate(probe.gate.weights, float(np.mean(scores)),
                                                 threshold_strengthen=float(max(scores)) + 1.0))
    gated.save(d / "gated.gguf")
    return {"model": model, "static": d / "static.gguf", "gated": d / "gated.gguf", "fires_on": fires_on}


@pytest.fixture(scope="module")
def server(files):
    from cna_local.commands.serve import _build

    app = _build(str(files["model"]), [files["gated"]], None, "tiny", SETTINGS["n_ctx"], SETTINGS["n_ubatch"],
                 SETTINGS["n_threads"], -1, None)
    with live_server(app) as url:
        yield url


def post(url, body, path="/v1/chat/completions"):
    return httpx.post(url + path, json=body, timeout=600)


def expected(files, jobs):
    """The library's answers: the static mask at M where the gate fires, multiplier 1 (unsteered) where not."""
    return fresh_answers(files["model"], [files["static"]],
                         [([M if steered else 1.0], "create_chat_completion", chat(p)) for p, steered in jobs])


def test_the_gate_decides_per_request_and_the_answer_is_the_librarys(server, files):
    fired = [i == files["fires_on"] for i in range(len(PROMPTS))]
    got = [post(server, chat(p)).json() for p in PROMPTS]
    assert [r["gate"]["fired"] for r in got] == fired
    assert all(r["neuron_masks"] == [{"id": 0, "multiplier": M, "gate": True}] for r in got)
    want = expected(files, list(zip(PROMPTS, fired)))
    assert [r["choices"][0]["message"]["content"] for r in got] == want
    assert want[0] != expected(files, [(PROMPTS[0], not fired[0])])[0]  # steering does change that answer


def test_a_request_that_strengthens_is_gated_by_the_stricter_threshold(server, files):
    prompt = PROMPTS[files["fires_on"]]
    got = post(server, {**chat(prompt), "neuron_masks": [{"id": 0, "multiplier": 2.0}]}).json()
    assert got["gate"]["fired"] is False  # it fires on this prompt when weakening (above), not at 2
    gate = NeuronMask.load(files["gated"]).gate
    assert got["gate"]["threshold"] == pytest.approx(gate.threshold_strengthen, abs=1e-4) != gate.threshold
    assert gate.threshold <= got["gate"]["score"] < got["gate"]["threshold"]
    assert got["choices"][0]["message"]["content"] == expected(files, [(prompt, False)])[0]  # unsteered, exactly


def test_a_request_can_turn_the_gate_off_and_then_every_prompt_is_steered(server, files):
    for body in ({"neuron_masks": [{"id": 0, "multiplier": M, "gate": False}]}, {"gate": False}):
        got = [post(server, {**chat(p), **body}).json() for p in PROMPTS]
        assert all(r["gate"] is None for r in got)
        assert [r["choices"][0]["message"]["content"] for r in got] == expected(files, [(p, True) for p in PROMPTS])


def test_a_stream_says_what_the_gate_decided_in_its_last_chunk(server, files):
    prompt = PROMPTS[files["fires_on"]]
    with httpx.stream("POST", server + "/v1/chat/completions", json={**chat(prompt), "stream": True}, timeout=600) as r:
        chunks = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    assert chunks[-1]["gate"]["fired"] is True
    assert all("gate" not in c for c in chunks[:-1])


def test_the_masks_route_shows_and_sets_the_gate(server):
    [listed] = httpx.get(server + "/neuron-masks").json()
    assert listed["gate"] is True and listed["has_gate"] is True
    assert httpx.post(server + "/neuron-masks", json=[{"id": 0, "gate": False}]).status_code == 200
    try:
        assert httpx.get(server + "/neuron-masks").json()[0]["gate"] is False
        assert post(server, chat(PROMPTS[0])).json()["gate"] is None
    finally:
        httpx.post(server + "/neuron-masks", json=[{"id": 0, "gate": True}])


@pytest.mark.parametrize("extra, param, message", [
    ({"gate": "yes"}, "gate", "must be true or false"),
    ({"neuron_masks": [{"id": 0, "gate": 1}]}, "neuron_masks[0].gate", "must be true or false"),
    ({"neuron_masks": [{"id": 0, "multiplier": M, "gate": True, "strength": 2}]}, "neuron_masks[0]", "unknown field"),
])
def test_bad_gate_fields_get_400_and_the_server_keeps_serving(server, extra, param, message):
    r = post(server, {**chat(PROMPTS[0]), **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == param
    assert post(server, chat(PROMPTS[0])).status_code == 200


def test_a_gate_on_a_mask_without_one_is_refused(files):
    from cna_local.commands.serve import _build
    from cna_local.errors import CnaLocalError

    app = _build(str(files["model"]), [files["static"]], None, "tiny", SETTINGS["n_ctx"], SETTINGS["n_ubatch"],
                 SETTINGS["n_threads"], -1, None)
    with live_server(app) as url:
        r = post(url, {**chat(PROMPTS[0]), "gate": True})
        assert r.status_code == 400 and "has no gate" in r.json()["error"]["message"]
    with pytest.raises(CnaLocalError, match="--gate: .*has no gate"):
        _build(str(files["model"]), [files["static"]], None, "tiny", SETTINGS["n_ctx"], SETTINGS["n_ubatch"],
               SETTINGS["n_threads"], -1, None, gate=True)
    assert NeuronMask.load(files["static"]).gate is None
