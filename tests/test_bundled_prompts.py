"""Specification tests for the bundled prompt data shipped in cna_local/data."""

import json
import re
from importlib.resources import files

import pytest

DATA = files("cna_local") / "data"
PROMPTS = DATA / "prompts"
CONTRAST = PROMPTS / "contrast"

CONTRAST_NAMES = [
    "formal_casual",
    "question_command",
    "code_prose",
    "english_french",
    "short_long",
    "math_history",
    "positive_negative",
    "science_cooking",
    "past_future",
    "story_list",
]

MAIN_FILES = [
    "harmful_train.txt",
    "benign_train.txt",
    "harmful_heldout.txt",
    "benign_heldout.txt",
]


def _raw_lines(resource):
    text = resource.read_text(encoding="utf-8")
    return text.splitlines()


def _lines(resource):
    lines = _raw_lines(resource)
    assert lines, f"{resource} is empty"
    return lines


def _norm(line):
    return re.sub(r"\s+", " ", line.strip().lower())


def _all_text_resources():
    out = [PROMPTS / name for name in MAIN_FILES]
    for name in CONTRAST_NAMES:
        out.append(CONTRAST / f"{name}.a.txt")
        out.append(CONTRAST / f"{name}.b.txt")
    return out


@pytest.mark.parametrize("name", ["harmful_train.txt", "benign_train.txt"])
def test_train_sets_are_large_enough(name):
    assert len(_lines(PROMPTS / name)) >= 100


@pytest.mark.parametrize("name", ["harmful_heldout.txt", "benign_heldout.txt"])
def test_heldout_sets_are_large_enough(name):
    assert len(_lines(PROMPTS / name)) >= 50


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_harmful_benign_pairs_have_equal_length(split):
    harmful = _lines(PROMPTS / f"harmful_{split}.txt")
    benign = _lines(PROMPTS / f"benign_{split}.txt")
    assert len(harmful) == len(benign)


@pytest.mark.parametrize("resource", _all_text_resources(), ids=lambda r: r.name)
def test_no_duplicate_lines_within_file(resource):
    lines = [_norm(line) for line in _lines(resource)]
    dupes = sorted({line for line in lines if lines.count(line) > 1})
    assert not dupes, f"duplicates in {resource.name}: {dupes}"


@pytest.mark.parametrize("resource", _all_text_resources(), ids=lambda r: r.name)
def test_no_blank_lines(resource):
    for i, line in enumerate(_raw_lines(resource), start=1):
        assert line.strip(), f"blank line {i} in {resource.name}"


def test_capability_has_no_blank_lines():
    for i, line in enumerate(_raw_lines(DATA / "capability.jsonl"), start=1):
        assert line.strip(), f"blank line {i} in capability.jsonl"


def test_train_and_heldout_do_not_overlap():
    train = set()
    for name in ("harmful_train.txt", "benign_train.txt"):
        train.update(_norm(line) for line in _lines(PROMPTS / name))
    heldout = set()
    for name in ("harmful_heldout.txt", "benign_heldout.txt"):
        heldout.update(_norm(line) for line in _lines(PROMPTS / name))
    assert not (train & heldout), f"overlap: {sorted(train & heldout)}"


def test_harmful_and_benign_do_not_overlap():
    harmful = set()
    benign = set()
    for split in ("train", "heldout"):
        harmful.update(_norm(l) for l in _lines(PROMPTS / f"harmful_{split}.txt"))
        benign.update(_norm(l) for l in _lines(PROMPTS / f"benign_{split}.txt"))
    assert not (harmful & benign)


@pytest.mark.parametrize("name", CONTRAST_NAMES)
def test_contrast_pairs_have_equal_nonzero_length(name):
    a = _lines(CONTRAST / f"{name}.a.txt")
    b = _lines(CONTRAST / f"{name}.b.txt")
    assert len(a) > 0
    assert len(a) == len(b)


def test_capability_jsonl_parses():
    lines = _lines(DATA / "capability.jsonl")
    assert len(lines) >= 1
    kinds = set()
    for i, line in enumerate(lines, start=1):
        entry = json.loads(line)
        assert isinstance(entry.get("question"), str) and entry["question"].strip(), i
        answers = entry.get("answers")
        assert isinstance(answers, list) and answers, i
        assert all(isinstance(a, str) and a.strip() for a in answers), i
        assert entry.get("kind") in {"arithmetic", "fact"}, i
        kinds.add(entry["kind"])
    assert kinds == {"arithmetic", "fact"}
