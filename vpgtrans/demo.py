"""`vpgtrans demo`: the paper's experiment (arXiv 2305.01278, Table 3) in miniature on the synthetic world.

world (built if absent, with its stage-1 Q-Former: every arm starts from it, as in the paper) → a VPG trained on
the source LLM (BLIP-2 stage 2, 10 epochs) → on each destination LLM (by default the paper's headline kind, a
larger OPT): TFS, a VPG trained there from the stage-1 Q-Former for 10 epochs, beside
VPGTrans (inherit the source VPG → converter-merged projector → one warm-up epoch, its epoch 1 → fine-tuning),
both scored on captions after every epoch → the regime line (what the projector alone got in the warm-up
epoch), the epochs table and Table 3's speed-up → captions next to the truth, curves PNG.
Every stage keeps its outputs under ``--out``: a second run continues where the first stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .config import help_field
from .errors import ConfigError
from .transfer.epochs import best_point, epoch_curve, first_surpassing, steps_per_epoch, table3_speedups
from .world.stage1 import STAGE1_DIR

STEPS = ("world", "source", "transfer", "captions")
DEFAULT_DST = ["world-opt-m"]
STAGE2_RECIPE = "blip2_stage2_world"  # TFS and the source: BLIP-2 stage 2, as in the paper
TRANSFER_RECIPE = "vpgtrans_world"
CAPTION_METRIC = "cider"
# Table 3's caption-CIDEr column for the paper row each world destination stands for (from an OPT-s source).
PAPER_ROW = {"world-opt-m": ("OPT125M→350M", 1.7), "world-flant5": ("OPT2.7B→FlanT5XL", 1.7)}


@dataclass
class DemoConfig:
    """What the demo trains; the defaults fit ~15 minutes on an idle 2-core CPU, world build included."""

    src: str = help_field("world-opt-s", help="LLM the source VPG is trained on")
    dst: list[str] = help_field(DEFAULT_DST, help="LLMs the VPG is transferred to, one TFS-vs-VPGTrans comparison "
                                                  "each (default: the paper's headline kind, a larger OPT)")
    epochs: int = help_field(10, help="epochs of TFS and of the source (the paper's 10); VPGTrans's cap, warm-up "
                                      "included")
    epoch_fraction: float = help_field(0.25, help="share of the world's training images one epoch passes over "
                                                  "(0.25: 1,500 of 6,000, so 10 epochs fit the demo's time)")
    warmup_lr_scale: float | None = help_field(None, help="VPGTrans's warm-up LR = this x the recipe's; default "
                                                          "the transfer recipe's (25x on the world)")
    eval_images: int = help_field(256, help="val images captioned after every epoch (CIDEr, attribute accuracy; on "
                                            "64 CIDEr moved ±0.1 between neighbouring epochs)")
    val_samples: int = help_field(64, help="val captions for the val_loss logged beside them")
    test_images: int = help_field(64, help="test images captioned to score the final models")
    show: int = help_field(4, help="test images whose captions are printed")
    seed: int = help_field(0, help="training seed (also picks the epoch's images)")
    world_size: str = help_field("full", help="world to build when none exists: 'full', or 'tiny' for smoke tests")


def _stage(echo: Callable[[str], None], k: int, text: str) -> float:
    from .threads import apply_threads

    echo(f"\n[{k}/{len(STEPS)}] {text}")
    if k > 1:  # chosen again at every stage: the machine's load may have changed since the last one
        echo(apply_threads())
    return time.perf_counter()


def ensure_world(size: str, echo: Callable[[str], None]) -> Path:
    """The world at `world_dir()`: any complete world found there is used as is, otherwise one is built."""
    from .paths import world_dir
    from .world import WorldConfig, build_world, is_complete, read_manifest

    path = world_dir()
    manifest = read_manifest(path)
    if is_complete(path, manifest):
        if not (path / STAGE1_DIR / "stage1.json").exists():
            raise ConfigError(f"the world at {path} predates the stage-1 Q-Former every arm starts from "
                              f"({STAGE1_DIR}/)", "rebuild it: vpgtrans world build --force")
        echo(f"using the world at {path} (seed {manifest.get('seed')}, built in {manifest.get('build_seconds')}s)")
        return path
    took = "10-15 minutes on a 2-core CPU, longer beside other jobs" if size == "full" else "seconds"
    echo(f"no world at {path}: building it ({took}; set VPGTRANS_HOME to build elsewhere)")
    return build_world(path, progress=echo, config=WorldConfig.preset(size))


@dataclass(frozen=True)
class Epochs:
    """How the world's training data is cut into the demo's epochs."""

    world: Path
    fraction: float
    seed: int
    images: int
    steps: int  # optimiser steps per epoch
    batch_size: int

    def overrides(self, cfg: DemoConfig) -> list[str]:
        """Recipe overrides every arm shares: the epoch's data, evaluation after every epoch, the seed."""
        w = self.world
        return [f"data.train={w / 'data' / 'train.jsonl'}", f"data.val={w / 'data' / 'val.jsonl'}",
                f"model.vision.path={w / 'vit'}", f"data.fraction={self.fraction}", f"data.fraction_seed={self.seed}",
                f"data.max_val_samples={max(cfg.val_samples, cfg.eval_images)}", f"eval.max_samples={cfg.eval_images}",
                f"eval.metrics=[val_loss,{CAPTION_METRIC}]", f"train.batch_size={self.batch_size}",
                f"train.seed={self.seed}", f"train.eval_every={self.steps}", f"train.log_every={self.steps}",
                f"train.save_every={self.steps}"]


def epochs_of(world: Path, cfg: DemoConfig) -> Epochs:
    """The epoch: `epoch_fraction` of the world's training images at the recipe's batch size."""
    from .recipes import load_recipe

    batch = load_recipe(STAGE2_RECIPE).train.batch_size
    images, steps = steps_per_epoch(world / "data" / "train.jsonl", cfg.epoch_fraction, cfg.seed, batch)
    if images < batch:
        raise ConfigError(f"an epoch of {cfg.epoch_fraction:g} of the world's training images is {images} images, "
                          f"fewer than one batch of {batch}", "raise --epoch-fraction (1 on the tiny world)")
    return Epochs(world, cfg.epoch_fraction, cfg.seed, images, steps, batch)


def train_tfs(cfg: DemoConfig, llm: str, ep: Epochs, out: Path, progress: bool,
              echo: Callable[[str], None]) -> dict[str, Any]:
    """BLIP-2 stage 2 from the world's stage-1 Q-Former and a fresh projector on `llm`; its model and curve."""
    from .model import detect_llm_component
    from .recipes import load_recipe
    from .train.runner import run_recipe

    base = load_recipe(STAGE2_RECIPE).train.warmup_steps  # LR warm-up: the recipe's, at most one epoch
    recipe = load_recipe(STAGE2_RECIPE, [
        f"model.llm.name={detect_llm_component(llm)}", f"model.llm.path={llm}", *ep.overrides(cfg),
        f"train.max_steps={cfg.epochs * ep.steps}", f"train.warmup_steps={min(base, ep.steps)}",
        f"train.init_from={ep.world / STAGE1_DIR}"])  # as in the paper: every arm starts from stage 1
    if (out / "model" / "manifest.json").exists():
        run = out / "run.json"
        same = json.dumps(recipe.raw, sort_keys=True, default=str)
        if not run.exists() or json.dumps(json.loads(run.read_text()).get("recipe"), sort_keys=True) != same:
            raise ConfigError(f"{out} holds a model trained with other settings (another --epochs, --epoch-fraction, "
                              "--seed or world, or an older demo)", "pass --force to start over, or another --out")
        echo(f"{out.name}: trained earlier, reused ({out / 'model'})")
    else:
        resume = "latest" if (out / "checkpoints").exists() else None
        run_recipe(recipe, out, resume=resume, force=resume is None, progress=progress, echo=echo)
    return {"model": str(out / "model"), "curve": epoch_curve([out], ep.steps)}


def run_vpgtrans(cfg: DemoConfig, dst: str, source: Path, tfs_best: float, ep: Epochs, out: Path, progress: bool,
                 echo: Callable[[str], None]) -> dict[str, Any]:
    """VPGTrans source → dst on the epoch's data, evaluated every epoch, stopping once it reaches TFS's best."""
    from .recipes import load_recipe
    from .transfer.options import TransferOptions
    from .transfer.race import TransferResult, transfer

    stage2 = load_recipe(STAGE2_RECIPE).train  # fine-tuning follows TFS's schedule, as in the paper
    overrides = [o for o in ep.overrides(cfg) if not o.startswith("data.fraction=")]  # data_fraction says it
    overrides += [f"train.lr={stage2.lr}", f"train.min_lr={stage2.min_lr}"]
    result = transfer(TransferOptions(src=str(source), dst=dst, out=str(out), recipe=TRANSFER_RECIPE,
                                      overrides=tuple(overrides), data_fraction=ep.fraction,
                                      warmup_lr_scale=cfg.warmup_lr_scale, warmup_epochs=1.0,
                                      budget_steps=cfg.epochs * ep.steps, until=f"{CAPTION_METRIC}>={tfs_best:g}",
                                      resume=out.exists(), progress=progress), echo=echo)
    assert isinstance(result, TransferResult)  # not a dry run
    curve = epoch_curve([Path(result.stages[n].dir) for n in ("warmup", "finetune")], ep.steps, ep.batch_size)
    return {"model": result.model_dir, "curve": curve, "warmup_steps": result.stages["warmup"].steps,
            "warmup_lr": result.stages["warmup"].lr, "converter": {k: result.converter.get(k) for k in
                                                                   ("n_pairs", "dst_coverage", "heldout_cosine")}}


def compare_captions(models: dict[str, Path], world: Path, cfg: DemoConfig) -> dict[str, Any]:
    """Caption the first test images with every model; score them (CIDEr, attribute accuracy)."""
    from .checkpoint import load_model
    from .evaluation import load_eval_records, predict, score
    from .interfaces import GenerationConfig

    records = load_eval_records(world / "data" / "test.jsonl", limit=cfg.test_images)
    gen = GenerationConfig(max_new_tokens=30, num_beams=1)
    out: dict[str, Any] = {"n": len(records), "scores": {}, "samples": []}
    predictions = {}
    from .formats import accepting_formats

    out["exports"] = {}
    for name, path in models.items():
        model = load_model(path).eval()
        out["exports"][name] = accepting_formats(model)  # said before a user tries `vpgtrans export` on it
        predictions[name] = predict(model, records, gen_config=gen)
        metrics = score("caption", predictions[name], records)
        out["scores"][name] = {k: round(metrics[k], 4) for k in ("cider", "attribute_accuracy") if k in metrics}
    for i, rec in enumerate(records[:cfg.show]):
        out["samples"].append({"image": str(rec.get("image")), "true": rec["captions"][0],
                               **{name: predictions[name][i] for name in models}})
    return out


def caption_lines(result: dict[str, Any]) -> list[str]:
    """The caption comparison as printable lines."""
    names = list(result["scores"])
    width = max(len(n) for n in ["true caption", *names]) + 2
    lines = []
    for s in result["samples"]:
        lines.append(Path(s["image"]).name)
        lines.append(f"  {'true caption':<{width}}{s['true']}")
        lines += [f"  {n:<{width}}{s[n]}" for n in names]
    lines.append(f"scores on {result['n']} test images (CIDEr 0-10, attribute accuracy 0-1):")
    for n, sc in result["scores"].items():
        lines.append(f"  {n:<{width}}" + "  ".join(f"{k} {v:.3f}" for k, v in sc.items()))
    return lines


def transfer_dir(out: Path, dst: str) -> Path:
    """Where the race on `dst` writes (warmup/, finetune/, scratch/, model/, report.json, curves.png)."""
    return out / "transfer" / _slug(dst)


def _slug(dst: str) -> str:
    return Path(dst.rstrip("/")).name or dst


def _check(cfg: DemoConfig) -> None:
    if cfg.world_size not in ("full", "tiny"):
        raise ConfigError(f"world size '{cfg.world_size}' is unknown", "use full or tiny")
    if not cfg.dst:
        raise ConfigError("no destination LLM given", "pass --dst, e.g. --dst world-opt-m")
    if cfg.src in cfg.dst:
        raise ConfigError(f"--src and --dst are the same LLM ({cfg.src})", "pick another --dst, e.g. world-llama")
    if len({_slug(d) for d in cfg.dst}) != len(cfg.dst):
        raise ConfigError(f"--dst names an LLM twice ({', '.join(cfg.dst)})", "give each destination once")
    if not 0.0 < cfg.epoch_fraction <= 1.0:
        raise ConfigError(f"--epoch-fraction must be in (0, 1], got {cfg.epoch_fraction}", "e.g. --epoch-fraction 0.25")
    if cfg.epochs < 2:
        raise ConfigError(f"--epochs must be at least 2, got {cfg.epochs}", "e.g. --epochs 10 (the paper's)")
    if cfg.eval_images < 1 or cfg.val_samples < 1:
        raise ConfigError(f"--eval-images and val_samples must be at least 1, got {cfg.eval_images} and "
                          f"{cfg.val_samples}", "e.g. --eval-images 64")
    from .names import LLM_ALIASES, missing_error, missing_weights

    # Every LLM is checked before the world is built or the source trained; world models may still be unbuilt.
    wanted = [("--src", cfg.src, LLM_ALIASES), *(("--dst", d, LLM_ALIASES) for d in cfg.dst)]
    for role, name, _ in wanted:
        if name == "world-vit":
            raise ConfigError(f"{role} world-vit is the world's vision encoder, not an LLM",
                              "use world-opt-s, world-opt-m, world-llama or world-flant5")
    missing = [m for m in missing_weights(wanted) if not m[3].startswith("world not built")]
    if missing:
        raise missing_error(missing)


def _check_out(out: Path, force: bool) -> None:
    """Refuse an --out holding the world or foreign files (unless --force); --force then starts over."""
    from .claim import refuse_overlap
    from .paths import world_dir

    refuse_overlap(out, {"world": world_dir()})
    if out.is_dir() and not force and any(out.iterdir()) and \
            not any((out / name).exists() for name in ("demo.json", "source", "transfer")):
        raise ConfigError(f"{out} is not empty and holds no demo run",
                          "choose another --out, or pass --force to delete its contents and start over")
    if force and out.exists():
        shutil.rmtree(out)


def run_demo(out: str | Path = "runs/demo", config: DemoConfig | None = None, *, force: bool = False,
             progress: bool = True, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """World → source VPG → TFS and VPGTrans per epoch on each destination → regime, Table 3, captions."""
    cfg = config or DemoConfig()
    _check(cfg)
    out = Path(out).expanduser()
    from .claim import claim_dir

    with claim_dir(out, echo=echo):  # before anything is written: two demos into one --out cannot both pass
        _check_out(out, force)
        return _run(out, cfg, progress, echo)


def _run(out: Path, cfg: DemoConfig, progress: bool, echo: Callable[[str], None]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    started, timings = time.perf_counter(), {}

    t = _stage(echo, 1, "synthetic world")
    world = ensure_world(cfg.world_size, echo)
    ep = epochs_of(world, cfg)
    timings["world"] = time.perf_counter() - t

    t = _stage(echo, 2, f"train a Q-Former VPG on the source LLM {cfg.src} (BLIP-2 stage 2, {cfg.epochs} epochs of "
                        f"{ep.images} images, {ep.steps} steps each)")
    source = train_tfs(cfg, cfg.src, ep, out / "source", progress, echo)
    timings["source"] = time.perf_counter() - t

    comparisons: dict[str, dict[str, Any]] = {}
    for i, dst in enumerate(cfg.dst, 1):
        which = f" ({i} of {len(cfg.dst)})" if len(cfg.dst) > 1 else ""
        t = _stage(echo, 3, f"the paper's protocol on {dst}{which}: TFS (a VPG trained from the stage-1 Q-Former, "
                            f"{cfg.epochs} epochs), then VPGTrans from {cfg.src} (warm-up epoch, fine-tuning) until it "
                            f"reaches TFS's best {CAPTION_METRIC}; captions scored after every epoch")
        where = transfer_dir(out, dst)
        tfs = train_tfs(cfg, dst, ep, where / "tfs", progress, echo)
        best = best_point(tfs["curve"], CAPTION_METRIC)
        if best is None:
            raise ConfigError(f"TFS on {dst} logged no {CAPTION_METRIC}", "rerun with --force")
        ours = run_vpgtrans(cfg, dst, Path(source["model"]), best[CAPTION_METRIC], ep, where / "vpgtrans",
                            progress, echo)
        comparisons[dst] = {"tfs": tfs, "vpgtrans": ours,
                            "speedup": table3_speedups(tfs["curve"], ours["curve"], [CAPTION_METRIC]),
                            "plot": _plot(where, echo)}
        timings[f"protocol {dst}"] = time.perf_counter() - t

    t = _stage(echo, 4, "captions of test images")
    models = {f"source ({cfg.src})": Path(source["model"])}
    for dst, c in comparisons.items():
        models[f"VPGTrans ({dst})"] = Path(c["vpgtrans"]["model"])
        models[f"TFS ({dst})"] = Path(c["tfs"]["model"])
    captions = compare_captions(models, world, cfg)
    for line in caption_lines(captions):
        echo(line)
    timings["captions"] = time.perf_counter() - t
    timings = {k: round(v, 1) for k, v in timings.items()}
    timings["total"] = round(time.perf_counter() - started, 1)

    summary = {"config": asdict(cfg), "world": str(world), "epoch": {"images": ep.images, "steps": ep.steps,
               "batch_size": ep.batch_size}, "timings_s": timings, "transfers": comparisons, "captions": captions}
    from .checkpoint import atomic_write_text

    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2, default=str))
    echo("")
    for line in _summary_lines(summary, out):
        echo(line)
    return summary


def _plot(where: Path, echo: Callable[[str], None]) -> str | None:
    """TFS and VPGTrans on one samples axis (skipped without the [plot] extra)."""
    from .plot import plot_runs

    try:
        return str(plot_runs([where / "tfs", where / "vpgtrans"], where / "curves.png", x="samples",
                             labels=["TFS", ""]))  # a transfer dir names its own series "VPGTrans"
    except ConfigError as e:  # matplotlib missing: the numbers are in demo.json either way
        echo(f"no curves PNG: {e}")
        return None


def _fmt_epoch(x: float) -> str:
    return f"{x:g}"


def regime_line(c: dict[str, Any]) -> str:
    """The paper's Fig. 3 in one line: what the projector alone reached on the frozen inherited VPG in one epoch."""
    metric = CAPTION_METRIC  # higher is better: the wording and the search below rely on it
    warm = next((p for p in c["vpgtrans"]["curve"] if metric in p), None)
    best = best_point(c["tfs"]["curve"], metric)
    if warm is None or best is None:
        return f"regime: no {metric} logged"
    tfs_there = first_surpassing(c["tfs"]["curve"], metric, warm[metric], higher=True)
    if tfs_there is None:
        when = "above TFS's every epoch"
    elif tfs_there is c["tfs"]["curve"][0] and tfs_there[metric] > warm[metric]:
        when = f"below TFS's first epoch ({tfs_there[metric]:.2f})"
    else:
        when = f"TFS's level after {_fmt_epoch(tfs_there['epoch'])} epoch(s)"
    share = f"{warm[metric] / best[metric]:.0%} of TFS's best" if best[metric] else "TFS scored 0"
    return (f"regime (the paper's Fig. 3): in its warm-up epoch the projector alone, on the frozen inherited VPG, "
            f"reached {metric} {warm[metric]:.2f} = {when}, {share} ({best[metric]:.2f}, epoch "
            f"{_fmt_epoch(best['epoch'])}); the paper's regime: most of the way in one epoch, TFS's best late")


def epoch_table(c: dict[str, Any], metric: str = CAPTION_METRIC) -> list[str]:
    """Per epoch: TFS's and VPGTrans's caption metric (VPGTrans's epoch 1 is its warm-up)."""
    rows: dict[float, dict[str, float]] = {}
    for arm in ("tfs", "vpgtrans"):
        for p in c[arm]["curve"]:
            if metric in p:
                rows.setdefault(p["epoch"], {})[arm] = p[metric]
    lines = [f"{'epoch':>6}  {'TFS ' + metric:>12}  {'VPGTrans ' + metric:>16}"]
    for e in sorted(rows):
        r = rows[e]
        tfs = f"{r['tfs']:>12.3f}" if "tfs" in r else " " * 12
        ours = f"{r['vpgtrans']:>16.3f}" if "vpgtrans" in r else " " * 16
        lines.append(f"{_fmt_epoch(e):>6}  {tfs}  {ours}"
                     + ("  (warm-up: projector alone)" if e == min(rows) and "vpgtrans" in r else ""))
    return lines


def speedup_line(c: dict[str, Any], dst: str, metric: str = CAPTION_METRIC) -> str:
    """Table 3's speed-up on the caption metric, beside the paper's analogous row."""
    s = c["speedup"].get(metric)
    paper = PAPER_ROW.get(dst)
    beside = f" (the paper's {paper[0]}: {paper[1]:g}x)" if paper else ""
    if not s:
        return f"speed-up: no {metric} logged"
    if s["speedup_epochs"] is None:
        return (f"speed-up (Table 3: TFS's epochs to its best ÷ VPGTrans's epochs to reach it): - (VPGTrans never "
                f"reached TFS's best {metric} {s['tfs_best']:.2f} within its epochs){beside}")
    return (f"speed-up (Table 3: TFS's epochs to its best ÷ VPGTrans's epochs to reach it): "
            f"{s['speedup_epochs']:.2f}x — TFS's best {metric} {s['tfs_best']:.2f} at epoch "
            f"{_fmt_epoch(s['tfs_epoch'])}, VPGTrans at epoch {_fmt_epoch(s['vpgtrans_epoch'])}{beside}")


def _summary_lines(summary: dict[str, Any], out: Path) -> list[str]:
    lines = ["== summary"]
    for dst, c in summary["transfers"].items():
        lines.append(f"-- {summary['config']['src']} → {dst}")
        lines.append(regime_line(c))
        lines += epoch_table(c)
        lines.append(speedup_line(c, dst))
        if c.get("plot"):
            lines.append(f"curves: {c['plot']}")
    exports = (summary.get("captions") or {}).get("exports") or {}
    if exports:
        width = max(len(name) for name in exports)
        lines.append("export formats (`vpgtrans export --model DIR --format F`; none: no stock transformers class "
                     "holds the model, keep using its directory):")
        lines += [f"  {name:<{width}}  {', '.join(formats) or 'none'}" for name, formats in exports.items()]
    t = summary["timings_s"]
    lines.append("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()))
    lines.append(f"everything: {out / 'demo.json'}")
    return lines
