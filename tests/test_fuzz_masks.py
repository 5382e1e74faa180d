"""Fuzzing the mask file: generated broken files (tests/fuzz_masks.py) through NeuronMask.load,
`cna-local inspect` and SteeredLlama.set_mask: no crash, no hang, every refusal a CnaLocalError that names
the file. A fixed-seed subset runs here; `python tools/fuzz_masks.py` runs the full count.

tests/fuzz_corpus/ keeps every file that once failed (a regression corpus), replayed on every run.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings

from cna_local.fingerprint import fingerprint_from_gguf
from cna_local.runtime import SteeredLlama

from fuzz_masks import MUTATIONS, mask_files, run_case

CORPUS = Path(__file__).parent / "fuzz_corpus"
CI_EXAMPLES = 1500


@pytest.fixture(scope="module")
def target(tiny_gguf):
    model = tiny_gguf("llama", "f32")
    llm = SteeredLlama(str(model), n_ctx=32, n_threads=1)
    yield fingerprint_from_gguf(model), llm
    llm.close()


def test_generated_broken_masks_are_refused_by_name(target, tmp_path_factory):
    fingerprint, llm = target
    path = tmp_path_factory.mktemp("fuzz") / "case.gguf"
    seen: Counter = Counter()

    @seed(20261130)
    @settings(max_examples=CI_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mask_files(fingerprint))
    def case(generated):
        kind, data = generated
        seen[(kind, run_case(kind, data, path, llm))] += 1

    case()
    kinds = {kind for kind, _ in seen}
    assert kinds == set(MUTATIONS), f"mutations never generated: {set(MUTATIONS) - kinds}"
    assert seen[("none", "applied")] > 0  # valid files do load, print and apply


def test_the_regression_corpus_is_there():
    assert len(list(CORPUS.glob("*.gguf"))) >= 4  # kept in git (an exception in .gitignore)


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.gguf")), ids=lambda p: p.name)
def test_the_regression_corpus(target, path, tmp_path):
    _, llm = target
    kind = path.name.split("-")[0]
    run_case(kind, path.read_bytes(), tmp_path / path.name, llm)
