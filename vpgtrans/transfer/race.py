"""VPGTrans end to end, and its race against training from scratch: the one implementation that `vpgtrans
transfer`, `vpgtrans demo` and the benchmarks run.

    plan (plan.py) → [scratch on all the data, to its plateau: its best is the target] → inherit the source VPG →
    pair tokens (pairing.py) → fit the converter (converter.py) → merge it into the projector (merge.py) →
    warm-up → fine-tune, stopping once the target is reached (stages.py) → report (report.py)

Output directory: ``converter/`` (fitted converter), ``warmup/`` and ``finetune/`` (run dirs of `vpgtrans train`'s
runner; ``stage1/`` and ``stage2/`` in runs started before those names), ``scratch/`` (with compare_scratch),
``model/`` (the final model), ``report.json``. A stage whose ``model/`` exists is skipped on resume; a stage with
checkpoints resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..checkpoint import load_model, save_model
from ..data import load_records
from ..errors import ConfigError, DataError, WeightsNotFoundError
from ..memory import print_memory_plan
from ..model import build_model
from ..names import missing_error
from ..plot import plot_runs
from ..registry import get as get_component
from ..surrogate import zero_shot_metrics
from ..train.runner import run_recipe
from ..train.state import find_checkpoint
from . import report as rep
from . import stages as st
from .converter import ConverterFit, choose_converter, fit_converter, save_converter
from .merge import merge_projector
from .options import TransferOptions
from .pairing import TokenPairs, converter_pairs
from .plan import TransferPlan, followup_command, plan_lines, plan_transfer

Echo = Callable[[str], None]


@dataclass(frozen=True)
class Prepared:
    """The destination model with inherited VPG and merged projector, and how it got there."""

    model: nn.Module
    pairs: TokenPairs
    fit: ConverterFit | None
    converter: str  # the converter fitted ('auto' resolved); the option as given when nothing was fitted
    source_projector: nn.Linear


@dataclass(frozen=True)
class StageSummary:
    """What one stage's run recorded (None where it did not run)."""

    dir: str
    steps: int | None
    samples: int | None
    wall_time: float | None
    metrics: dict[str, float] | None
    lr: float | None
    schedule: str | None
    trainable: list[str] | None


@dataclass(frozen=True)
class ScratchSummary:
    """The baseline's run, cut at its plateau: its best is the target VPGTrans races to."""

    run: StageSummary
    plateau_step: int | None
    plateau_rule: str
    best: float | None

    def to_json(self) -> dict[str, Any]:
        """The report's `scratch` section."""
        out = {**asdict(self.run), "plateau_step": self.plateau_step, "plateau_rule": self.plateau_rule}
        return out if self.best is None else {**out, "best": self.best}


@dataclass(frozen=True)
class Race:
    """The speed-up to scratch's best (report.speedup's fields) and, per scratch evaluation, VPGTrans's catch-up."""

    scratch: ScratchSummary
    speedup: dict[str, Any]
    catch_up: list[dict[str, Any]]
    plot: str | None


@dataclass(frozen=True)
class TransferResult:
    """A finished transfer: what `<out>/report.json` holds."""

    source: str
    source_llm: dict[str, Any]
    destination_llm: dict[str, Any]
    converter: dict[str, Any]  # converter/converter.json: name, pairs, coverage, cosines, seconds
    stages: dict[str, StageSummary]  # warmup, finetune
    model_dir: str
    seconds: float
    zero_shot: dict[str, float] | None
    race: Race | None

    def to_json(self) -> dict[str, Any]:
        """report.json's content."""
        out: dict[str, Any] = {"format": "vpgtrans-transfer-report", "source": self.source,
                               "source_llm": self.source_llm, "destination_llm": self.destination_llm,
                               "converter": self.converter,
                               "stages": {n: asdict(s) for n, s in self.stages.items()},
                               "model_dir": self.model_dir, "seconds": self.seconds}
        if self.zero_shot is not None:
            out["zero_shot"] = self.zero_shot
        if self.race is not None:
            out.update(scratch=self.race.scratch.to_json(), speedup=self.race.speedup, catch_up=self.race.catch_up,
                       plot=self.race.plot)
        return out


@dataclass(frozen=True)
class DryRun:
    """A transfer planned and printed, not run."""

    train_examples: int | None
    recipe: str


def _build_llm(spec: dict[str, Any]) -> Any:
    cfg = dict(spec)
    return get_component("llm", cfg.pop("name")).component.build(cfg)


def _set_lora(model: Any, on: bool) -> None:
    for name, p in model.llm.named_parameters():
        if "lora_" in name:
            p.requires_grad_(on)


def prepare(plan: TransferPlan, *, fit: bool = True, echo: Echo = print) -> Prepared:
    """Destination model with the inherited VPG; with `fit`, the converter fitted and merged into the projector."""
    from accelerate.utils import set_seed  # why: accelerate costs ~1 s to import; planning (--dry-run) never needs it

    if plan.source is None:
        raise WeightsNotFoundError("the transfer has no source weights", "see the plan's MISSING lines")
    o = plan.options
    set_seed(plan.base.train.seed)
    model = build_model(plan.spec)
    model.vpg.load_state_dict(plan.source.vpg_state())
    src_proj = plan.source.projector()
    src_llm = _build_llm(plan.src_llm)
    pairs = converter_pairs(src_llm, model.llm, load_records(plan.base.data, "train"), min_coverage=o.min_coverage)
    echo(pairs.summary())
    result, name = None, o.converter
    if fit:
        src_emb, dst_emb = src_llm.input_embedding_matrix(), model.llm.input_embedding_matrix()
        name = choose_converter(o.converter, pairs, src_emb.shape[-1], dst_emb.shape[-1])
        result = fit_converter(name, src_emb, dst_emb, pairs, seed=o.converter_seed)
        echo(result.summary())
        merged = merge_projector(src_proj, result.linear)
        model.projector = merged.to(model.projector.weight.dtype)
    del src_llm
    return Prepared(model=model, pairs=pairs, fit=result, converter=name, source_projector=src_proj)


def fresh_model(plan: TransferPlan) -> nn.Module:
    """The destination model with a fresh VPG and projector, seeded as the stage that trains it."""
    from accelerate.utils import set_seed  # why: as in prepare()

    set_seed(plan.base.train.seed)
    return build_model(plan.spec)


def start_model(plan: TransferPlan, *, echo: Echo = print) -> tuple[nn.Module, Prepared | None]:
    """The model the first stage trains, as the options ask: the source's VPG (and the merged converter), or fresh."""
    if not plan.options.inherit_vpg:
        return fresh_model(plan), None
    prepared = prepare(plan, fit=plan.options.fit_converter, echo=echo)
    return prepared.model, prepared


def run_stage(plan: TransferPlan, stage: str, model: nn.Module, *, echo: Echo = print) -> dict[str, Any]:
    """Train one stage (warmup / finetune / scratch) of `model` in place, resuming from its checkpoints."""
    recipe = plan.stage_recipe(stage)
    out = plan.stage_dir(stage)
    resume = None
    if (out / "checkpoints").exists():
        try:
            find_checkpoint(out, "latest")
            resume = "latest"
        except Exception:  # no complete checkpoint: start the stage over
            resume = None
    if stage != st.SCRATCH:
        _set_lora(model, stage == st.FINETUNE)
    echo(f"== {st.LABELS[stage]}: training {' + '.join(recipe.train.trainable)}"
         + (" + LoRA" if plan.spec.get("lora") and stage != st.WARMUP else "") + (" (resuming)" if resume else ""))
    return run_recipe(recipe, out, resume=resume, force=resume is None, progress=plan.options.progress, echo=echo,
                      model=model)


def train_stages(plan: TransferPlan, start: Callable[[], nn.Module], *, echo: Echo = print
                 ) -> tuple[nn.Module | None, list[Path]]:
    """VPGTrans's stages in order: the warm-up, then fine-tuning unless the warm-up already reached its target.

    `start()` gives the model the first stage trains (called only when one has to train). A stage whose model
    was saved earlier is skipped; fine-tuning after a skipped warm-up starts from the warm-up's saved model.
    Returns the model in memory (None when nothing trained) and the stage folders in order.
    """
    model, dirs = None, []
    if plan.warmup is not None:
        warm = plan.stage_dir(st.WARMUP)
        if (warm / "model").exists():
            echo(f"{st.LABELS[st.WARMUP]}: done earlier, skipped")
        else:
            model = start()
            run_stage(plan, st.WARMUP, model, echo=echo)
        dirs.append(warm)
        if _reached(warm):
            echo(f"{st.LABELS[st.FINETUNE]}: not needed, the warm-up already reached its target")
            return model, dirs
    if plan.finetune is not None:
        tune = plan.stage_dir(st.FINETUNE)
        if (tune / "model").exists():
            echo(f"{st.LABELS[st.FINETUNE]}: done earlier, skipped")
        else:
            if model is None:
                model = load_model(dirs[0] / "model") if dirs else start()
            run_stage(plan, st.FINETUNE, model, echo=echo)
        dirs.append(tune)
    return model, dirs


def _check_out(out: Path, resume: bool, force: bool) -> Any:
    """Claim `out` and refuse what it holds (see _check_out_here); returns the claim, None on ranks but 0."""
    # Rank 0 alone refuses and cleans (as the train runner does), then every rank waits for its decision:
    # otherwise one rank finds what another has just written and refuses a run that is its own.
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        from accelerate import PartialState  # why: as in prepare(); only launched runs need it

        # cpu=True on a machine without CUDA, as make_accelerator does: only then does accelerate form the
        # gloo group; a plain PartialState() here would leave every process training on its own.
        state = PartialState(cpu=not torch.cuda.is_available())
        claim = _check_out_here(out, resume, force) if state.is_main_process else None
        state.wait_for_everyone()
        return claim
    return _check_out_here(out, resume, force)


# What a transfer run writes into --out (stage1/stage2: the stages' folders in runs made before they had names).
_TRANSFER_FILES = ("report.json", "converter", *st.LEGACY_FOLDERS.values(), *st.STAGES, st.SCRATCH, "model",
                   "zero_shot.json", "curves")


def _check_out_here(out: Path, resume: bool, force: bool) -> Any:
    """Claim `out` before anything else; refuse a previous transfer (unless --resume/--force) and foreign files."""
    from ..claim import claim_dir

    # Held until transfer() returns (the kernel drops it if the process dies): a second transfer into `out`, however
    # close behind, is refused naming this one's pid.
    claim = claim_dir(out)
    try:
        if out.is_dir() and any(out.iterdir()):
            if not any((out / name).exists() for name in _TRANSFER_FILES) and not force:
                raise ConfigError(f"{out} is not empty and holds no transfer run",
                                  "choose another --out, or pass --force to delete its contents")
            if force:
                shutil.rmtree(out)
            elif not resume:
                raise ConfigError(f"{out} already holds a transfer run",
                                  "pass --resume to continue it, --force to start over, or choose another --out")
    except BaseException:
        claim.release()
        raise
    return claim


def transfer(options: TransferOptions, *, echo: Echo = print) -> TransferResult | DryRun:
    """Move a trained VPG to another LLM (VPGTrans), racing scratch when asked; also writes `<out>/report.json`."""
    plan = plan_transfer(options)
    if options.dry_run:
        return _dry_run(plan, echo)
    claim = _check_out(plan.out, options.resume, options.force)
    try:
        return _transfer(plan, echo)
    finally:
        if claim is not None:
            claim.release()


def _main_process() -> bool:
    """Rank 0 of a launched run (or a plain one): it alone writes the transfer's own files.

    Every rank runs the same steps in lockstep: two ranks replacing `converter/` or `model/` at once can make one
    of them fail (a rename onto the directory the other has just put there, or of one it has just moved away),
    the likely cause of the FSDP transfer test's intermittent failure. The stages' files are rank 0's already.
    """
    return int(os.environ.get("RANK", "0") or 0) == 0


def _transfer(plan: TransferPlan, echo: Echo) -> TransferResult:
    options = plan.options
    plan.out.mkdir(parents=True, exist_ok=True)
    if plan.source is None:  # only dry runs plan without the source
        raise WeightsNotFoundError("the transfer has no source weights", "see the plan's MISSING lines")
    started = time.perf_counter()
    echo(f"recipe {plan.choice.recipe}: {plan.choice.reason}")
    echo(plan.source.summary())
    for note in plan.notes:
        echo(f"note: {note}")
    # The paper's order: scratch first, to its plateau; VPGTrans then stops once it reaches scratch's best.
    scratch = _scratch_first(plan, echo) if options.compare_scratch else None
    if scratch is not None and scratch.target and not options.until:
        plan = plan.with_target(scratch.target)

    def start() -> nn.Module:
        model, prepared = start_model(plan, echo=echo)
        if prepared is not None and prepared.fit is not None and _main_process():
            save_converter(prepared.fit, prepared.pairs, prepared.converter, plan.out)
        if options.compare_scratch:  # the zero-shot graft: the destination model before any transfer training
            zero = zero_shot_metrics(plan.base, model)
            if _main_process():
                rep.write_json(plan.out / "zero_shot.json", zero)
            echo("zero-shot graft (before training): " + ", ".join(f"{k} {v:.4g}" for k, v in zero.items()))
        return model

    model, stage_dirs = train_stages(plan, start, echo=echo)
    if model is None:
        model = load_model(stage_dirs[-1] / "model")
    saved = plan.out / "converter" / "converter.json"
    converter = json.loads(saved.read_text()) if saved.exists() else {"converter": None}  # none fitted: an ablation
    if _main_process():
        save_model(model, plan.out / "model", extra={"transfer": {"source": plan.source.path, "dst": options.dst,
                                                                  "converter": converter["converter"],
                                                                  "warmup_lr_scale": plan.warmup_lr_scale}})
    seconds = round(time.perf_counter() - started, 1)
    zero_path = plan.out / "zero_shot.json"
    race = None
    if scratch is not None:
        race = _race(plan, scratch, converter.get("seconds", 0.0), echo)
    result = TransferResult(source=plan.source.path, source_llm=plan.src_llm, destination_llm=plan.spec["llm"],
                            converter=converter,
                            stages={n: stage_summary(plan.stage_dir(n)) for n in st.STAGES},
                            model_dir=str(plan.out / "model"), seconds=seconds,
                            zero_shot=json.loads(zero_path.read_text()) if zero_path.exists() else None, race=race)
    if _main_process():
        rep.write_json(plan.out / "report.json", result.to_json())
    echo(f"transferred model saved to {plan.out / 'model'}; report {plan.out / 'report.json'}")
    if plan.choice.followup:
        echo(f"next ({plan.choice.kind}): {followup_command(plan)}")
    return result


def _race(plan: TransferPlan, scratch: ScratchRun, fit_seconds: float, echo: Echo) -> Race:
    """VPGTrans's curve (warm-up steps and the converter's fitting time count against it) against scratch's."""
    metric = scratch.metric
    curve_dir = plan.out / "curves" / "vpgtrans"
    # Every stage folder, trained or not: a missing one adds no rows.
    every = [plan.stage_dir(n) for n in st.STAGES]
    if _main_process():
        curve_dir.mkdir(parents=True, exist_ok=True)
        (curve_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rep.joined_rows(every)))
    ours = rep.transfer_curve(every, metric, fit_seconds)
    speedup = rep.speedup(ours, scratch.curve, metric)
    catch_up = rep.catch_up(ours, scratch.curve, metric)
    plot = _plot(plan, echo, speedup) if _main_process() else None
    if "error" not in speedup:
        for line in rep.table(speedup) + rep.catch_up_lines(catch_up, metric):
            echo(line)
    return Race(scratch=scratch.summary, speedup=speedup, catch_up=catch_up, plot=plot)


def _dry_run(plan: TransferPlan, echo: Echo) -> DryRun:
    """Print the whole plan; when data or weights are missing, print it anyway and then fail naming all of them."""
    n_train = None if plan.data_problem else len(load_records(plan.base.data, "train"))
    prepared = prepare(plan, fit=False, echo=lambda _: None) if not plan.missing else None
    for line in plan_lines(plan, prepared and prepared.model, prepared and prepared.pairs, n_train):
        echo(line)

    print_memory_plan(plan.base, n_train or 0, echo)  # fine-tuning trains the most: the run's peak
    if plan.missing or plan.data_problem:
        parts = [plan.data_problem] if plan.data_problem else []
        if plan.missing:
            err = missing_error(plan.missing)
            parts.append((err.what, err.fix))
        raise (WeightsNotFoundError if plan.missing else DataError)("; ".join(w for w, _ in parts),
                                                                    "; ".join(f for _, f in parts))
    return DryRun(train_examples=n_train, recipe=plan.choice.recipe)


def stage_summary(run_dir: Path) -> StageSummary:
    """What the stage's run.json recorded (all None when it did not run)."""
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    res = run.get("results") or {}
    t = (run.get("recipe") or {}).get("train", {})
    return StageSummary(dir=str(run_dir), steps=res.get("steps"), samples=res.get("samples"),
                        wall_time=res.get("wall_time"), metrics=res.get("metrics"), lr=t.get("lr"),
                        schedule=t.get("schedule"), trainable=t.get("trainable"))


def _reached(run_dir: Path) -> bool:
    """True when the stage's run stopped because it reached its `until` target."""
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    return bool(((run.get("results") or {}).get("until") or {}).get("reached"))


@dataclass(frozen=True)
class ScratchRun:
    """The scratch run's curve cut at its plateau, its summary, and the target it sets (None without evaluations)."""

    summary: ScratchSummary
    curve: list[rep.Point]
    metric: str
    target: str | None


PLATEAU_RULE = "best improved < 1% over the last quarter of the steps so far (>= 4 evaluations in it)"


def _scratch_first(plan: TransferPlan, echo: Echo) -> ScratchRun:
    """Train scratch (100% of the data) to its plateau; its best is the target both VPGTrans stages stop at."""
    from accelerate.utils import set_seed  # why: as in prepare()

    scratch, recipe = plan.stage_dir(st.SCRATCH), plan.stage_recipe(st.SCRATCH)
    if not (scratch / "model").exists():
        set_seed(recipe.train.seed)
        model = build_model(plan.spec)
        _set_lora(model, True)
        run_stage(plan, st.SCRATCH, model, echo=echo)
        del model
    else:
        echo("scratch: done earlier, skipped")
    metric = plan.base.eval.metrics[0] if plan.base.eval.metrics else "val_loss"
    # Training is causal: cutting the curve at the plateau rule is what an early-stopped run would have logged.
    curve, stop = rep.until_plateau(rep.transfer_curve([scratch], metric), metric)
    best, target = None, None
    if curve:
        best = (min if rep.lower_is_better(metric) else max)(p["value"] for p in curve)
        echo(f"scratch: best {metric} {best:.4g}, " + (f"plateau at step {stop['step']}" if stop else
                                                       f"no plateau within {recipe.train.max_steps} steps"))
        target = f"{metric}{'<=' if rep.lower_is_better(metric) else '>='}{best!r}"
    summary = ScratchSummary(run=stage_summary(scratch), plateau_step=stop["step"] if stop else None,
                             plateau_rule=PLATEAU_RULE, best=best)
    return ScratchRun(summary=summary, curve=curve, metric=metric, target=target)


def _plot(plan: TransferPlan, echo: Echo, speedup: dict[str, Any]) -> str | None:
    try:
        line = {"metric": speedup["metric"], "value": speedup["scratch_best"]} if "scratch_best" in speedup else None
        path = plot_runs([plan.out / "curves" / "vpgtrans", plan.stage_dir(st.SCRATCH)], plan.out / "curves.png",
                         labels=["VPGTrans", "scratch"], title="VPGTrans vs training from scratch", threshold=line)
    except Exception as exc:  # the plot is optional (matplotlib is an extra); the numbers are in report.json
        echo(f"note: no plot ({exc})")
        return None
    return str(path)
