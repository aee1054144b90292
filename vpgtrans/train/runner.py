"""Run a stage-2 style recipe end to end: model, data + feature cache, Trainer, final model, run.json."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..checkpoint import atomic_write_text, library_versions, save_model
from ..errors import CheckpointError, ConfigError, VpgtransError
from .config import count_steps

RUN_FILE = "run.json"
_ARTIFACTS = (RUN_FILE, "checkpoints", "model", "log.jsonl", "tb")


def check_out_dir(out: Path, fingerprint: str, *, resume: str | None, force: bool) -> None:
    """Refuse to mix two runs in one directory unless resuming (same run) or forcing (start over)."""
    present = [name for name in _ARTIFACTS if (out / name).exists()]
    if not present:
        if resume == "latest":
            raise CheckpointError(f"nothing to resume in {out} (no run there)", "start without --resume")
        return
    previous = {}
    if (out / RUN_FILE).exists():
        try:
            previous = json.loads((out / RUN_FILE).read_text())
        except json.JSONDecodeError:
            previous = {}
    same = previous.get("fingerprint") == fingerprint
    if resume:
        if previous and not same and not force:
            raise CheckpointError(f"{out} holds a run with different settings (recipe {previous.get('recipe_name')})",
                                  "resume with the same recipe and overrides, or pass --force to resume anyway")
        return
    if force:
        for name in present:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        return
    what = "a run of this recipe" if same else f"a different run (recipe {previous.get('recipe_name', '?')})"
    raise ConfigError(f"{out} already holds {what}",
                      "pass --resume latest to continue it, --force to start over, or choose another --out")


def init_weights(model: Any, source: str) -> str:
    """Load VPG/projector weights from a vpgtrans model dir or a BLIP-2 stage-1 dir; say what was loaded."""
    from ..checkpoint import MANIFEST

    path = Path(source).expanduser()
    if (path / "stage1.json").exists():
        from ..blip2_stage1 import init_vpg_from_stage1

        keys = init_vpg_from_stage1(model.vpg, path)
        return f"VPG initialised from stage-1 checkpoint {path} ({len(keys)} tensors)"
    if (path / MANIFEST).exists():
        from ..init_report import init_from_model_dir

        return "\n".join(init_from_model_dir(model, path))
    raise CheckpointError(f"train.init_from {path} is neither a vpgtrans model dir nor a stage-1 dir",
                          "pass a directory written by `vpgtrans train` or by BLIP-2 stage 1")


def _plan_lines(recipe: Any, n_train: int, n_val: int, out: Path, processes: int = 1) -> list[str]:
    t, spec = recipe.train, recipe.model
    steps, per_epoch = count_steps(t, n_train, processes)
    global_batch = t.batch_size * processes * t.grad_accum
    epochs = steps * t.grad_accum / max(per_epoch, 1)
    llm = spec.llm.get("name") or "auto"
    lr = (f"cosine {t.lr:g} → {t.min_lr:g}" if t.schedule == "cosine" else f"constant {t.lr:g}")
    warm = f", warm-up {t.warmup_steps} steps from {t.warmup_lr:g}" if t.warmup_steps else ""
    return [
        f"recipe  {recipe.name}" + (f" ({recipe.source})" if recipe.source else ""),
        f"model   {spec.vision.get('name')}({spec.vision.get('path', '')}) → {spec.vpg.get('name')} → projector "
        f"→ {llm}({spec.llm.get('path', '')}); training {' + '.join(t.trainable)}",
        f"data    {recipe.data.train}: {n_train} examples" + (f"; val {n_val}" if recipe.data.val else ""),
        f"train   {steps} steps ≈ {epochs:.2f} epochs, global batch {global_batch} ({t.batch_size}/device × "
        f"{processes} × accum {t.grad_accum}), {lr}{warm}, wd {t.weight_decay:g}, seed {t.seed}",
        f"eval    {', '.join(recipe.eval.metrics) or 'none'} every {t.eval_every or 'end'}"
        + (f"; stop when {t.until}" if t.until else ""),
        f"save    every {t.save_every or 'end'} steps → {out}",
    ]


def _build_model(recipe: Any, device: Any, resume: str | None, echo: Callable[[str], None]) -> Any:
    """The recipe's model, seeded (fresh projector init is part of the run), trainable parts set, on device."""
    from accelerate.utils import set_seed

    from ..model import build_model

    set_seed(recipe.train.seed)
    model = build_model(recipe.model)
    model.set_trainable(vpg="vpg" in recipe.train.trainable, projector="projector" in recipe.train.trainable)
    if recipe.train.init_from and not resume:
        echo(init_weights(model, recipe.train.init_from))
    model.to(device)
    echo(model.describe_trainable())
    return model


def _write_run(out: Path, run: dict[str, Any]) -> None:
    atomic_write_text(out / RUN_FILE, json.dumps(run, indent=2, default=str))


def run_recipe(recipe: Any, out: str | Path, *, resume: str | None = None, force: bool = False,
               dry_run: bool = False, skip_bad: bool = False, progress: bool = True,
               echo: Callable[[str], None] = print, model: Any = None) -> dict[str, Any]:
    """Train the recipe's model into `out`; returns the run record (also `<out>/run.json`)."""
    if getattr(recipe, "stage", 2) == 1:
        from ..blip2_stage1_run import run_stage1_recipe

        return run_stage1_recipe(recipe, out, resume=resume, force=force, dry_run=dry_run, skip_bad=skip_bad,
                                 progress=progress, echo=echo)
    from ..data import BadSamples, build_dataset, load_records
    from ..registry import get as get_component
    from .objectives import EvalContext, lm_loss, make_eval_fn

    out = Path(out).expanduser()
    fingerprint = recipe.fingerprint()
    for kind in ("vision", "vpg", "llm"):
        name = getattr(recipe.model, kind).get("name")
        if name:
            get_component(kind, name)  # unknown names fail here, before anything is loaded
    bad = BadSamples(skip=skip_bad)
    train_records = load_records(recipe.data, "train", bad)
    val_records = load_records(recipe.data, "val", bad) if recipe.data.val else []
    bad_after_reading = len(bad)
    if bad:
        echo(f"warning: {bad.summary()}")
    if not dry_run:
        check_out_dir(out, fingerprint, resume=resume, force=force)
    for line in _plan_lines(recipe, len(train_records), len(val_records), out):
        echo(line)
    if dry_run:
        from ..memory import print_memory_plan

        print_memory_plan(recipe, len(train_records), echo)
        steps, _ = count_steps(recipe.train, len(train_records))
        return {"dry_run": True, "steps": steps, "train_examples": len(train_records)}
    if model is None:
        from ..memory import check_run_fits

        check_run_fits(recipe, len(train_records))

    from .trainer import Trainer, make_accelerator

    accelerator, note = make_accelerator(recipe.train.mixed_precision)
    if note:
        echo(f"note: {note}")
    if model is None:
        model = _build_model(recipe, accelerator.device, resume, echo)
    else:  # assembled by the caller (e.g. `vpgtrans transfer`): only choose what trains
        model.set_trainable(vpg="vpg" in recipe.train.trainable, projector="projector" in recipe.train.trainable)
        model.to(accelerator.device)
        echo(model.describe_trainable())
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    run: dict[str, Any] = {"format": "vpgtrans-run", "recipe_name": recipe.name, "recipe_path": recipe.source,
                           "fingerprint": fingerprint, "seed": recipe.train.seed, "recipe": recipe.raw,
                           "command": sys.argv, "versions": library_versions(), "started": started,
                           "status": "running"}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        previous = json.loads((out / RUN_FILE).read_text()) if resume and (out / RUN_FILE).exists() else {}
        run["started"] = previous.get("started", started)
        _write_run(out, run)
    with accelerator.main_process_first():
        train_set, report = build_dataset(train_records, model, recipe.data, seed=recipe.train.seed, bad=bad,
                                          progress=progress, device=accelerator.device)
        val_set = None
        if val_records:
            val_set, _ = build_dataset(val_records, model, recipe.data, seed=recipe.train.seed, bad=bad,
                                       progress=progress, device=accelerator.device)
    if report:
        echo(report.line())
    if len(bad) > bad_after_reading:
        echo(f"warning: {bad.summary()}")
    # Without validation data there is no val_loss to compute; other metrics may still bring their own data.
    metrics = [m for m in recipe.eval.metrics if val_set is not None or m != "val_loss"]
    ctx = EvalContext(records=val_set.records if val_set else [], dataset=val_set,
                      config=dataclasses.replace(recipe.eval, metrics=metrics), max_text_len=recipe.train.max_text_len)
    trainer = Trainer(model, lm_loss(recipe.train.max_text_len), train_set, recipe.train, out,
                      collate_fn=train_set.collate, eval_fn=make_eval_fn(ctx), accelerator=accelerator,
                      progress=progress, echo=echo, fingerprint=None if force else fingerprint)
    run.update(plan=trainer.plan(), data={"train_examples": len(train_set), "val_examples": len(val_records),
                                          "bad_samples": len(bad), "features": report.__dict__ if report else None})
    try:
        result = trainer.train(resume=resume)
    except VpgtransError as exc:
        run.update(status="failed", error=str(exc))
        if accelerator.is_main_process:
            _write_run(out, run)
        raise
    if accelerator.is_main_process:
        _save_final(trainer.unwrapped, out, recipe.name, fingerprint, result)
        run.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), results=result.to_dict(),
                   model_dir=str(out / "model"))
        _write_run(out, run)
    accelerator.wait_for_everyone()
    for line in _summary(result):
        echo(line)
    echo(f"model saved to {out / 'model'}")
    return run


def _save_final(model: Any, out: Path, recipe_name: str, fingerprint: str, result: Any) -> None:
    try:
        save_model(model, out / "model", extra={"training": {"recipe": recipe_name, "steps": result.steps,
                                                             "samples": result.samples, "fingerprint": fingerprint}})
    except OSError as exc:
        raise CheckpointError(f"could not write the final model to {out / 'model'} ({exc.strerror or exc})",
                              "free disk space, then rerun with --resume latest (training is checkpointed)") from None


def _summary(result: Any) -> list[str]:
    metrics = "".join(f", {k} {v:.4g}" for k, v in result.metrics.items())
    lines = [f"done: {result.steps} steps, {result.samples} samples, {result.wall_time:.1f}s "
             f"({result.steps_per_second} steps/s this session); final loss {result.final_loss:.4f}{metrics}"]
    until = result.until
    if until:
        when = (f"reached at step {until['step']} ({until['samples']} samples, {until['wall_time']}s)"
                if until["reached"] else "not reached")
        lines.append(f"until {until['target']}: {when}")
    return lines
