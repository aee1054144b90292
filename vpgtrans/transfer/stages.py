"""The recipes of VPGTrans's stages and of its baseline: the warm-up, the fine-tuning, and scratch.

warm-up    the merged projector alone, at `warmup_lr_scale` x the recipe's LR (the paper: 5x), constant LR, no
           LR warm-up, for `warmup_epochs` epochs of the (fraction of the) training data;
fine-tune  VPG + projector (+ LoRA) with the recipe's own schedule;
scratch    a fresh VPG + projector on all the training data, as long as warm-up and fine-tuning together.

Each trains into a folder of the transfer's output named after it. Runs made before the stages had these
names wrote ``stage1/`` and ``stage2/``; `stage_folders` keeps using those, so such a run still resumes.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from ..recipes import Recipe, build_recipe
from ..surrogate import read_surrogate
from ..train.config import count_steps

WARMUP, FINETUNE, SCRATCH = "warmup", "finetune", "scratch"
STAGES = (WARMUP, FINETUNE)
# Folder names of runs made before the stages were named (issue 31): a run found under them resumes there.
LEGACY_FOLDERS = {WARMUP: "stage1", FINETUNE: "stage2"}
LABELS = {WARMUP: "warm-up", FINETUNE: "fine-tune", SCRATCH: "scratch"}


def stage_folders(out: Path) -> dict[str, str]:
    """Folder of each stage in `out`: the old stage1/stage2 of a run that was started under those names."""
    legacy = any((out / old).exists() for old in LEGACY_FOLDERS.values())
    new = any((out / name).exists() for name in STAGES)
    return {name: LEGACY_FOLDERS[name] if legacy and not new else name for name in STAGES} | {SCRATCH: SCRATCH}


def default_warmup_scale(src_llm: dict[str, Any], dst: str, recipe_scale: float | None = None
                         ) -> tuple[float, str | None]:
    """The warm-up LR multiplier when none is given: 1 (with the reason) for a surrogate of dst, else the recipe's
    `transfer.warmup_lr_scale`, else the paper's 5."""
    path = src_llm.get("path")
    origin = ((read_surrogate(path) if path else None) or {}).get("surrogate-of") or {}
    source = origin.get("source")
    if dst == origin.get("llm") or (source and Path(dst).expanduser().resolve() == Path(source).resolve()):
        # Measured (benchmarks/surrogate.py, K = 20, seed 0): 5x LR on the projector undid the graft (best val
        # 0.458, test 0.370 after 5 + 45 steps); 1x kept it (0.635, 0.565). With the identity converter the
        # projector already writes the destination's embedding space: there is nothing to re-align fast.
        return 1.0, "warm-up LR 1x the recipe's: the source LLM is a surrogate of the destination (same embeddings)"
    if recipe_scale is not None:
        return float(recipe_scale), f"warm-up LR {recipe_scale:g}x the recipe's (its transfer.warmup_lr_scale)"
    return 5.0, None


def _stage_raw(raw: dict[str, Any], name: str, **train: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    out["name"] = f"{raw.get('name', 'transfer')}-{name}"
    out.setdefault("train", {}).update(train)
    return out


def warmup_recipe(raw: dict[str, Any], base: Recipe, folder: str, *, lr_scale: float, epochs: float,
                  batch_size: int | None = None) -> Recipe:
    """The warm-up: only the projector, constant LR `lr_scale` x the recipe's, for `epochs` epochs of `batch_size`
    (default the recipe's) batches."""
    t = base.train
    batch = batch_size or t.batch_size
    # Evaluations, logs and checkpoints land after the same numbers of samples as with the recipe's batch.
    every = {k: max(1, round(getattr(t, k) * t.batch_size / batch)) if getattr(t, k) else getattr(t, k)
             for k in ("eval_every", "log_every", "save_every")}
    # The recipe is named after its folder: a run started as stage1/ keeps its name (and fingerprint) on resume.
    return build_recipe(_stage_raw(raw, folder, lr=t.lr * lr_scale, schedule="constant", warmup_steps=0,
                                   trainable=["projector"], epochs=epochs, max_steps=None, until=None,
                                   batch_size=batch, **every),
                        name=folder, source=base.source)


def same_samples_steps(epochs: float, n_train: int, base: Recipe, stage: Recipe) -> int:
    """Steps of `stage` that see the samples of `epochs` epochs of `base` on `n_train` examples (at least one)."""
    per_epoch = (n_train // base.train.batch_size) * base.train.batch_size
    return max(1, int(epochs * per_epoch // (stage.train.batch_size * stage.train.grad_accum)))


def in_batches(steps: int | None, stage: Recipe, other: Recipe) -> int:
    """`steps` of `stage` counted in `other`'s batches (the samples they see, rounded up)."""
    if not steps:
        return 0
    b, ob = stage.train.batch_size * stage.train.grad_accum, other.train.batch_size * other.train.grad_accum
    return steps if b == ob else -(-steps * b // ob)


def finetune_recipe(raw: dict[str, Any], base: Recipe, folder: str, *, until: str | None) -> Recipe:
    """The fine-tuning: VPG + projector with the recipe's schedule, stopping at `until` when given."""
    return build_recipe(_stage_raw(raw, folder, trainable=["vpg", "projector"], until=until), name=folder,
                        source=base.source)


def scratch_recipe(raw: dict[str, Any], base: Recipe, steps: int) -> Recipe:
    """The baseline: a fresh VPG + projector for `steps` steps on all the training data."""
    scratch_raw = _stage_raw(raw, SCRATCH, trainable=["vpg", "projector"], max_steps=steps, until=None)
    scratch_raw.setdefault("data", {})["fraction"] = 1.0  # the paper's baseline sees all the training data
    return build_recipe(scratch_raw, name=SCRATCH, source=base.source)


def pin_warmup_steps(recipe: Recipe, steps: int, n_train: int) -> Recipe:
    """The warm-up recipe set to exactly `steps` steps on `n_train` examples (count_steps floors epochs)."""
    # count_steps divides an epoch's micro-batches by grad_accum: an optimizer step takes grad_accum of them.
    epochs = (steps + 0.5) * recipe.train.grad_accum / (n_train // recipe.train.batch_size)
    return with_train(recipe, epochs=epochs)


def warmup_length(recipe: Recipe, n_train: int) -> int:
    """Steps the warm-up recipe trains on `n_train` examples."""
    return count_steps(recipe.train, n_train)[0]


def with_train(recipe: Recipe, **train: Any) -> Recipe:
    """A copy of `recipe` whose train section has `train` changed (the recipe's raw dict is left as it was)."""
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, **train))
