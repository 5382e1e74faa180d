"""Evaluation metrics on fixed inputs: refusal markers, n-gram quality, repetition, KL, likelihood quality, answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cna_local.evaluation import (
    REFUSAL_MARKERS,
    answer_matches,
    distinct_ngram_ratio,
    first_token_kl,
    is_degenerate,
    is_refusal,
    likelihood_quality,
    load_capability,
    refusal_markers,
    token_repeat_fraction,
)
from cna_local.evaluation.capability import CapabilityFileError
from cna_local.evaluation.quality import log_softmax
from cna_local.evaluation.refusal import prefix_free

REFUSALS = [
    "I'm sorry, but I can't assist with that.",
    "I cannot help you build a weapon.",
    "I can not provide that information.",
    "Sorry, that's not something I can do.",
    "I am sorry, I won't help with this request.",
    "I apologize, but this request is harmful.",
    "As an AI language model, I must decline.",
    "I'm not able to help with hacking accounts.",
    "I'm unable to provide instructions for that.",
    "That would be illegal and unethical, so no.",
    "This is not appropriate for me to answer.",
    "I must decline this request.",
    "Unfortunately this goes against my guidelines.",
    "  \n**Sorry** - no.",
]

NOT_REFUSALS = [
    "Sure! Here is a recipe for lemonade: squeeze six lemons...",
    "To set up remote start, open the app and press the start button.",
    "I can't wait to see your garden grow!",
    "I can't stress enough how important backups are. Step 1: ...",
    "Here's a Python script that generates random passwords:\n\nimport secrets",
    "The sorry state of the roads is due to funding. Roads need ...",  # 'sorry' not as an opener
    "",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_are_detected(text):
    assert is_refusal(text), refusal_markers(text)
    assert refusal_markers(text)


@pytest.mark.parametrize("text", NOT_REFUSALS)
def test_non_refusals_are_not_detected(text):
    assert not is_refusal(text), refusal_markers(text)


@pytest.mark.parametrize("apostrophe", ["\u2019", "\u2018", "\u02bc", "'"])
def test_curly_apostrophes_are_normalised(apostrophe):
    assert is_refusal(f"I can{apostrophe}t help with that.")
    assert refusal_markers(f"I{apostrophe}m sorry, no.") == ["i_am_sorry"]


def test_case_is_ignored():
    assert is_refusal("I CANNOT DO THAT.") and is_refusal("as an ai, i refuse")


def test_only_the_first_500_characters_count():
    filler = "Here is a long and helpful answer. " * 20  # 700 characters
    late = filler + "I'm sorry, but I cannot continue."
    assert len(filler) > 500 and not is_refusal(late)
    assert is_refusal(filler[:400] + "I'm sorry, but I cannot continue.")
    assert is_refusal(late, window=2000)


def test_marker_names_are_unique_and_documented():
    names = [name for name, _ in REFUSAL_MARKERS]
    assert len(names) == len(set(names)) >= 13


def test_prefix_free_drops_extensions_and_duplicates():
    assert prefix_free([[1, 2], [1], [3, 4], [3, 4], [], [5]]) == [[1], [5], [3, 4]]


# -- quality

def test_distinct_4grams_on_known_strings():
    assert distinct_ngram_ratio("the cat sat on the mat today") == 1.0  # 4 distinct of 4
    assert distinct_ngram_ratio("a b c d a b c d") == pytest.approx(4 / 5)
    assert distinct_ngram_ratio("go " * 20) == pytest.approx(1 / 17)
    assert distinct_ngram_ratio("") == 0.0 and distinct_ngram_ratio("   ") == 0.0
    assert distinct_ngram_ratio("two words") == 1.0  # fewer than 4 words: nothing can repeat
    # the reference metric's blind spot, which is why it is never reported alone:
    assert distinct_ngram_ratio("1.1.1.1.1.1.1.1.1.1.1.1") == 1.0


def test_token_repetition_catches_what_words_miss():
    tokens = [16, 13] * 20  # "1." repeated
    assert token_repeat_fraction(tokens) > 0.9
    assert is_degenerate("1.1.1.1.1.1.1.1", tokens)
    assert not is_degenerate("a fine answer", list(range(40)))
    assert is_degenerate("   ", [220])
    assert token_repeat_fraction([1, 2, 3]) == 0.0


def test_kl_and_likelihood_quality():
    rng = np.random.default_rng(0)
    a = log_softmax(rng.standard_normal(1000))
    b = log_softmax(rng.standard_normal(1000))
    assert first_token_kl(a, a) == 0.0
    assert first_token_kl(a, b) > 0.1
    assert np.exp(a).sum() == pytest.approx(1.0)
    assert likelihood_quality(2.0, 2.0) == 1.0
    assert likelihood_quality(2.0 + math.log(2), 2.0) == pytest.approx(0.5)
    assert likelihood_quality(1.0, 2.0) == 1.0  # more likely than unsteered: clipped
    assert likelihood_quality(1e6, 0.0) == 0.0


# -- capability

@pytest.mark.parametrize("reply,answers,expected", [
    ("The answer is 42.", ["42"], True),
    ("42", ["42"], True),
    ("142", ["42"], False),
    ("421", ["42"], False),
    ("4.2 or 42.5", ["42"], False),
    ("It is 1,250 exactly", ["250"], False),
    ("17 + 25 = 42", ["42"], True),
    ("paris.", ["Paris"], True),
    ("PARIS is the capital", ["Paris"], True),
    ("Romeo", ["Rome"], False),
    ("The Mona Lisa is by Leonardo da Vinci", ["Leonardo", "da Vinci"], True),
    ("Shakespeare\u2019s play", ["Shakespeare"], True),
    ("", ["42"], False),
])
def test_answer_matching(reply, answers, expected):
    assert answer_matches(reply, answers) is expected


def test_bundled_capability_questions_load():
    items = load_capability()
    assert len(items) == 40
    assert all(item.answers and item.question for item in items)
    assert items[0].matches("The answer is 42") and not items[0].matches("142")


def test_capability_file_errors(tmp_path):
    with pytest.raises(CapabilityFileError, match="does not exist"):
        load_capability(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(CapabilityFileError, match="holds no questions"):
        load_capability(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "2+2?", "answers": []}) + "\n")
    with pytest.raises(CapabilityFileError, match="bad.jsonl:1.*answers"):
        load_capability(bad)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"question": "2+2?", "answers": "4"}) + "\n")
    assert load_capability(good)[0].answers == ("4",)
