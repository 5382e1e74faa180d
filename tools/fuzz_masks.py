"""The full fuzz run of the mask file: N generated broken files (default 10,000) through NeuronMask.load,
`cna-local inspect` and SteeredLlama.set_mask on a tiny model; prints counts per mutation and outcome.

    python tools/fuzz_masks.py [--examples 10000] [--seed 1] [--save-failures tests/fuzz_corpus]

A failing case stops the run, and with --save-failures its file (shrunk by hypothesis) is kept there for
tests/test_fuzz_masks.py to replay on every run. Needs the test extras (`pip install ".[test]"`).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--save-failures", type=Path, default=None, metavar="DIR")
    args = parser.parse_args()

    import resource

    # a case that eats memory fails as a MemoryError instead of taking the machine down
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    from hypothesis import HealthCheck, given, seed, settings

    from cna_local.fingerprint import fingerprint_from_gguf
    from cna_local.runtime import SteeredLlama
    from fuzz_masks import mask_files, run_case
    from tiny_models import build_tiny_hf, to_gguf

    work = Path(tempfile.mkdtemp(prefix="cna-fuzz-"))
    model = to_gguf(build_tiny_hf("llama", work / "hf"), "f32", work / "tiny-llama-f32.gguf")
    fingerprint = fingerprint_from_gguf(model)
    llm = SteeredLlama(str(model), n_ctx=32, n_threads=1)
    path = work / "case.gguf"
    seen: Counter = Counter()
    last: dict = {}
    started = time.perf_counter()

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mask_files(fingerprint))
    def case(generated):
        kind, data = generated
        last.update(kind=kind, data=data)
        seen[(kind, run_case(kind, data, path, llm))] += 1

    try:
        case()
    except BaseException:
        if args.save_failures is not None and last:
            args.save_failures.mkdir(parents=True, exist_ok=True)
            name = f"{last['kind']}-{hashlib.sha256(last['data']).hexdigest()[:12]}.gguf"
            (args.save_failures / name).write_bytes(last["data"])
            print(f"saved the failing case as {args.save_failures / name}", file=sys.stderr)
        raise
    finally:
        llm.close()
    total = sum(seen.values())
    print(f"{total} generated mask files in {time.perf_counter() - started:.0f} s: 0 crashes, 0 hangs, "
          f"every refusal a CnaLocalError naming the file")
    for (kind, outcome), n in sorted(seen.items()):
        print(f"  {kind:15s} {outcome:45s} {n:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
