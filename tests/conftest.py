"""Test set-up: 8 CPU devices for mesh tests (before jax is imported), quiet TensorFlow, and one
XLA compilation cache for the session."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# Tests and the command-line runs they start compile many of the same programs (the real
# SmolLM2's decode loop, the smoke config's train step): JAX's persistent cache compiles each once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="itune-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# The limit on a child process or notebook the tests start. One that runs this long has hung
# rather than slowed down: the limit only keeps a hang from stalling the suite, and no test may
# fail because the machine is busy.
HANG_GUARD_S = 30 * 60


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """``../shared`` (or ``$ITUNE_SHARED``); skips when absent unless ``ITUNE_REQUIRE_SHARED=1``."""
    from itune import configlib

    path = pathlib.Path(configlib.shared_dir())
    if not path.is_dir():
        if os.environ.get("ITUNE_REQUIRE_SHARED") == "1":
            pytest.fail(f"ITUNE_REQUIRE_SHARED=1 but the shared folder {path} is missing")
        pytest.skip(f"shared data folder {path} is absent (set ITUNE_SHARED to point at it)")
    return path


@pytest.fixture(scope="session")
def builtin_tokenizer(tmp_path_factory):
    """A SentencePiece model trained on a small built-in corpus, shared by the tests."""
    from itune.data import chat, synthetic_tasks
    from itune.data.tokenizer import cached_sentencepiece

    return cached_sentencepiece(
        str(tmp_path_factory.mktemp("tok")),
        {"test": 1},
        lambda: synthetic_tasks.corpus(0, 2000),
        256,
        list(chat.CHATML.special_tokens),
    )
