"""Steering schedules in the runtime: SteeredLlama steers all positions, the prompt's, or those that
predict a reply token, and gives the evaluation engine's answers for the same schedule."""

from __future__ import annotations

import pytest

from cna_local.evaluation.engine import Engine
from cna_local.fingerprint import fingerprint_from_gguf
from cna_local.maskfile import MaskFileError, NeuronMask
from cna_local.runtime import SteeredLlama, SteeringError

from test_eval_runner import make_mask
from tiny_models import copy_fields

LLM = dict(n_ctx=512, n_threads=1, n_threads_batch=1)
PROMPT = "Write a haiku about rain"


@pytest.fixture(scope="module")
def model(tiny_gguf):
    return tiny_gguf("llama", "f32")


@pytest.fixture(scope="module")
def mask(model):
    return make_mask(fingerprint_from_gguf(model), multiplier=10.0)  # every neuron: replies change visibly


@pytest.fixture(scope="module")
def llm(model):
    llm = SteeredLlama(str(model), **LLM)
    yield llm
    llm.close()


def reply(llm, ids, n=16):
    out = llm.create_completion(ids, max_tokens=n, temperature=0.0, top_k=1, repeat_penalty=1.0)
    return out["choices"][0]["text"]


def engine_reply(llm, mask, schedule, n=16):
    """The same request through the evaluation engine, which steers by setting multiplier 1 between phases."""
    from cna_local.schedules import steered_in

    llm.set_mask(mask, 10.0, "all")
    engine = Engine(llm, schedule=schedule,
                    phase=lambda name: llm.set_mask(mask, 10.0 if steered_in(schedule, name) else 1.0, "all"))
    try:
        ids = engine.encode(PROMPT)
        return ids, engine.text(engine.greedy(engine.start([ids]), n)[0])
    finally:
        engine.close()


@pytest.mark.parametrize("schedule", ["all", "prompt", "generation"])
def test_steered_llama_gives_the_engines_answer_for_each_schedule(llm, mask, schedule):
    ids, want = engine_reply(llm, mask, schedule)
    llm.set_mask(mask, 10.0, schedule)
    assert llm.schedule == schedule
    assert reply(llm, ids) == want
    assert reply(llm, ids) == want  # again, from the reused prefix


def test_the_schedules_differ_and_multiplier_1_is_unsteered_under_each(llm, mask):
    ids, _ = engine_reply(llm, mask, "all")
    llm.steering.clear()
    plain = reply(llm, ids)
    answers = {}
    for schedule in ("all", "prompt", "generation"):
        llm.set_mask(mask, 10.0, schedule)
        answers[schedule] = reply(llm, ids)
        llm.set_mask(mask, 1.0, schedule)
        assert reply(llm, ids) == plain
    assert len(set(answers.values())) == 3 and plain not in answers.values()


def test_between_requests_llama_cpp_holds_what_is_set(llm, mask):
    ids, _ = engine_reply(llm, mask, "all")
    llm.set_mask(mask, 10.0, "prompt")
    reply(llm, ids)  # ends on unsteered generated tokens
    _, _, scales = llm.steering.entries()
    assert (scales == 10.0).all()


def test_schedule_setter_and_errors(llm, mask):
    llm.set_mask(mask, 10.0)
    assert llm.schedule == "all"  # the mask's own default
    llm.schedule = "generation"
    assert llm.schedule == "generation" and llm.multiplier == 10.0
    with pytest.raises(SteeringError, match="unknown schedule 'sometimes'"):
        llm.schedule = "sometimes"
    llm.steering.clear()
    with pytest.raises(SteeringError, match="no mask is set"):
        llm.schedule = "prompt"


def test_the_mask_file_carries_a_default_schedule(model, mask, tmp_path):
    mask.schedule = "prompt"
    try:
        path = mask.save(tmp_path / "prompt.gguf")
    finally:
        mask.schedule = "all"
    loaded = NeuronMask.load(path)
    assert loaded.schedule == "prompt" and loaded.meta["version"] == 2
    assert NeuronMask.load(mask.save(tmp_path / "all.gguf")).meta["version"] == 1  # older readers still load it
    llm = SteeredLlama(str(model), mask=path, **LLM)
    try:
        assert llm.schedule == "prompt"
    finally:
        llm.close()


def test_a_bad_schedule_in_a_file_is_refused_by_name(mask, tmp_path):
    import gguf

    from cna_local.maskfile import KEY_PREFIX

    path = mask.save(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(path))
    field = reader.fields[KEY_PREFIX + "model_name"]
    # rewrite the file with a schedule entry that no cna-local knows
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), arch=mask.arch)
    copy_fields(reader, writer, skip={KEY_PREFIX + "version"})
    writer.add_uint32(KEY_PREFIX + "version", 2)
    writer.add_string(KEY_PREFIX + "schedule", "sometimes")
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert field is not None
    with pytest.raises(MaskFileError, match="schedule entry is 'sometimes'"):
        NeuronMask.load(tmp_path / "bad.gguf")


def test_a_server_refuses_masks_that_steer_different_positions(mask, tmp_path):
    from cna_local.errors import CnaLocalError
    from cna_local.serve.masks import MaskRegistry

    a = mask.save(tmp_path / "a.gguf")
    mask.schedule = "generation"
    try:
        b = mask.save(tmp_path / "b.gguf")
    finally:
        mask.schedule = "all"
    with pytest.raises(CnaLocalError, match=r"different default schedules .*b.gguf: generation"):
        MaskRegistry.load([a, b])
    assert [m["schedule"] for m in MaskRegistry.load([b, b]).describe()] == ["generation", "generation"]
