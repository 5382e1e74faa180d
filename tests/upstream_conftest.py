"""conftest for llama-cpp-python's own test suite, run offline by tools/upstream_tests.py.

Its fixtures download models from the Hugging Face hub; here each download is answered with a local file
(named in $CNA_UPSTREAM_MODELS, JSON: hub filename -> local path). A model without a local stand-in skips
its test, saying which model it needed. Not collected by cna-local's own test run (its name is not conftest.py).
"""

import json
import os

import huggingface_hub
import pytest

LOCAL = json.loads(os.environ.get("CNA_UPSTREAM_MODELS", "{}"))


def _local_download(repo_id, filename, *args, **kwargs):
    if filename in LOCAL:
        return LOCAL[filename]
    pytest.skip(f"needs {repo_id}/{filename} from the Hugging Face hub, which this machine cannot reach")


# the test modules do `from huggingface_hub import hf_hub_download` after this file is imported
huggingface_hub.hf_hub_download = _local_download
