"""A small, generic training loop on accelerate: any module, any `loss_fn(module, batch)`.

Single CPU, several GPUs or `accelerate launch` run the same code. Checkpoints restore weights,
optimizer, schedule, RNG states and the data position, so a resumed CPU run with a fixed seed
ends with the same weights, bit for bit, as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, TrainingError
from .config import TrainConfig, Until, count_steps, parse_until
from .optim import Schedule, make_optimizer, param_groups
from .runlog import RunLog
from .state import (clean_partial, find_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
                    step_dir_name)
from .fsdp import fsdp_requested
from .stream import BatchStream

LossFn = Callable[[nn.Module, Any], "torch.Tensor | dict[str, torch.Tensor]"]
EvalFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainResult:
    """What a training run did (also written to run.json)."""

    steps: int = 0
    samples: int = 0
    epochs: float = 0.0
    wall_time: float = 0.0
    steps_per_second: float = 0.0
    final_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    until: dict[str, Any] | None = None
    resumed_from: str | None = None
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return asdict(self)


def make_accelerator(mixed_precision: str = "no") -> tuple[Any, str | None]:
    """An Accelerator with the requested precision where the device supports it (note says when it fell back)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    note = None
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        note, mixed_precision = "mixed_precision fp16 needs a GPU; training in fp32", "no"
    # Under torchrun / `accelerate launch --multi_gpu` on a machine without CUDA, accelerate only forms a
    # process group (gloo) when told it runs on CPU; otherwise every process would train on its own.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kw = {"cpu": True} if launched and not torch.cuda.is_available() else {}
    try:
        return Accelerator(mixed_precision=mixed_precision, **kw), note
    except ValueError:
        # accelerate keeps one global state per process; a second run in the same process may change precision.
        AcceleratorState._reset_state()
        return Accelerator(mixed_precision=mixed_precision, **kw), note


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


@contextlib.contextmanager
def _rng_isolated():
    """Evaluation must not shift the training RNG streams (resume equality depends on it)."""
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py)
    np.random.set_state(npy)


class Trainer:
    """Train the trainable parameters of `module` on `dataset` with AdamW and a schedule."""

    def __init__(self, module: nn.Module, loss_fn: LossFn, dataset: Any, config: TrainConfig, out_dir: str | Path, *,
                 collate_fn: Callable | None = None, groups: list[dict[str, Any]] | None = None,
                 eval_fn: EvalFn | None = None, accelerator: Any = None, progress: bool = True,
                 echo: Callable[[str], None] = print, fingerprint: str | None = None):
        self.config = config
        self.out_dir = Path(out_dir)
        self.loss_fn, self.eval_fn = loss_fn, eval_fn
        self.echo = echo
        self.progress = progress
        self.fingerprint = fingerprint
        if accelerator is None:
            accelerator, note = make_accelerator(config.mixed_precision)
            if note:
                echo(f"note: {note}")
        self.accelerator = accelerator
        self.groups = groups if groups is not None else param_groups(module, config.weight_decay)
        if not any(g["params"] for g in self.groups):
            raise TrainingError("nothing to train: every parameter is frozen", "check train.trainable")
        if hasattr(module, "set_gradient_checkpointing"):
            module.set_gradient_checkpointing(config.gradient_checkpointing)
        elif config.gradient_checkpointing:
            raise TrainingError(f"{type(module).__name__} does not support gradient checkpointing",
                                "set train.gradient_checkpointing=false")
        self.fsdp = fsdp_requested(accelerator.num_processes)
        if self.fsdp:  # accelerate does not shard on CPU: fully_shard here, and no DDP wrapper
            from .fsdp import regroup, shard

            self.fsdp_units = shard(module, accelerator.device)
            self.groups = regroup(module, self.groups)
            self.module, self.optimizer = module, make_optimizer(self.groups, config)
        else:
            self.module, self.optimizer = accelerator.prepare(module, make_optimizer(self.groups, config))
        self.stream = BatchStream(dataset, config.batch_size, seed=config.seed, collate_fn=collate_fn,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes,
                                  num_workers=config.num_workers)
        self.total_steps, _ = count_steps(config, len(dataset), accelerator.num_processes)
        self.schedule = Schedule(config, self.total_steps)
        self.until: Until | None = parse_until(config.until) if config.until else None
        self.samples_per_step = self.stream.global_batch * config.grad_accum

    @property
    def unwrapped(self) -> nn.Module:
        """The module without DDP/FSDP wrappers."""
        return self.accelerator.unwrap_model(self.module)

    def plan(self) -> dict[str, Any]:
        """Steps, batch sizes and schedule as numbers (for the console and run.json)."""
        c = self.config
        return {"steps": self.total_steps, "micro_batches_per_epoch": self.stream.per_epoch,
                "epochs": round(self.total_steps * c.grad_accum / self.stream.per_epoch, 3),
                "batch_per_device": c.batch_size, "processes": self.accelerator.num_processes,
                "grad_accum": c.grad_accum, "global_batch": self.samples_per_step,
                "schedule": c.schedule, "lr": c.lr, "min_lr": c.min_lr, "warmup_steps": c.warmup_steps,
                "warmup_lr": c.warmup_lr, "weight_decay": c.weight_decay,
                "mixed_precision": self.accelerator.mixed_precision, "device": str(self.accelerator.device),
                "sharding": f"fsdp2 ({self.fsdp_units} units)" if self.fsdp else None,
                "gradient_checkpointing": c.gradient_checkpointing,
                "trainable_tensors": {("decay" if g["weight_decay"] else "no_decay"): len(g["params"])
                                      for g in self.groups}}

    # --- checkpoints -----------------------------------------------------------------------------
    def _save(self, state: dict[str, Any]) -> Path:
        acc = self.accelerator
        rngs = [rng_state()]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            rngs = gather_object(rngs)
        path = self.out_dir / "checkpoints" / step_dir_name(state["step"])
        module, optimizer = self.unwrapped, self.optimizer
        if self.fsdp:  # every rank gathers the full tensors; the main process writes them
            from .fsdp import full_views

            module, optimizer = full_views(self.unwrapped, self.optimizer)
        if acc.is_main_process:
            extra = {"schedule": self.schedule.state_dict(), "fingerprint": self.fingerprint}
            if acc.scaler is not None:
                extra["scaler"] = acc.scaler.state_dict()
            try:
                save_checkpoint(self.out_dir, state["step"], module, optimizer, {**state, **extra},
                                rngs, keep=self.config.keep_checkpoints)
            except OSError as exc:  # e.g. disk full: the half-written directory is already gone
                raise CheckpointError(f"could not write checkpoint {path.name} ({exc.strerror or exc})",
                                      "free disk space or choose another --out; the last complete checkpoint is "
                                      "kept (resume with --resume latest)") from None
        acc.wait_for_everyone()
        return path

    def _restore(self, resume: str) -> tuple[dict[str, Any], Path]:
        path = find_checkpoint(self.out_dir, resume)
        if self.fsdp:
            from .fsdp import Loader

            loader = Loader(self.unwrapped, self.optimizer)
            saved = load_checkpoint(path, loader.view, loader.opt_view)
            loader.apply()
        else:
            saved = load_checkpoint(path, self.unwrapped, self.optimizer)
        if self.fingerprint and saved.get("fingerprint") and saved["fingerprint"] != self.fingerprint:
            raise CheckpointError(f"checkpoint {path} belongs to a run with different settings",
                                  "resume with the same recipe and overrides, or start a new --out")
        if saved.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(saved["scaler"])
        rngs = saved.pop("rng")
        saved["_rng"] = rngs[min(self.accelerator.process_index, len(rngs) - 1)]
        return saved, path

    # --- evaluation ------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Run the eval callback in eval mode without disturbing training RNG streams."""
        if self.eval_fn is None:
            return {}
        was_training = self.module.training
        self.module.eval()
        try:
            with _rng_isolated(), torch.no_grad():
                metrics = self.eval_fn(self.unwrapped)
        finally:
            self.module.train(was_training)
        return {k: float(v) for k, v in metrics.items()}

    # --- the loop --------------------------------------------------------------------------------
    def _micro_step(self, batch: Any, sync: bool, step: int) -> torch.Tensor:
        acc = self.accelerator
        if self.fsdp:
            self.module.set_requires_gradient_sync(sync)
        ctx = contextlib.nullcontext() if sync or self.fsdp else acc.no_sync(self.module)
        with ctx:
            with acc.autocast():
                out = self.loss_fn(self.module, _to_device(batch, acc.device))
            loss = out["loss"] if isinstance(out, dict) else out
            value = float(loss.detach().float().item())
            if not math.isfinite(value):
                raise TrainingError(
                    f"loss is {value} at step {step + 1}",
                    "lower train.lr, enable train.grad_clip, or check the data for broken samples; the last good "
                    "checkpoint is kept (resume with --resume latest)")
            acc.backward(loss / self.config.grad_accum)
        return loss.detach().float()

    def _after_step(self, state: dict[str, Any], row: dict[str, Any], result: TrainResult, log: RunLog,
                    bar: Any) -> bool:
        """Evaluate, check the target, log and checkpoint after one step; True when training should stop."""
        cfg = self.config
        step = state["step"]
        done = step >= self.total_steps
        if self.eval_fn and (done or (cfg.eval_every and step % cfg.eval_every == 0)):
            state["metrics"] = row["metrics"] = self.evaluate()
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in state["metrics"].items()))
        seen = {"loss": state["loss"], **row.get("metrics", {})}
        reached = self.until is not None and self.until.reached(seen)
        if reached:
            result.until = row["until"] = {"target": str(self.until), "reached": True, "step": step,
                                           "samples": state["samples"], "wall_time": round(state["wall_time"], 3),
                                           "value": seen[self.until.metric]}
        if done or reached or step % cfg.log_every == 0:
            log.write(row)
        # The values first: a log-file bar prints its line during update().
        bar.set_postfix(loss=f"{state['loss']:.4f}", lr=f"{row['lr']:.2e}", refresh=False)
        bar.update(1)
        if done or reached or (cfg.save_every and step % cfg.save_every == 0):
            result.checkpoint = str(self._save(state))
        if reached:
            bar.write(f"reached {self.until} at step {step} ({state['samples']} samples, {state['wall_time']:.1f}s)")
        return reached

    def train(self, resume: str | None = None) -> TrainResult:
        """Train until max_steps/epochs or the `until` target; checkpoint, log and return what happened."""
        acc, cfg = self.accelerator, self.config
        log = RunLog(self.out_dir, enabled=acc.is_main_process)
        state = {"step": 0, "position": 0, "samples": 0, "wall_time": 0.0, "metrics": {}, "loss": None}
        result = TrainResult()
        if resume:
            if acc.is_main_process:
                clean_partial(self.out_dir)
            state, path = self._restore(resume)
            result.resumed_from = str(path)
            log.truncate_after(state["step"])
            self.echo(f"resumed from {path} (step {state['step']}, {state['samples']} samples)")
        else:
            from accelerate.utils import set_seed

            set_seed(cfg.seed + acc.process_index)
        from ..progress import progress_bar

        bar = progress_bar(self.total_steps, "train", "step", initial=state["step"],
                           disable=not (self.progress and acc.is_main_process))
        batches = self.stream.batches(state["position"])
        if "_rng" in state:
            set_rng_state(state.pop("_rng"))  # last: nothing between here and the first step may draw numbers
        self.module.train()
        session_start = time.perf_counter()
        started = session_start - state["wall_time"]
        first_step = state["step"]
        try:
            while state["step"] < self.total_steps:
                step = state["step"]
                lr = self.schedule.apply(self.optimizer, step)
                losses = []
                for k in range(cfg.grad_accum):
                    losses.append(self._micro_step(next(batches), k == cfg.grad_accum - 1, step))
                    state["position"] += 1
                row: dict[str, Any] = {}
                if cfg.grad_clip:
                    row["grad_norm"] = float(acc.clip_grad_norm_(self.module.parameters(), cfg.grad_clip))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                loss = torch.stack(losses).mean()
                if acc.num_processes > 1:
                    loss = acc.reduce(loss, "mean")
                state["loss"] = float(loss)
                state["step"] += 1
                state["samples"] += self.samples_per_step
                state["wall_time"] = time.perf_counter() - started
                row = {"step": state["step"], "epoch": round(state["position"] / self.stream.per_epoch, 4),
                       "loss": state["loss"], "lr": lr, "samples": state["samples"],
                       "wall_time": round(state["wall_time"], 3), **row}
                if self._after_step(state, row, result, log, bar):
                    break
        finally:
            bar.close()
            log.close()
        if self.fsdp:  # the caller saves the final model from full tensors
            from .fsdp import unshard_for_good

            unshard_for_good(self.module)
        if self.until is not None and result.until is None:
            result.until = {"target": str(self.until), "reached": False}
        result.steps, result.samples = state["step"], state["samples"]
        result.epochs = round(state["position"] / self.stream.per_epoch, 4)
        result.wall_time = round(state["wall_time"], 3)
        result.final_loss, result.metrics = state["loss"], state["metrics"]
        session = max(time.perf_counter() - session_start, 1e-9)
        result.steps_per_second = round((state["step"] - first_step) / session, 3)
        return result
