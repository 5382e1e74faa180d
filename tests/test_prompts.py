"""Prompt sets: bundled sets by name and user files in .txt, .jsonl and .csv."""

import json

import pytest

from cna_local.prompts import (
    PromptSet,
    PromptSetError,
    bundled_names,
    load_bundled,
    load_contrast_pairs,
    load_file,
    resolve_prompt_set,
)


def test_txt_is_one_prompt_per_line_and_blank_lines_are_skipped(tmp_path):
    f = tmp_path / "pos.txt"
    f.write_text("first prompt\n\n  second prompt  \r\nthird\n", encoding="utf-8")
    s = load_file(f)
    assert s.name == "pos"
    assert s.prompts == ("first prompt", "second prompt", "third")


def test_jsonl_reads_the_named_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["a", "b"])) + "\n")
    assert load_file(f, field="text").prompts == ("a", "b")


def test_jsonl_without_the_field_names_the_line_the_keys_and_the_option(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"text": "no prompt field"}\n')
    with pytest.raises(PromptSetError, match=r"p.jsonl:2 has no field 'prompt' \(it has: text\).*--field"):
        load_file(f)


def test_jsonl_with_broken_json_names_the_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(PromptSetError, match="p.jsonl:2 is not valid JSON"):
        load_file(f)


def test_csv_reads_the_named_column(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('id,prompt\n1,"hello, world"\n2,second\n')
    assert load_file(f).prompts == ("hello, world", "second")


def test_csv_without_the_column_lists_the_columns(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("id,question\n1,what?\n")
    with pytest.raises(PromptSetError, match=r"no column 'prompt' \(it has: id, question\)"):
        load_file(f)


@pytest.mark.parametrize("name, content", [("blank.txt", "\n   \n"), ("empty.txt", ""), ("empty.jsonl", ""), ("header_only.csv", "prompt\n")])
def test_a_file_without_prompts_is_an_error(tmp_path, name, content):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(PromptSetError, match="holds no prompts"):
        load_file(f)


def test_an_empty_prompt_set_is_an_error():
    with pytest.raises(PromptSetError, match="empty"):
        PromptSet("nothing", ())


def test_missing_file_and_unknown_type_are_errors(tmp_path):
    with pytest.raises(PromptSetError, match="does not exist"):
        load_file(tmp_path / "missing.txt")
    f = tmp_path / "p.parquet"
    f.write_bytes(b"x")
    with pytest.raises(PromptSetError, match="unknown prompt file type"):
        load_file(f)


def test_sha256_depends_on_content_and_order_only():
    a = PromptSet("a", ("x", "y"))
    assert a.sha256 == PromptSet("other name", ("x", "y")).sha256
    assert a.sha256 != PromptSet("a", ("y", "x")).sha256
    assert a.sha256 != PromptSet("a", ("xy",)).sha256  # prompt boundaries count


def test_bundled_sets_load_by_name():
    assert {"harmful_train", "benign_train", "harmful_heldout", "benign_heldout"} <= set(bundled_names())
    s = load_bundled("harmful_train")
    assert s.name == "harmful_train" and len(s) > 0 and all(p.strip() == p and p for p in s.prompts)


def test_unknown_bundled_set_lists_the_known_ones():
    with pytest.raises(PromptSetError, match="harmful_train"):
        load_bundled("no_such_set")


def test_contrast_pairs_are_a_and_b_sets():
    pairs = load_contrast_pairs()
    assert pairs
    for a, b in pairs:
        assert a.name.endswith(".a") and b.name.endswith(".b") and a.name[:-2] == b.name[:-2]


def test_resolve_prefers_an_existing_file_then_a_bundled_name(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("one\n")
    assert resolve_prompt_set(str(f)).prompts == ("one",)
    assert resolve_prompt_set("benign_train").name == "benign_train"
    with pytest.raises(PromptSetError, match="neither a prompt file nor a bundled set"):
        resolve_prompt_set(str(tmp_path / "nope.txt"))
