"""Training hyper-parameters (the `train:` section of a recipe) and `--until` targets."""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Callable

from ..config import help_field
from ..errors import ConfigError

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Optimiser, schedule, batch, length, checkpointing and logging of one training run."""

    lr: float = help_field(1e-4, help="peak learning rate")
    min_lr: float = help_field(1e-5, help="cosine schedule: final learning rate")
    warmup_lr: float = help_field(1e-6, help="learning rate at step 0 of the linear warm-up")
    warmup_steps: int = help_field(0, help="linear warm-up steps (0 = none)")
    schedule: str = help_field("cosine", help="cosine (linear warm-up, cosine to min_lr) or constant")
    weight_decay: float = help_field(0.05, help="AdamW weight decay (never on biases, norms, query tokens, embeddings)")
    betas: list = help_field([0.9, 0.999], help="AdamW betas")
    eps: float = help_field(1e-8, help="AdamW epsilon")
    grad_clip: float | None = help_field(None, help="clip the gradient norm to this value (None = off)")
    batch_size: int = help_field(8, help="examples per device per micro-batch")
    grad_accum: int = help_field(1, help="micro-batches per optimiser step")
    max_steps: int | None = help_field(None, help="optimiser steps to train (overrides epochs)")
    epochs: float | None = help_field(None, help="passes over the data when max_steps is not set (default 1)")
    eval_every: int = help_field(0, help="evaluate every N steps (0 = only at the end)")
    save_every: int = help_field(0, help="checkpoint every N steps (0 = only at the end)")
    log_every: int = help_field(1, help="write a log line every N steps")
    keep_checkpoints: int = help_field(2, help="how many step checkpoints to keep (latest always kept)")
    seed: int = help_field(42, help="seed of weights init, data order and dropout")
    max_text_len: int = help_field(64, help="longest target in tokens")
    itm_share: float = help_field(1.0, help="BLIP-2 stage 1: share of each batch the ITM loss is computed on (its "
                                            "positives, with hard negatives drawn among them); 1 = all, as BLIP-2")
    mixed_precision: str = help_field("no", help="no, fp16 or bf16 (fp16 needs a GPU; CPU falls back to fp32)")
    num_workers: int = help_field(0, help="DataLoader worker processes")
    gradient_checkpointing: bool = help_field(False, help="recompute the frozen LLM's layers in the backward pass: "
                                                          "less activation memory, ~1/3 more compute")
    trainable: list = help_field(["vpg", "projector"], help="parts that train: vpg and/or projector")
    init_from: str | None = help_field(None, help="initialise from a vpgtrans model dir or a BLIP-2 stage-1 dir")
    until: str | None = help_field(None, help="stop when a metric reaches a target, e.g. 'val_loss<=2.5'")

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule '{self.schedule}' is unknown", f"use one of: {', '.join(SCHEDULES)}")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"train.mixed_precision '{self.mixed_precision}' is unknown",
                              f"use one of: {', '.join(PRECISIONS)}")
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}",
                                  f"set train.{name}=1 or more")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1, got {self.max_steps}", "set a positive number of steps")
        self._check_ranges()
        unknown = sorted(set(self.trainable) - {"vpg", "projector"})
        if unknown or not self.trainable:
            raise ConfigError(f"train.trainable {self.trainable} is invalid", "use [vpg, projector] or [projector]")
        if self.until:
            parse_until(self.until)

    def _check_ranges(self) -> None:
        """Every number finite and in its range, before anything is written (one line naming the key)."""
        def bad(name: str, rule: str, example: str) -> ConfigError:
            return ConfigError(f"train.{name} must be {rule}, got {getattr(self, name)!r}",
                               f"e.g. train.{name}={example}")

        finite = {"lr": self.lr, "min_lr": self.min_lr, "warmup_lr": self.warmup_lr, "weight_decay": self.weight_decay,
                  "eps": self.eps, "grad_clip": self.grad_clip, "epochs": self.epochs}
        for name, value in finite.items():
            if value is not None and not math.isfinite(value):
                raise bad(name, "a finite number", {"lr": "1e-4", "epochs": "1"}.get(name, "0.05"))
        for name, example in (("lr", "1e-4"), ("eps", "1e-8"), ("epochs", "1"), ("grad_clip", "1.0")):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise bad(name, "positive", example)
        for name in ("min_lr", "warmup_lr", "weight_decay", "warmup_steps", "eval_every", "save_every",
                     "keep_checkpoints", "num_workers"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0", "0")
        if self.max_text_len < 1:
            raise bad("max_text_len", ">= 1", "64")
        if not 0 < self.itm_share <= 1:
            raise bad("itm_share", "in (0, 1]", "1")
        if not 0 <= self.seed < 2 ** 32:
            raise bad("seed", "in [0, 2**32)", "42")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                           for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}",
                              "e.g. train.betas=[0.9,0.999]")


def count_steps(config: TrainConfig, n_examples: int, processes: int = 1) -> tuple[int, int]:
    """(total optimiser steps, micro-batches per epoch) for a dataset size."""
    per_epoch = n_examples // (config.batch_size * processes)
    if config.max_steps:
        return config.max_steps, per_epoch
    epochs = config.epochs if config.epochs is not None else 1.0
    return max(1, int(epochs * per_epoch // config.grad_accum)), per_epoch


_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, ">": operator.gt,
                                                    "<": operator.lt}


@dataclass(frozen=True)
class Until:
    """A stop condition `metric OP value`."""

    metric: str
    op: str
    value: float

    def reached(self, metrics: dict[str, float]) -> bool:
        """True when `metrics` holds the metric and it meets the target."""
        v = metrics.get(self.metric)
        return v is not None and _OPS[self.op](float(v), self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_until(text: str) -> Until:
    """Parse 'cider>=0.8' / 'val_loss<=2.1'."""
    m = re.fullmatch(r"\s*([A-Za-z_][\w./-]*)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*", text)
    if not m:
        raise ConfigError(f"--until '{text}' is not of the form METRIC>=VALUE", "e.g. --until 'val_loss<=2.5'")
    return Until(m.group(1), m.group(2), float(m.group(3)))
