"""`cna-local chat`: a terminal chat driven through a pipe. Every reply (temperature 0) equals the library's
create_chat_completion on the same conversation at the same strength."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cna_local.cli import cli
from cna_local.runtime import SteeredLlama

from test_serve import make_mask

N = 8


@pytest.fixture(scope="module")
def files(tiny_gguf, tmp_path_factory):
    model = tiny_gguf("llama", "f32")
    d = tmp_path_factory.mktemp("chat")
    make_mask(model, d / "m.gguf", seed=1, multiplier=3.0)
    return {"model": str(model), "mask": str(d / "m.gguf")}


def run(files, text, *extra):
    args = ["chat", "--model", files["model"], "--mask", files["mask"], "--temperature", "0", "--max-tokens", str(N),
            "--n-ctx", "1024", *extra]
    return CliRunner().invoke(cli, args, input=text, catch_exceptions=False)


def library(files, messages, multiplier):
    llm = SteeredLlama(files["model"], mask=files["mask"], multiplier=multiplier, n_ctx=1024)
    try:
        return llm.create_chat_completion(messages=messages, max_tokens=N, temperature=0.0)["choices"][0]["message"]["content"]
    finally:
        llm.close()


def replies(output):
    return [line[len("assistant> "):] for line in output.splitlines() if line.startswith("assistant> ")]


def test_a_conversation_streams_in_the_chat_template_and_strengths_change_live(files):
    result = run(files, "Hello there\n/multiplier 1\nAnd now?\n/off\n/multiplier -2\nAgain?\n")
    assert result.exit_code == 0, result.output
    first, second, third = replies(result.output)
    history = [{"role": "user", "content": "Hello there"}]
    assert first == library(files, history, 3.0)  # the mask's own multiplier
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And now?"}]
    assert second == library(files, history, 1.0)
    history += [{"role": "assistant", "content": second}, {"role": "user", "content": "Again?"}]
    assert third == library(files, history, -2.0)
    assert "steering: off (multiplier 1)" in result.output and "steering: multiplier -2" in result.output
    assert first != library(files, [{"role": "user", "content": "Hello there"}], 1.0)  # the strength shows


def test_compare_answers_the_last_message_unsteered_and_steered_side_by_side(files):
    result = run(files, "The capital of France is\n/compare\n")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith("unsteered (multiplier 1)"))
    assert "| multiplier 3" in header
    body = [line for line in result.output.splitlines() if " | " in line][1:]
    left = " ".join(line.split(" | ")[0].strip() for line in body).strip()
    right = " ".join(line.split(" | ")[1].strip() for line in body).strip()
    messages = [{"role": "user", "content": "The capital of France is"}]
    assert left == " ".join(library(files, messages, 1.0).split())
    assert right == " ".join(library(files, messages, 3.0).split())


def test_reset_help_and_bad_commands(files):
    result = run(files, "/help\n/multiplier nan\n/multiplier strong\n/frobnicate\nHi\n/reset\n/compare\n/quit\nnever read\n")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "/multiplier X" in out and "/compare" in out  # the help
    assert "/multiplier must be a finite number, got 'nan'" in out
    assert "/multiplier must be a number, got 'strong'" in out
    assert "unknown command /frobnicate" in out
    assert "conversation cleared." in out and "nothing to compare yet" in out
    assert len(replies(out)) == 1  # "never read" came after /quit


def test_without_a_mask_it_chats_unsteered_and_says_so(files):
    result = CliRunner().invoke(cli, ["chat", "--model", files["model"], "--temperature", "0", "--max-tokens", "4"],
                                input="/multiplier 0\nHi\n")
    assert result.exit_code == 0, result.output
    assert "no mask" in result.output and "start the chat with --mask" in result.output
    assert len(replies(result.output)) == 1


def test_multiplier_without_mask_and_bad_values_are_refused_before_loading(files, tmp_path):
    result = CliRunner().invoke(cli, ["chat", "--model", files["model"], "--multiplier", "0"])
    assert result.exit_code == 1 and "--multiplier needs --mask" in result.output
    result = CliRunner().invoke(cli, ["chat", "--model", files["model"], "--mask", str(tmp_path / "none.gguf")])
    assert result.exit_code == 1 and "does not exist" in result.output
    result = CliRunner().invoke(cli, ["chat", "--model", files["model"], "--mask", files["mask"], "--multiplier", "nan"])
    assert result.exit_code == 1 and "finite number" in result.output


def test_a_gated_mask_steers_only_messages_its_gate_fires_on_and_gate_switches_it(files, tmp_path):
    import dataclasses

    from cna_local.gate import Gate
    from cna_local.maskfile import NeuronMask

    mask = NeuronMask.load(files["mask"])
    never = dataclasses.replace(mask, gate=Gate.never(len(mask)))
    never.save(tmp_path / "never.gguf")
    gated = {**files, "mask": str(tmp_path / "never.gguf")}
    result = run(gated, "Hello there\n/gate off\nHello there\n/gate\n/gate maybe\n")
    assert result.exit_code == 0, result.output
    closed, steered = replies(result.output)
    history = [{"role": "user", "content": "Hello there"}]
    assert closed == library(files, history, 1.0)  # the gate stayed closed: unsteered
    assert "(gate closed: unsteered)" in result.output and "gated (only prompts the gate fires on)" in result.output
    history += [{"role": "assistant", "content": closed}, {"role": "user", "content": "Hello there"}]
    assert steered == library(files, history, 3.0)  # /gate off: every message steered
    assert "gate: off. Usage: /gate on, /gate off" in result.output
    plain = run(files, "/gate on\n")
    assert "this mask has no gate" in plain.output
