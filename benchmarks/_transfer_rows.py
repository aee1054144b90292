"""The rows of the transfer-efficiency benchmark: which parts a run inherits, and how one run is trained.

Every row is one set of `TransferOptions` run by the race `vpgtrans transfer` runs (`vpgtrans.transfer.race`):
inherit the source VPG or start a fresh one, a fresh or a converter-merged projector, a projector warm-up at
some LR scale or none, then VPG + projector fine-tuning until the seed's scratch best is matched.
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
    fraction: float | None = None  # share of the training data; None = the settings' data_fraction

    @property
    def warmup(self) -> bool:
        """True when the row has a projector warm-up."""
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
    Row("vpgtrans-all-data", "full VPGTrans on 100% of the training data", True, "converter", warmup_scale=5.0,
        fraction=1.0),
)}


def converter_rows() -> dict[str, Row]:
    """One full-VPGTrans row per registered converter other than the paper's (new converters show up here)."""
    from vpgtrans.registry import available

    # The identity needs one vocabulary on both ends: the control pair (opt-s>opt-s) is where it is measured.
    names = sorted(r.component.name for r in available("converter")
                   if r.component.name not in ("linear-cosine", "identity"))
    return {f"conv-{n}": Row(f"conv-{n}", f"VPGTrans with converter {n}", True, "converter", n, 5.0)
            for n in names}


ROWS.update(converter_rows())


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
    # The same LLM on both ends: the perfect converter exists (the identity), so this bounds what a better
    # converter could give and shows that the protocol itself can measure a large speed-up.
    Pair("opt-s>opt-s", "opt-s", "opt-s", "control: back onto the source LLM itself"),
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
    data_fraction: float = 1.0  # share of the training data the transfer rows see (paper: 0.107); scratch: all
    warmup_epochs: float = 0.0  # > 0: the warm-up is this many epochs of the row's data (paper: 1), not warmup_steps
    plateau: bool = False  # scratch stops at the plateau rule; the rows get scratch's steps to its plateau
    plateau_tol: float = 0.01  # plateau rule: the best improved by less than this share ...
    plateau_window: float = 0.25  # ... over this last share of the steps so far

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
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    # Benchmarks running side by side (one per pair) share sources: the second waits for the first's training.
    with open(cache / f"source-{llm}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _train_source(s, llm, cache, echo)


def _source_recipe(s: Settings, llm: str) -> Any:
    from vpgtrans.model import detect_llm_component
    from vpgtrans.recipes import load_recipe

    path = s.llm(llm)
    return load_recipe(SOURCE_RECIPE, s.data_overrides() + [
        f"model.llm.path={path}", f"model.llm.name={detect_llm_component(path)}", f"train.lr={s.source_lr}",
        f"train.min_lr={s.source_lr / 10}", f"train.max_steps={s.source_steps}", "train.warmup_steps=50",
        f"train.eval_every={max(1, s.source_steps // 12)}", f"train.log_every={max(1, s.source_steps // 12)}",
        "train.seed=1234"])


def source_architecture(s: Settings, llm: str, cache: Path) -> Path:
    """An untrained model with the source's exact spec: all a scratch row needs (it never reads the weights)."""
    from vpgtrans.checkpoint import save_model
    from vpgtrans.model import build_model

    out = cache / f"spec-{llm}-{world_id(s)}"
    if not (out / "manifest.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / f"spec-{llm}.lock", "w") as lock:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "manifest.json").exists():
                save_model(build_model(_source_recipe(s, llm).model), out)
    return out


def world_id(s: Settings) -> str:
    """Changes whenever the world at `s.world` is rebuilt: cached sources of an older build are not reused."""
    import hashlib

    return hashlib.sha256((Path(s.world) / "world.json").read_bytes()).hexdigest()[:16]


def _train_source(s: Settings, llm: str, cache: Path, echo: Callable[[str], None]) -> Path:
    from vpgtrans.train.runner import run_recipe

    out = cache / f"source-{llm}"
    key = {"world": str(Path(s.world).resolve()), "world_id": world_id(s), "llm": llm, "steps": s.source_steps,
           "lr": s.source_lr,
           "batch_size": s.batch_size, "max_text_len": s.max_text_len, "evals": 12}
    meta = out / "bench_source.json"
    if (out / "model" / "manifest.json").exists() and (out / "source.json").exists() and meta.exists() \
            and json.loads(meta.read_text()) == key:
        echo(f"source VPG on {llm}: reusing {out / 'model'}")
        return out / "model"
    recipe = _source_recipe(s, llm)
    echo(f"source VPG on {llm}: training {s.source_steps} steps → {out}")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "console.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        run_recipe(recipe, out, force=True, progress=False, echo=_quiet)
    curve = rep.eval_curve(rep.joined_rows([out]), METRIC)
    stop = rep.plateau(curve, METRIC, s.plateau_tol, s.plateau_window)
    info = {"llm": llm, "steps": s.source_steps, "lr": s.source_lr, "curve": curve,
            "best": min(p["value"] for p in curve), "plateau_step": stop["step"] if stop else None,
            "seconds": round(time.perf_counter() - started, 1)}
    (out / "source.json").write_text(json.dumps(info, indent=1))
    meta.write_text(json.dumps(key))
    echo(f"source VPG on {llm}: best {METRIC} {info['best']:.4f}, "
         + (f"plateau (< {s.plateau_tol:.0%} gain over the last {s.plateau_window:.0%}) at step {stop['step']}"
            if stop else f"NO plateau within {s.source_steps} steps") + f" ({info['seconds']:.0f}s)")
    return out / "model"


def _options(s: Settings, pair: Pair, row: Row, source: Path, seed: int, out: Path, target: float | None,
             budget: int) -> Any:
    """The transfer options of one row; `budget` caps warm-up + fine-tuning."""
    from vpgtrans.transfer.options import TransferOptions

    frac = 1.0 if row.name == "scratch" else (row.fraction if row.fraction is not None else s.data_fraction)
    overrides = s.data_overrides() + [f"train.seed={seed}", f"train.lr={s.lr}", f"train.min_lr={s.min_lr}",
                                      f"train.eval_every={s.eval_every}", f"data.fraction={frac}",
                                      f"data.fraction_seed={seed}"]
    # The paper's warm-up is whole epochs of the row's (fraction of the) data; else exactly `warmup_steps` steps.
    return TransferOptions(src=str(source), dst=s.llm(pair.dst), out=str(out), recipe=TRANSFER_RECIPE,
                           overrides=tuple(overrides), converter=row.converter, converter_seed=seed,
                           inherit_vpg=row.inherit_vpg, fit_converter=row.projector == "converter",
                           warmup=row.warmup, warmup_lr_scale=row.warmup_scale or 1.0,
                           warmup_epochs=s.warmup_epochs or 1.0,
                           warmup_steps=None if s.warmup_epochs else s.warmup_steps, budget_steps=budget,
                           until=f"{METRIC}<={target!r}" if target is not None else None,
                           until_in_warmup=True)  # a row may match scratch already while warming up


def run_row(s: Settings, pair: Pair, row: Row, seed: int, source: Path, out: Path, *,
            target: float | None = None, budget: int | None = None) -> dict[str, Any]:
    """Train one (pair, row, seed) for `budget` steps (default s.steps); stops at the first eval reaching `target`."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # The trainer and transformers print per-eval lines and loading bars: keep them in the run's console.log.
    with open(out / "console.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return _run_row(s, pair, row, seed, source, out, target, budget or s.steps)


def _run_row(s: Settings, pair: Pair, row: Row, seed: int, source: Path, out: Path,
             target: float | None, budget: int) -> dict[str, Any]:
    import shutil

    from vpgtrans.transfer import race
    from vpgtrans.transfer.plan import plan_transfer

    started = time.perf_counter()
    plan = plan_transfer(_options(s, pair, row, source, seed, out, target, budget))
    info: dict[str, Any] = {"pair": pair.name, "row": row.name, "seed": seed, "config": asdict(row),
                            "budget": budget, "data_fraction": plan.base.data.fraction}
    fit_seconds = 0.0
    model, prepared = race.start_model(plan, echo=_quiet)
    info["source_vpg_loaded"] = prepared is not None
    if prepared is not None and prepared.fit is not None:
        fit_seconds = prepared.fit.seconds
        info["converter_fit"] = {"converter": row.converter, "train_cosine": round(prepared.fit.train_cosine, 4),
                                 "heldout_cosine": None if prepared.fit.heldout_cosine is None
                                 else round(prepared.fit.heldout_cosine, 4),
                                 "n_pairs": prepared.pairs.n_pairs, "seconds": round(fit_seconds, 3)}
    info["projector_norm_init"] = round(float(model.projector.weight.detach().norm()), 4)
    info["vpg_init_fingerprint"] = vpg_fingerprint(model.vpg.state_dict())
    _, stages = race.train_stages(plan, lambda: model, echo=_quiet)
    rows = rep.joined_rows(stages)
    # Like `vpgtrans transfer`: warm-up steps and the converter's fitting time count against the transfer.
    curve = rep.transfer_curve(stages, METRIC, fit_seconds)
    end = {"step": rows[-1]["step"], "samples": rows[-1]["samples"],
           "wall_time": rows[-1]["wall_time"] + fit_seconds} if rows else {"step": 0, "samples": 0, "wall_time": 0.0}
    if s.plateau and row.name == "scratch":
        # Training is causal: cutting the curve at the plateau rule is what an early-stopped run would have logged.
        info["curve_to_cap"] = curve
        curve, stop = rep.until_plateau(curve, METRIC, s.plateau_tol, s.plateau_window)
        info["plateau_step"] = stop["step"] if stop else None
        end = stop or end
    info.update(curve=curve, steps=end["step"], samples=end["samples"], train_wall_s=round(end["wall_time"], 2),
                warmup_steps=plan.warmup_steps or 0, best=min((p["value"] for p in curve), default=None),
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
