"""Stage-2 objective (LM loss after the soft prompts) and pluggable evaluation metrics.

Metrics are looked up by name: built-in `val_loss`, anything added with `register_metric`, and
anything `vpgtrans.evaluation` exposes in a ``TRAINING_METRICS`` dict (name → fn(model, ctx)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..config import help_field
from ..errors import ConfigError


@dataclass
class EvalConfig:
    """What to measure during and after training (the `eval:` section of a recipe)."""

    metrics: list = help_field(["val_loss"], help="metric names: val_loss, or caption/VQA metrics such as cider")
    max_samples: int = help_field(256, help="validation examples used per evaluation")
    batch_size: int = help_field(16, help="validation batch size")
    prompt: str | None = help_field(None, help="prompt for generation metrics (default: data.prompt)")
    max_new_tokens: int = help_field(30, help="generation length for generation metrics")
    num_beams: int = help_field(1, help="beam width for generation metrics")
    stop: list = help_field([], help="generated text is cut at the first of these strings (lmms-eval's `until`), "
                                     "e.g. ['\\n'] for one-word answers")


@dataclass
class EvalContext:
    """Everything a metric may need: the validation records and dataset, the eval and train settings."""

    records: Sequence[dict[str, Any]]
    dataset: Any
    config: EvalConfig
    max_text_len: int = 64


MetricFn = Callable[[nn.Module, EvalContext], dict[str, float]]


def _unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def lm_loss(max_text_len: int) -> Callable[[nn.Module, dict[str, Any]], torch.Tensor]:
    """loss_fn for VisionLanguageModel batches from `Collate` (features, or pixels encoded on the fly)."""

    def loss_fn(module: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        model = _unwrap(module)
        features = batch.get("features")
        if features is None:
            features = model.encode_images(batch["pixels"])
        instructions = batch["instructions"] if model.vpg.uses_instruction else None
        return module(features, batch["samples"], instructions, max_text_len=max_text_len)

    return loss_fn


def val_loss(model: nn.Module, ctx: EvalContext) -> dict[str, float]:
    """Mean LM loss over the first `max_samples` validation examples (fixed order, fixed draws)."""
    if ctx.dataset is None:
        raise ConfigError("metric val_loss needs validation data", "set data.val in the recipe")
    loss_fn = lm_loss(ctx.max_text_len)
    n = min(len(ctx.dataset), ctx.config.max_samples)
    device = next(p for p in model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, n, ctx.config.batch_size):
        items = [ctx.dataset[i] for i in range(start, min(n, start + ctx.config.batch_size))]
        batch = ctx.dataset.collate(items)
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        total += float(loss_fn(model, batch)) * len(items)
        count += len(items)
    return {"val_loss": total / max(count, 1)}


_METRICS: dict[str, MetricFn] = {"val_loss": val_loss}


def register_metric(name: str, fn: MetricFn) -> None:
    """Make `fn(model, ctx) -> {name: value}` available as eval metric `name`."""
    _METRICS[name] = fn


def get_metric(name: str) -> MetricFn:
    """Find a metric by name (built-ins, registered, then vpgtrans.evaluation.TRAINING_METRICS)."""
    if name in _METRICS:
        return _METRICS[name]
    try:
        # why local: needed only for metrics that are not built in (evaluation pulls in the data readers)
        from .. import evaluation  # type: ignore[attr-defined]

        extra = dict(getattr(evaluation, "TRAINING_METRICS", {}))
    except ImportError:
        extra = {}
    if name in extra:
        return extra[name]
    known = sorted(set(_METRICS) | set(extra))
    raise ConfigError(f"unknown eval metric '{name}'", f"use one of: {', '.join(known)}")


def make_eval_fn(ctx: EvalContext) -> Callable[[nn.Module], dict[str, float]] | None:
    """An eval callback computing every configured metric, or None when there is nothing to measure."""
    fns = [get_metric(name) for name in ctx.config.metrics]
    if not fns:
        return None

    def eval_fn(model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        for fn in fns:
            out.update(fn(model, ctx))
        return out

    return eval_fn
