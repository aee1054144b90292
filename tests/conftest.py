"""Shared fixtures: tiny real-architecture models on disk, and no network ever."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# Tests never download: make every hub lookup fail fast and locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Commands choose their torch threads (vpgtrans.threads); inside the suite that must stay the pinned one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The CLI pins torch's CPU kernels before torch loads (vpgtrans.threads); the suite pins them the same way
# before anything imports torch, so a run made in-process equals one made by the CLI in a subprocess.
from vpgtrans.threads import pin_cpu_numerics  # noqa: E402  (imports no torch)

assert pin_cpu_numerics(), "torch was imported before tests/conftest.py: in-process and CLI numerics would differ"
# Nothing a test does may touch the user's caches. Module- and session-scoped fixtures run before the
# per-test VPGTRANS_HOME below, so the whole session starts inside a throwaway root (removed at the end).
_SESSION_ROOT = tempfile.mkdtemp(prefix="vpgtrans-tests-")
for _var, _sub in (("VPGTRANS_HOME", "vpgtrans"), ("HF_HOME", "hf"), ("HF_HUB_CACHE", "hf/hub"),
                   ("XDG_CACHE_HOME", "xdg-cache"), ("MPLCONFIGDIR", "matplotlib")):
    os.environ[_var] = os.path.join(_SESSION_ROOT, _sub)


@pytest.fixture(scope="session", autouse=True)
def _session_root():
    """Remove the session's throwaway cache root when the run ends."""
    yield _SESSION_ROOT
    shutil.rmtree(_SESSION_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """Tiny OPT / OPT-m / LLaMA / T5 / BLIP-2 ViT / CLIP ViT / BERT checkpoints written with save_pretrained."""
    from vpgtrans.testing import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Each test gets its own VPGTRANS_HOME so caches never leak between tests."""
    monkeypatch.setenv("VPGTRANS_HOME", str(tmp_path / "vpgtrans-home"))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny matrices: one torch thread avoids spin-waiting on a busy 2-core machine (often 10x faster)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
