"""Capability retention: short questions with known answers, asked with and without steering.

`cna_local/data/capability.jsonl` holds one JSON object per line:
`{"question": "...", "answers": ["42"], "kind": "arithmetic"}`. A reply is correct if it contains one of
the answers, case-insensitively, as a whole word: "42" matches "The answer is 42." but not "142" or
"4.2"/"42.5", and "Rome" does not match "Romeo".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

from ..errors import CnaLocalError
from .refusal import normalize

BUNDLED = "capability.jsonl"


class CapabilityFileError(CnaLocalError):
    """A capability question file is missing or malformed."""


@dataclass(frozen=True)
class CapabilityItem:
    question: str
    answers: tuple[str, ...]
    kind: str = ""

    def matches(self, reply: str) -> bool:
        return answer_matches(reply, self.answers)


_NUMBER = re.compile(r"[+-]?\d+(?:[.,]\d+)*")


def _answer_regex(answer: str) -> re.Pattern:
    answer = normalize(answer.strip())
    body = r"\s+".join(re.escape(part) for part in answer.split())
    if _NUMBER.fullmatch(answer):
        # a number: no digit (or decimal/thousands part) may continue it on either side
        return re.compile(r"(?<![\d.,])" + body + r"(?![\d]|[.,]\d)")
    return re.compile(r"(?<!\w)" + body + r"(?!\w)", re.IGNORECASE)


def answer_matches(reply: str, answers: Iterable[str]) -> bool:
    """Whether `reply` contains one of `answers` as a whole word (case-insensitive; numbers as whole numbers)."""
    text = normalize(reply)
    return any(_answer_regex(a).search(text) for a in answers if a.strip())


def _parse(text: str, source: str) -> list[CapabilityItem]:
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CapabilityFileError(f"{where} is not valid JSON ({exc.msg}). Fix: one JSON object per line.") from None
        if not isinstance(record, dict):
            raise CapabilityFileError(f"{where} is not a JSON object. Fix: write {{\"question\": ..., \"answers\": [...]}}.")
        question, answers = record.get("question"), record.get("answers")
        if not isinstance(question, str) or not question.strip():
            raise CapabilityFileError(f"{where} has no non-empty \"question\" string.")
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise CapabilityFileError(f"{where}: \"answers\" must be a non-empty list of non-empty strings.")
        items.append(CapabilityItem(question.strip(), tuple(a.strip() for a in answers), str(record.get("kind", ""))))
    if not items:
        raise CapabilityFileError(f"{source} holds no questions. Fix: put at least one JSON object per line in it.")
    return items


def load_capability(path: str | Path | None = None) -> list[CapabilityItem]:
    """The questions of a .jsonl file, or the bundled set when `path` is None."""
    if path is None:
        resource = resources.files("cna_local.data") / BUNDLED
        return _parse(resource.read_text(encoding="utf-8"), f"bundled {BUNDLED}")
    path = Path(path)
    if not path.is_file():
        raise CapabilityFileError(f"capability file {path} does not exist. Fix: check the path, or leave --capability out to use the bundled questions.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CapabilityFileError(f"{path} is not UTF-8 text. Fix: save it as UTF-8.") from None
    return _parse(text, str(path))
