"""Shared fixtures: tiny real-architecture models on disk, and no network ever."""

from __future__ import annotations

import os

import pytest

# Tests never download: make every hub lookup fail fast and locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """Tiny OPT / OPT-m / LLaMA / T5 / BLIP-2 ViT / CLIP ViT / BERT checkpoints written with save_pretrained."""
    from vpgtrans.testing import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Each test gets its own VPGTRANS_HOME so caches never leak between tests."""
    monkeypatch.setenv("VPGTRANS_HOME", str(tmp_path / "vpgtrans-home"))
