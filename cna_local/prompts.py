"""Prompt sets: the bundled ones (by name) and user files (.txt, .jsonl, .csv)."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import CnaLocalError

BUNDLED_PACKAGE = "cna_local.data.prompts"
CONTRAST_DIR = "contrast"


class PromptSetError(CnaLocalError):
    """A prompt set is missing, empty or malformed."""


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[str, ...]

    def __post_init__(self):
        if not self.prompts:
            raise PromptSetError(f"prompt set {self.name!r} is empty. Fix: give at least one prompt (one per line in a .txt file).")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def sha256(self) -> str:
        """sha256 over the prompts in order, each UTF-8 encoded and followed by a NUL byte."""
        digest = hashlib.sha256()
        for prompt in self.prompts:
            digest.update(prompt.encode("utf-8") + b"\0")
        return digest.hexdigest()


def _lines(text: str) -> list[str]:
    # Blank lines separate nothing and would be empty prompts: skip them.
    return [line.strip() for line in text.splitlines() if line.strip()]


def _bundled_root():
    return resources.files(BUNDLED_PACKAGE)


def bundled_names() -> list[str]:
    """Names of the bundled prompt sets (e.g. 'harmful_train')."""
    return sorted(p.name[:-4] for p in _bundled_root().iterdir() if p.name.endswith(".txt"))


def load_bundled(name: str) -> PromptSet:
    """A bundled prompt set by name: harmful_train, benign_train, harmful_heldout, benign_heldout."""
    resource = _bundled_root() / f"{name}.txt"
    if not resource.is_file():
        raise PromptSetError(f"there is no bundled prompt set {name!r}. Fix: use one of {', '.join(bundled_names()) or '(none installed)'} or pass a file.")
    return PromptSet(name, tuple(_lines(resource.read_text(encoding="utf-8"))))


def contrast_names() -> list[str]:
    root = _bundled_root() / CONTRAST_DIR
    if not root.is_dir():
        return []
    return sorted(p.name[: -len(".a.txt")] for p in root.iterdir() if p.name.endswith(".a.txt"))


def load_contrast_pairs() -> list[tuple[PromptSet, PromptSet]]:
    """The bundled unrelated contrasts (a vs b) used to find universal neurons."""
    root = _bundled_root() / CONTRAST_DIR
    pairs = []
    for name in contrast_names():
        b = root / f"{name}.b.txt"
        if not b.is_file():
            raise PromptSetError(f"bundled contrast {name!r} has an .a.txt file but no .b.txt; the installation is incomplete. Fix: reinstall cna-local.")
        pairs.append((
            PromptSet(f"{name}.a", tuple(_lines((root / f"{name}.a.txt").read_text(encoding="utf-8")))),
            PromptSet(f"{name}.b", tuple(_lines(b.read_text(encoding="utf-8")))),
        ))
    if not pairs:
        raise PromptSetError("no bundled contrast pairs were found, so the universal-neuron filter cannot run. Fix: reinstall cna-local, or pass --no-universal-filter.")
    return pairs


def _from_jsonl(path: Path, text: str, field: str) -> list[str]:
    prompts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptSetError(f"{path}:{lineno} is not valid JSON ({exc.msg}). Fix: one JSON object per line.") from None
        if not isinstance(record, dict) or field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise PromptSetError(f"{path}:{lineno} has no field {field!r} (it has: {keys}). Fix: pass --field with the name of the prompt field.")
        value = record[field]
        if not isinstance(value, str) or not value.strip():
            raise PromptSetError(f"{path}:{lineno}: field {field!r} is not a non-empty string. Fix: every record needs a prompt text.")
        prompts.append(value.strip())
    return prompts


def _from_csv(path: Path, text: str, column: str) -> list[str]:
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or column not in reader.fieldnames:
        have = ", ".join(reader.fieldnames or []) or "no header row"
        raise PromptSetError(f"{path} has no column {column!r} (it has: {have}). Fix: pass --field with the prompt column's header.")
    return [row[column].strip() for row in reader if (row.get(column) or "").strip()]


def load_file(path: str | Path, field: str = "prompt") -> PromptSet:
    """Prompts from a file: .txt (one per line), .jsonl (the `field` of each object) or .csv (the `field` column)."""
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"prompt file {path} does not exist. Fix: check the path, or use a bundled set: {', '.join(bundled_names())}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PromptSetError(f"{path} is not UTF-8 text. Fix: save it as UTF-8.") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = _from_jsonl(path, text, field)
    elif suffix == ".csv":
        prompts = _from_csv(path, text, field)
    elif suffix in (".txt", ""):
        prompts = _lines(text)
    else:
        raise PromptSetError(f"{path}: unknown prompt file type {suffix!r}. Fix: use .txt (one prompt per line), .jsonl or .csv.")
    if not prompts:
        raise PromptSetError(f"{path} holds no prompts. Fix: put at least one prompt in it.")
    return PromptSet(path.stem, tuple(prompts))


def resolve_prompt_set(spec: str | Path, field: str = "prompt") -> PromptSet:
    """An existing file path, else a bundled set name."""
    path = Path(spec)
    if path.exists():
        return load_file(path, field)
    if str(spec) in bundled_names():
        return load_bundled(str(spec))
    raise PromptSetError(
        f"{spec} is neither a prompt file nor a bundled set. Fix: pass an existing .txt/.jsonl/.csv file "
        f"or one of: {', '.join(bundled_names())}."
    )
