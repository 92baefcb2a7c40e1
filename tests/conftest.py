"""Shared fixtures: a locally trained tokenizer and tiny random Llama-family models. Nothing touches a hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "HFBRIDGE_TOKEN_CACHE" not in os.environ:  # the tests' tokenization cache entries stay out of the user's cache
    import atexit
    import shutil
    import tempfile

    os.environ["HFBRIDGE_TOKEN_CACHE"] = tempfile.mkdtemp(prefix="hfbridge-test-tokens-")
    atexit.register(shutil.rmtree, os.environ["HFBRIDGE_TOKEN_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from hfbridge.testing import build_tiny_causal_lm, build_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer=tiny_tokenizer)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Each test starts from the same environment variables: a run in this process that checkpoints sets
    Lightning's ``MASTER_ADDR``/``LOCAL_RANK``, which later in-process runs and child processes would read."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models run faster on one intra-op thread, and far faster on a busy machine (no spinning).
    Tests of real-size models are marked ``slow`` and keep every thread."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)




@pytest.fixture
def chat_data() -> list[dict]:
    """Chat records in the `messages` format."""
    return [
        {"messages": [
            {"role": "user", "content": f"Convert March {i + 1}, 2021"},
            {"role": "assistant", "content": f"2021-03-{i + 1:02d}"},
        ]}
        for i in range(12)
    ]


@pytest.fixture
def prompt_data() -> list[dict]:
    """Records in the `prompt_completion` format."""
    return [{"prompt": f"Date: May {i + 1}, 1999\nISO:", "completion": f" 1999-05-{i + 1:02d}"} for i in range(12)]
