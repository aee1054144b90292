"""Run BLIP-2 stage 1 from a recipe: frozen vision features (cached) → Q-Former with ITC + ITM + ITG.

The recipe is the usual one (``model.vision``, ``model.vpg``, ``data``, ``train``, ``eval``); its
``model.llm`` is ignored. The result is ``<out>/stage1`` (stage1.safetensors + stage1.json), which a
stage-2 recipe consumes with ``train.init_from: <out>/stage1``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from .blip2_stage1 import Stage1Model, init_vpg_from_stage1, save_stage1
from .checkpoint import atomic_write_text, library_versions
from .errors import ConfigError, VpgtransError
from .model import Template


@torch.no_grad()
def stage1_metrics(model: Stage1Model, dataset: Any, max_samples: int = 256, batch_size: int = 64,
                   encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Validation ITC/ITM/ITG losses and image↔text recall@1 over the first max_samples examples.

    `encode` turns pixel batches into features when the dataset has no feature cache.
    """
    n = min(len(dataset), max_samples)
    device = model.temp.device
    sums: dict[str, float] = {}
    feats, caps = [], []
    for start in range(0, n, batch_size):
        batch = dataset.collate([dataset[i] for i in range(start, min(n, start + batch_size))])
        features = batch["features"] if "features" in batch else encode(batch["pixels"].to(device))
        features = features.to(device)
        captions = [s.target for s in batch["samples"]]
        for key, value in model.losses(features, captions).items():
            sums[key] = sums.get(key, 0.0) + float(value) * len(captions)
        feats.append(features)
        caps += captions
    out = {f"val_{k}": v / max(n, 1) for k, v in sums.items()}
    if feats:
        out.update(model.retrieval_recall(torch.cat(feats), caps, batch_size=batch_size))
    return out


def _captions(batch: dict[str, Any]) -> list[str]:
    return [s.target for s in batch["samples"]]


def run_stage1_recipe(recipe: Any, out: str | Path, *, resume: str | None = None, force: bool = False,
                      dry_run: bool = False, skip_bad: bool = False, progress: bool = True,
                      echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a stage-1 Q-Former into `out` (same arguments and run.json as the stage-2 runner)."""
    from accelerate.utils import set_seed

    from .data import BadSamples, build_dataset, load_records
    from .registry import get as get_component
    from .train.config import count_steps
    from .train.runner import RUN_FILE, check_out_dir, mark_failed
    from .train.trainer import Trainer, make_accelerator

    if recipe.data.task == "vqa":
        raise ConfigError("BLIP-2 stage 1 trains on image-caption pairs, not VQA", "set data.task=caption")
    out = Path(out).expanduser()
    fingerprint = recipe.fingerprint()
    vname, vcfg = recipe.model.part("vision")
    gname, gcfg = recipe.model.part("vpg")
    get_component("vision", vname)  # unknown names fail here, before anything is loaded
    get_component("vpg", gname)
    bad = BadSamples(skip=skip_bad)
    train_records = load_records(recipe.data, "train", bad)
    val_records = load_records(recipe.data, "val", bad) if recipe.data.val else []
    if not dry_run:
        resume = check_out_dir(out, fingerprint, resume=resume, force=force, echo=echo)
    t = recipe.train
    steps, _ = count_steps(t, len(train_records))
    for line in (f"recipe  {recipe.name} (BLIP-2 stage 1: ITC + ITM + ITG, no LLM)",
                 f"model   {vname}({vcfg.get('path', '')}) → {gname} with text input; training the Q-Former",
                 f"data    {recipe.data.train}: {len(train_records)} examples; val {len(val_records)}",
                 f"train   {steps} steps, batch {t.batch_size} × accum {t.grad_accum}, lr {t.lr:g} ({t.schedule}), "
                 f"warm-up {t.warmup_steps}, wd {t.weight_decay:g}, seed {t.seed}",
                 f"save    every {t.save_every or 'end'} steps → {out / 'stage1'}"):
        echo(line)
    if dry_run:
        return {"dry_run": True, "steps": steps, "train_examples": len(train_records)}

    accelerator, note = make_accelerator(t.mixed_precision)
    if note:
        echo(f"note: {note}")
    set_seed(t.seed)
    vision = get_component("vision", vname).component.build(vcfg).to(accelerator.device).eval()
    model = Stage1Model({"name": gname, **gcfg}, vision_width=vision.hidden_size, max_text_len=t.max_text_len)
    if t.init_from and not resume:
        echo(f"Q-Former initialised from {t.init_from} ({len(init_vpg_from_stage1(model.vpg, t.init_from))} tensors)")
    model.to(accelerator.device)
    shim = SimpleNamespace(template=Template(), vision=vision, llm=SimpleNamespace(is_encoder_decoder=False))
    with accelerator.main_process_first():
        train_set, report = build_dataset(train_records, shim, recipe.data, seed=t.seed, bad=bad, progress=progress,
                                          device=accelerator.device)
        val_set = (build_dataset(val_records, shim, recipe.data, seed=t.seed, bad=bad, progress=progress,
                                 device=accelerator.device)[0] if val_records else None)
    if report:
        echo(report.line())

    def loss_fn(module: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        features = batch["features"] if "features" in batch else vision(batch["pixels"])
        return module(features, _captions(batch))

    def eval_fn(module: Any) -> dict[str, float]:
        return stage1_metrics(module, val_set, recipe.eval.max_samples, recipe.eval.batch_size, vision)

    trainer = Trainer(model, loss_fn, train_set, t, out, collate_fn=train_set.collate,
                      eval_fn=eval_fn if val_set is not None else None, accelerator=accelerator,
                      progress=progress, echo=echo, fingerprint=None if force else fingerprint)
    run: dict[str, Any] = {"format": "vpgtrans-run", "stage": 1, "recipe_name": recipe.name,
                           "recipe_path": recipe.source, "fingerprint": fingerprint, "seed": t.seed,
                           "recipe": recipe.raw, "command": sys.argv, "versions": library_versions(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": "running",
                           "plan": trainer.plan()}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / RUN_FILE, json.dumps(run, indent=2, default=str))
    try:
        result = trainer.train(resume=resume)
        if accelerator.is_main_process:
            save_stage1(trainer.unwrapped, out / "stage1")
    except (VpgtransError, OSError, KeyboardInterrupt) as exc:
        if accelerator.is_main_process:
            mark_failed(out, run, exc, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        raise
    if accelerator.is_main_process:
        run.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), results=result.to_dict(),
                   stage1_dir=str(out / "stage1"))
        atomic_write_text(out / RUN_FILE, json.dumps(run, indent=2, default=str))
    accelerator.wait_for_everyone()
    echo(f"done: {result.steps} steps, {result.wall_time:.1f}s; final loss {result.final_loss:.4f}"
         + "".join(f", {k} {v:.4g}" for k, v in result.metrics.items()))
    echo(f"stage-1 Q-Former saved to {out / 'stage1'} (use it as train.init_from of a stage-2 recipe)")
    return run
