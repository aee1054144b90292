"""The rows of the transfer-efficiency benchmark: which parts a run inherits, and how one run is trained.

Every row is a combination of the public pipeline's pieces (`vpgtrans.transfer.pipeline`): inherit the
source VPG or start a fresh one, a fresh or a converter-merged projector, a projector warm-up (stage 1) at
some LR scale or none, then VPG + projector fine-tuning (stage 2) until the seed's scratch best is matched.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from vpgtrans.transfer import report as rep

# Directory of each world LLM inside a built world (the aliases world-opt-s … point at the same dirs).
WORLD_LLMS = {"opt-s": "opt-s", "opt-m": "opt-m", "llama": "llama", "flant5": "flant5"}
SOURCE_RECIPE = "blip2_stage2_world"
TRANSFER_RECIPE = "vpgtrans_world"
METRIC = "val_loss"


@dataclass(frozen=True)
class Row:
    """One ablation row: what the destination model starts from and whether the projector is warmed up."""

    name: str
    label: str
    inherit_vpg: bool
    projector: str  # "fresh" or "converter" (source projector merged with the fitted converter)
    converter: str = "linear-cosine"
    warmup_scale: float | None = None  # LR multiplier of the projector-only warm-up; None = no warm-up

    @property
    def warmup(self) -> bool:
        """True when the row has a stage-1 projector warm-up."""
        return self.warmup_scale is not None


ROWS: dict[str, Row] = {r.name: r for r in (
    Row("scratch", "scratch (fresh VPG + projector)", False, "fresh"),
    Row("inherit", "inherit VPG only (fresh projector)", True, "fresh"),
    Row("inherit+conv", "inherit VPG + converter projector, no warm-up", True, "converter"),
    Row("warmup-1x", "inherit + converter + warm-up 1x LR", True, "converter", warmup_scale=1.0),
    Row("vpgtrans", "full VPGTrans (converter linear-cosine, warm-up 5x)", True, "converter", warmup_scale=5.0),
    Row("warmup-10x", "inherit + converter + warm-up 10x LR", True, "converter", warmup_scale=10.0),
    Row("inherit+warmup", "inherit + fresh projector + warm-up 5x (no converter)", True, "fresh",
        warmup_scale=5.0),
    Row("conv-lstsq", "VPGTrans with converter lstsq", True, "converter", "lstsq", 5.0),
    Row("conv-procrustes", "VPGTrans with converter procrustes", True, "converter", "procrustes", 5.0),
)}


@dataclass(frozen=True)
class Pair:
    """A transfer: VPG trained on world LLM `src`, moved to world LLM `dst`."""

    name: str
    src: str
    dst: str
    kind: str  # what the pair probes: size, type, or source size


PAIRS: dict[str, Pair] = {p.name: p for p in (
    Pair("opt-s>llama", "opt-s", "llama", "type (OPT → LLaMA), small source"),
    Pair("opt-s>opt-m", "opt-s", "opt-m", "size (OPT small → OPT larger)"),
    Pair("opt-s>flant5", "opt-s", "flant5", "type (decoder-only → encoder-decoder)"),
    Pair("llama>opt-s", "llama", "opt-s", "type (LLaMA → OPT)"),
    Pair("opt-m>llama", "opt-m", "llama", "type, larger source (compare with opt-s>llama)"),
)}


@dataclass
class Settings:
    """Sizes and schedules shared by every run of one benchmark invocation."""

    world: str
    steps: int = 120  # scratch budget; every other row is capped at the same total (warm-up included)
    lr: float = 5e-4
    min_lr: float = 2.5e-4
    batch_size: int = 32
    eval_every: int = 20
    val_samples: int = 96
    warmup_steps: int = 20
    source_steps: int = 400
    source_lr: float = 5e-4
    max_text_len: int = 32
    cache_dir: str | None = None

    def llm(self, key: str) -> str:
        """Directory of a world LLM."""
        return str(Path(self.world) / WORLD_LLMS[key])

    def data_overrides(self) -> list[str]:
        """Recipe overrides pointing at this world's data and vision encoder, val_loss-only evals."""
        w = Path(self.world)
        out = [f"data.train={w / 'data' / 'train.jsonl'}", f"data.val={w / 'data' / 'val.jsonl'}",
               f"data.max_val_samples={self.val_samples}", "eval.metrics=[val_loss]",
               f"model.vision.path={w / 'vit'}", f"train.batch_size={self.batch_size}",
               f"train.max_text_len={self.max_text_len}", "train.save_every=0",
               f"train.log_every={self.eval_every}"]  # eval rows are only logged on log_every steps
        if self.cache_dir:
            out.append(f"data.cache_dir={self.cache_dir}")
        return out


def _quiet(_: str) -> None:
    return None


def train_source(s: Settings, llm: str, cache: Path, echo: Callable[[str], None] = print) -> Path:
    """A VPG trained on world LLM `llm` with the BLIP-2 stage-2 world recipe; reused while its settings match."""
    from vpgtrans.model import detect_llm_component
    from vpgtrans.recipes import load_recipe
    from vpgtrans.train.runner import run_recipe

    out = cache / f"source-{llm}"
    key = {"world": str(Path(s.world).resolve()), "llm": llm, "steps": s.source_steps, "lr": s.source_lr,
           "batch_size": s.batch_size, "max_text_len": s.max_text_len}
    meta = out / "bench_source.json"
    if (out / "model" / "manifest.json").exists() and meta.exists() and json.loads(meta.read_text()) == key:
        echo(f"source VPG on {llm}: reusing {out / 'model'}")
        return out / "model"
    path = s.llm(llm)
    recipe = load_recipe(SOURCE_RECIPE, s.data_overrides() + [
        f"model.llm.path={path}", f"model.llm.name={detect_llm_component(path)}", f"train.lr={s.source_lr}",
        f"train.min_lr={s.source_lr / 10}", f"train.max_steps={s.source_steps}", "train.warmup_steps=50",
        f"train.eval_every={s.source_steps}", "train.seed=1234"])
    echo(f"source VPG on {llm}: training {s.source_steps} steps → {out}")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "console.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        run = run_recipe(recipe, out, force=True, progress=False, echo=_quiet)
    meta.write_text(json.dumps(key))
    metrics = (run.get("results") or {}).get("metrics") or {}
    echo(f"source VPG on {llm}: {METRIC} {metrics.get(METRIC, float('nan')):.4f} "
         f"({time.perf_counter() - started:.0f}s)")
    return out / "model"


def _plan(s: Settings, pair: Pair, row: Row, source: Path, seed: int, out: Path, target: float | None) -> Any:
    from vpgtrans.data import load_records
    from vpgtrans.transfer.pipeline import plan_transfer

    warm = s.warmup_steps if row.warmup else 0
    overrides = s.data_overrides() + [f"train.seed={seed}", f"train.lr={s.lr}", f"train.min_lr={s.min_lr}",
                                      f"train.max_steps={max(1, s.steps - warm)}", f"train.eval_every={s.eval_every}"]
    plan = plan_transfer(str(source), s.llm(pair.dst), out=out, recipe=TRANSFER_RECIPE, overrides=overrides,
                         converter=row.converter, warmup_lr_scale=row.warmup_scale or 1.0,
                         until=f"{METRIC}<={target!r}" if target is not None else None)
    if row.warmup:
        # Stage 1 is sized in epochs by the pipeline; pin it to exactly `warm` steps (count_steps floors).
        per_epoch = len(load_records(plan.stage1.data, "train")) // s.batch_size
        plan.stage1.train.epochs = (warm + 0.5) / per_epoch
        plan.stage1.train.until = plan.stage2.train.until  # a row may match scratch already while warming up
    return plan


def run_row(s: Settings, pair: Pair, row: Row, seed: int, source: Path, out: Path, *,
            target: float | None = None) -> dict[str, Any]:
    """Train one (pair, row, seed); stops at the first eval reaching `target` (the seed's scratch best)."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # The trainer and transformers print per-eval lines and loading bars: keep them in the run's console.log.
    with open(out / "console.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return _run_row(s, pair, row, seed, source, out, target)


def _run_row(s: Settings, pair: Pair, row: Row, seed: int, source: Path, out: Path,
             target: float | None) -> dict[str, Any]:
    import shutil

    from accelerate.utils import set_seed

    from vpgtrans.model import build_model
    from vpgtrans.transfer.pipeline import prepare, run_stage

    started = time.perf_counter()
    plan = _plan(s, pair, row, source, seed, out, target)
    info: dict[str, Any] = {"pair": pair.name, "row": row.name, "seed": seed, "config": asdict(row)}
    fit_seconds = 0.0
    if row.inherit_vpg:
        prepared = prepare(plan, fit=row.projector == "converter", seed=seed, echo=_quiet)
        model = prepared.model
        info["source_vpg_loaded"] = True
        if prepared.fit is not None:
            fit_seconds = prepared.fit.seconds
            info["converter_fit"] = {"converter": row.converter, "train_cosine": round(prepared.fit.train_cosine, 4),
                                     "heldout_cosine": None if prepared.fit.heldout_cosine is None
                                     else round(prepared.fit.heldout_cosine, 4),
                                     "n_pairs": prepared.pairs.n_pairs, "seconds": round(fit_seconds, 3)}
    else:
        set_seed(seed)
        model = build_model(plan.spec)
        info["source_vpg_loaded"] = False
    info["projector_norm_init"] = round(float(model.projector.weight.detach().norm()), 4)
    info["vpg_init_fingerprint"] = vpg_fingerprint(model.vpg.state_dict())
    stages, matched = [], False
    if row.warmup:
        warm = run_stage(plan, "stage1", model, echo=_quiet)
        matched = bool(((warm.get("results") or {}).get("until") or {}).get("reached"))
        stages.append(out / "stage1")
    if not matched:
        run_stage(plan, "stage2", model, echo=_quiet)
        stages.append(out / "stage2")
    rows = rep.joined_rows(stages)
    # Like `vpgtrans transfer`: the converter's fitting time counts against the transfer in wall time.
    curve = rep.eval_curve(rows, METRIC, {"step": 0, "samples": 0, "wall_time": fit_seconds})
    info.update(curve=curve, steps=rows[-1]["step"] if rows else 0, samples=rows[-1]["samples"] if rows else 0,
                train_wall_s=round(rows[-1]["wall_time"] + fit_seconds, 2) if rows else 0.0,
                warmup_steps=s.warmup_steps if row.warmup else 0,
                best=min((p["value"] for p in curve), default=None),
                total_s=round(time.perf_counter() - started, 2))
    for d in stages:  # weights are not needed afterwards: keep the logs, free the disk
        for sub in ("checkpoints", "model"):
            shutil.rmtree(d / sub, ignore_errors=True)
    return info


def vpg_fingerprint(state: dict[str, Any]) -> float:
    """A number that changes with any VPG weight: proves which rows start from the source VPG."""
    return round(sum(float(v.double().abs().sum()) for k, v in sorted(state.items()) if v.is_floating_point()), 6)


def compare(row_run: dict[str, Any], scratch_run: dict[str, Any]) -> dict[str, Any]:
    """The paper's speed-up of a run over the same seed's scratch run, in steps, samples and wall time."""
    out = rep.speedup(row_run["curve"], scratch_run["curve"], METRIC)
    return {k: out.get(k) for k in ("scratch_best", "scratch", "vpgtrans", "vpgtrans_best", "speedup",
                                    "speedup_samples", "speedup_wall_time")}
