"""Run a recipe end to end: model, data + feature cache, Trainer, final model, run.json.

The recipe's `stage` picks the objective: 2 (default) trains VPG + projector with the LM loss on a frozen LLM
(`objectives.lm_loss`); 1 is BLIP-2 stage 1, the Q-Former alone with ITC + ITM + ITG (`stage1.Stage1Model`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from ..checkpoint import MANIFEST, atomic_write_text, library_versions, save_model
from ..claim import check_writable, claim_dir
from ..data import BadSamples, build_dataset, load_records
from ..errors import CheckpointError, ConfigError, VpgtransError, write_error
from ..init_report import init_from_model_dir
from ..memory import check_run_fits, print_memory_plan
from ..model import Template, build_model
from ..registry import get as get_component
from .config import count_steps
from .objectives import EvalContext, lm_loss, make_eval_fn
from .stage1 import Stage1Model, init_vpg_from_stage1, save_stage1, stage1_metrics
from .state import clean_partial, find_checkpoint
from .trainer import Trainer, make_accelerator

RUN_FILE = "run.json"
_ARTIFACTS = (RUN_FILE, "checkpoints", "model", "stage1", "log.jsonl", "tb")


def _read_run(out: Path) -> dict[str, Any]:
    try:
        previous = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return previous if isinstance(previous, dict) else {}


def _still_running(previous: dict[str, Any]) -> bool:
    """True when run.json says a process on this machine is training into the same directory right now."""
    import os
    import socket

    pid = previous.get("pid")
    if previous.get("status") != "running" or not isinstance(pid, int) or pid == os.getpid():
        return False
    if previous.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def check_out_dir(out: Path, fingerprint: str, *, resume: str | None, force: bool,
                  echo: Callable[[str], None] | None = None) -> str | None:
    """Refuse to mix two runs in one directory unless resuming (same run) or forcing (start over).

    Returns the `resume` to use: a run that failed or was killed before its first checkpoint has nothing
    to resume, so a plain rerun (or `--resume latest`) starts it over instead of refusing.
    """
    import os

    checkpoints = any((p / "state.json").is_file() for p in (out / "checkpoints").glob("step-*"))
    if int(os.environ.get("RANK", "0") or 0) != 0:
        # Rank 0 alone refuses, cleans up and writes; the others follow what its decision leaves on disk.
        return None if resume == "latest" and not checkpoints else resume
    check_writable(out)
    present = [name for name in _ARTIFACTS if (out / name).exists()]
    if not present:
        others = sorted(p.name for p in out.iterdir() if not _leftover(p.name)) if out.is_dir() else []
        if others and not force:
            raise ConfigError(f"{out} is not empty ({', '.join(others[:3])}{', …' if len(others) > 3 else ''}) and "
                              "holds no vpgtrans run", "choose another --out, or pass --force to write into it "
                              "(its files are kept)")
        if resume == "latest":
            raise CheckpointError(f"nothing to resume in {out} (no run there)", "start without --resume")
        return _resumable(out, resume)
    previous = _read_run(out)
    if _still_running(previous) and not force:
        raise ConfigError(f"{out} is being written by a run in progress (pid {previous['pid']})",
                          "wait for it, stop it, or choose another --out")
    same = previous.get("fingerprint") == fingerprint
    if not checkpoints and not (out / "model").exists() and not (out / "stage1").exists() \
            and resume in (None, "latest"):
        status = previous.get("status", "no run.json")
        (echo or print)(f"note: the run in {out} stopped before its first checkpoint ({status}); starting over")
        _remove(out, present)
        return None
    if resume:
        if previous and not same and not force:
            raise CheckpointError(f"{out} holds a run with different settings (recipe {previous.get('recipe_name')})",
                                  "resume with the same recipe and overrides, or pass --force to resume anyway")
        return _resumable(out, resume)
    if force:
        _remove(out, present)
        return None
    what = "a run of this recipe" if same else f"a different run (recipe {previous.get('recipe_name', '?')})"
    raise ConfigError(f"{out} already holds {what}",
                      "pass --resume latest to continue it, --force to start over, or choose another --out")


def _leftover(name: str) -> bool:
    """Temp files a killed run left (clean_partial removes them) and claims of runs nested in `out`."""
    from ..claim import SUFFIX

    return name.endswith(SUFFIX) or name.startswith((".run.json.", ".log.jsonl.", ".model.", ".stage1."))


def _resumable(out: Path, resume: str | None) -> str | None:
    """`resume` once it names a complete checkpoint; refused here, before run.json or anything else is written."""
    # The trainer resolves it again after the model is built; finding out only then left a run.json in a fresh
    # --out (`--resume /etc`) and rewrote a finished run's record as failed.
    if resume:
        find_checkpoint(out, resume)
    return resume


def _remove(out: Path, names: list[str]) -> None:
    for name in names:
        target = out / name
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)


def init_weights(model: Any, source: str) -> str:
    """Load VPG/projector weights from a vpgtrans model dir or a BLIP-2 stage-1 dir; say what was loaded."""
    path = Path(source).expanduser()
    if (path / "stage1.json").exists():
        keys = init_vpg_from_stage1(model.vpg, path)
        return f"VPG initialised from stage-1 checkpoint {path} ({len(keys)} tensors)"
    if (path / MANIFEST).exists():
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
    from accelerate.utils import set_seed  # why: importing accelerate costs ~1 s; `--dry-run` never needs it

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


def mark_failed(out: Path, run: dict[str, Any], error: BaseException, status: str = "failed") -> None:
    """Record the failure in run.json, best effort: on a full disk the atomic write may fail, so overwrite."""
    run.update(status=status, error=str(error) or type(error).__name__)
    text = json.dumps(run, indent=2, default=str)
    try:
        atomic_write_text(out / RUN_FILE, text)
    except OSError:
        try:
            (out / RUN_FILE).write_text(text)
        except OSError:
            pass


def run_recipe(recipe: Any, out: str | Path, *, resume: str | None = None, force: bool = False,
               dry_run: bool = False, skip_bad: bool = False, progress: bool = True,
               echo: Callable[[str], None] = print, model: Any = None) -> dict[str, Any]:
    """Train the recipe's model into `out`; returns the run record (also `<out>/run.json`)."""
    if getattr(recipe, "stage", 2) == 1:
        return run_stage1_recipe(recipe, out, resume=resume, force=force, dry_run=dry_run, skip_bad=skip_bad,
                                 progress=progress, echo=echo)
    with _claim(out, dry_run, echo):
        return _run_stage2(recipe, Path(out).expanduser(), resume=resume, force=force, dry_run=dry_run,
                           skip_bad=skip_bad, progress=progress, echo=echo, model=model)


def _claim(out: str | Path, dry_run: bool, echo: Callable[[str], None]) -> Any:
    """The claim on `out`, taken before anything is read: two runs started together cannot both pass."""
    return contextlib.nullcontext() if dry_run else claim_dir(out, echo=echo)


def _run_stage2(recipe: Any, out: Path, *, resume: str | None, force: bool, dry_run: bool, skip_bad: bool,
                progress: bool, echo: Callable[[str], None], model: Any) -> dict[str, Any]:
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
        resume = check_out_dir(out, fingerprint, resume=resume, force=force, echo=echo)
    for line in _plan_lines(recipe, len(train_records), len(val_records), out):
        echo(line)
    if dry_run:
        print_memory_plan(recipe, len(train_records), echo)
        steps, _ = count_steps(recipe.train, len(train_records))
        return {"dry_run": True, "steps": steps, "train_examples": len(train_records)}
    if model is None:
        check_run_fits(recipe, len(train_records))

    accelerator, note = make_accelerator(recipe.train.mixed_precision)
    if note:
        echo(f"note: {note}")
    if model is None:
        model = _build_model(recipe, accelerator.device, resume, echo)
    else:  # assembled by the caller (e.g. `vpgtrans transfer`): only choose what trains
        model.set_trainable(vpg="vpg" in recipe.train.trainable, projector="projector" in recipe.train.trainable)
        model.to(accelerator.device)
        echo(model.describe_trainable())
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
    # Inputs are valid (records read, images decoded, model built): only now does anything go into --out.
    run = _start_run(out, recipe, fingerprint, resume, accelerator.is_main_process)
    run.update(plan=trainer.plan(), data={"train_examples": len(train_set), "val_examples": len(val_records),
                                          "bad_samples": len(bad), "features": report.__dict__ if report else None})
    result = _train_recorded(trainer, resume, out, run, accelerator.is_main_process,
                             lambda model, res: _save_final(model, out, recipe.name, fingerprint, res),
                             model_dir=str(out / "model"))
    accelerator.wait_for_everyone()
    for line in _summary(result):
        echo(line)
    echo(f"model saved to {out / 'model'}")
    return run


def _train_recorded(trainer: Any, resume: str | None, out: Path, run: dict[str, Any], main: bool,
                    save: Callable[[Any, Any], None], **finished: Any) -> Any:
    """Train and save (main process), recording the outcome in run.json: failed, interrupted or finished."""
    try:
        result = trainer.train(resume=resume)
        if main:
            save(trainer.unwrapped, result)
    except (VpgtransError, OSError, KeyboardInterrupt) as exc:
        if main:
            mark_failed(out, run, exc, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        raise
    if main:
        run.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), results=result.to_dict(),
                   **finished)
        _write_run(out, run)
    return result


def _start_run(out: Path, recipe: Any, fingerprint: str, resume: str | None, main: bool,
               **extra: Any) -> dict[str, Any]:
    """Create `out`, clear temp files of killed runs, and write run.json with status "running" (both stages)."""
    import os
    import socket

    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    run: dict[str, Any] = {"format": "vpgtrans-run", "recipe_name": recipe.name, "recipe_path": recipe.source,
                           "fingerprint": fingerprint, "seed": recipe.train.seed, "recipe": recipe.raw,
                           "command": sys.argv, "versions": library_versions(), "started": started,
                           "status": "running", "pid": os.getpid(), "host": socket.gethostname(), **extra}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        clean_partial(out)
        run["started"] = (_read_run(out).get("started") if resume else None) or started
        _write_run(out, run)
    return run


def _save_final(model: Any, out: Path, recipe_name: str, fingerprint: str, result: Any) -> None:
    try:
        save_model(model, out / "model", extra={"training": {"recipe": recipe_name, "steps": result.steps,
                                                             "samples": result.samples, "fingerprint": fingerprint}})
    except OSError as exc:
        raise write_error(exc, f"the final model to {out / 'model'}",  # type: ignore[misc]
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


# ---------------------------------------------------------------------------------------------- stage 1
def _captions(batch: dict[str, Any]) -> list[str]:
    return [s.target for s in batch["samples"]]


def run_stage1_recipe(recipe: Any, out: str | Path, *, resume: str | None = None, force: bool = False,
                      dry_run: bool = False, skip_bad: bool = False, progress: bool = True,
                      echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a stage-1 Q-Former into `out` (same arguments, claim and run.json as the stage-2 runner)."""
    if recipe.data.task == "vqa":
        raise ConfigError("BLIP-2 stage 1 trains on image-caption pairs, not VQA", "set data.task=caption")
    with _claim(out, dry_run, echo):
        return _run_stage1(recipe, Path(out).expanduser(), resume=resume, force=force, dry_run=dry_run,
                           skip_bad=skip_bad, progress=progress, echo=echo)


def _run_stage1(recipe: Any, out: Path, *, resume: str | None, force: bool, dry_run: bool, skip_bad: bool,
                progress: bool, echo: Callable[[str], None]) -> dict[str, Any]:
    from accelerate.utils import set_seed  # why: as in _build_model

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
    model = Stage1Model({"name": gname, **gcfg}, vision_width=vision.hidden_size, max_text_len=t.max_text_len,
                        itm_share=t.itm_share)
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
    run = _start_run(out, recipe, fingerprint, resume, accelerator.is_main_process, stage=1, plan=trainer.plan())
    result = _train_recorded(trainer, resume, out, run, accelerator.is_main_process,
                             lambda model, _: save_stage1(model, out / "stage1"), stage1_dir=str(out / "stage1"))
    accelerator.wait_for_everyone()
    echo(f"done: {result.steps} steps, {result.wall_time:.1f}s; final loss {result.final_loss:.4f}"
         + "".join(f", {k} {v:.4g}" for k, v in result.metrics.items()))
    echo(f"stage-1 Q-Former saved to {out / 'stage1'} (use it as train.init_from of a stage-2 recipe)")
    return run
