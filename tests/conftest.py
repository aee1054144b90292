"""Shared fixtures: tiny real-architecture models on disk, and no network ever."""

from __future__ import annotations

import os

import pytest

# Tests never download: make every hub lookup fail fast and locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Commands choose their torch threads (vpgtrans.threads); inside the suite that must stay the pinned one.
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
