"""`train.init_from` a vpgtrans model directory: load what fits, and say exactly what was loaded and skipped.

A tensor of another shape (a projector made for another LLM's width) is skipped, never forced; when a part
that trains is skipped the report says so in capitals, and when nothing that trains could be loaded the
run is refused (it would train from random init while claiming to fine-tune).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .checkpoint import WEIGHTS, read_safetensors
from .errors import CheckpointError

PARTS = ("vpg", "projector", "llm")


def _part(key: str) -> str:
    return key.split(".", 1)[0]


def _counts(keys: list[str]) -> str:
    c = Counter(_part(k) for k in keys)
    return ", ".join(f"{p} {c[p]}" for p in PARTS if c[p])


def trainable_parts(model: Any) -> list[str]:
    """The parts (vpg, projector, llm LoRA) with at least one parameter that trains."""
    return [p for p in PARTS if any(q.requires_grad for q in getattr(model, p).parameters())]


def init_from_model_dir(model: Any, path: Path) -> list[str]:
    """Copy every fitting VPG/projector/LoRA tensor of `path` into `model`; report lines (refuse if nothing trains)."""
    state = read_safetensors(path / WEIGHTS, "model weights")
    expected = model.trainable_state_dict()
    shared = sorted(set(state) & set(expected))
    wrong = [k for k in shared if tuple(state[k].shape) != tuple(expected[k].shape)]
    loaded = [k for k in shared if k not in wrong]
    absent = sorted(set(expected) - set(state))
    if not shared:
        raise CheckpointError(f"{path} shares no weights with this model", "check train.init_from")
    training = trainable_parts(model)
    untouched = [p for p in training if not any(_part(k) == p for k in loaded)]
    if training and untouched == training:
        detail = "; ".join(f"{k} {list(state[k].shape)} there, {list(expected[k].shape)} here" for k in wrong[:2])
        raise CheckpointError(
            f"train.init_from {path}: nothing that trains here ({' + '.join(training)}) fits this model"
            + (f" ({detail})" if detail else f" ({len(absent)} tensors absent from it)"),
            "it was made for another LLM: move a VPG between LLMs with `vpgtrans transfer`, or train without "
            "init_from")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for key in loaded:
            target = params.get(key, buffers.get(key))
            if target is not None:
                target.copy_(state[key].to(target.dtype))
    lines = [f"init_from {path}: loaded {len(loaded)}/{len(expected)} tensors ({_counts(loaded)})"]
    for key in wrong:
        lines.append(f"  skipped {key}: shape {list(state[key].shape)} in the checkpoint, {list(expected[key].shape)} "
                     "here (made for another model); it keeps its fresh init")
    if absent:
        lines.append(f"  not in the checkpoint: {len(absent)} tensors ({_counts(absent)}); they keep their fresh init")
    for part in training:
        skipped = [k for k in wrong + absent if _part(k) == part]
        if skipped:
            lines.append(f"WARNING: the {part}, which trains, was NOT (fully) initialised from {path}: "
                         f"{len(skipped)} tensors skipped; it starts from its fresh init")
    return lines
