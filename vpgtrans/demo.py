"""`vpgtrans demo`: the paper's story on the synthetic world, in one command, well under 15 minutes on 2 CPU cores.

world (built if absent) → BLIP-2 stage 2 on a source LLM → on each destination LLM (by default the paper's two
kinds of transfer: across size, OPT-s → OPT-m, and across type, OPT-s → FlanT5), the paper's protocol at demo
scale: a VPG trained from scratch on all the training data until its validation loss plateaus, then VPGTrans on
10.7% of the data (converter-merged projector, one warm-up epoch at 5x LR, fine-tuning) until it matches scratch's
best → speed-up table per destination, captions next to the truth, curves PNG.
Every stage keeps its outputs under ``--out``: a second run continues where the first stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .config import help_field
from .errors import ConfigError

if TYPE_CHECKING:
    from .transfer.race import TransferResult

STEPS = ("world", "source", "transfer", "captions")
# Size first (the paper's headline, OPT-2.7B → 6.7B), then type: the benchmark's size pair matches scratch on 1 seed
# of 3, its FlanT5 pair on 3 of 3 (README, Benchmarks → Transfer efficiency); either race alone tells half the story.
DEFAULT_DST = ["world-opt-m", "world-flant5"]


@dataclass
class DemoConfig:
    """What the demo trains; the defaults fit ~15 minutes on a 2-core CPU, world build included."""

    src: str = help_field("world-opt-s", help="LLM the source VPG is trained on")
    dst: list[str] = help_field(DEFAULT_DST, help="LLMs the VPG is transferred to, one race each (the paper's "
                                                  "size transfer to a larger OPT, then a type transfer to FlanT5)")
    source_steps: int = help_field(600, help="BLIP-2 stage-2 steps on the source LLM")
    steps: int = help_field(400, help="step cap of the scratch run (it stops earlier at its plateau, for the "
                                      "speed-up) and of VPGTrans's fine-tuning")
    data_fraction: float = help_field(0.107, help="share of the training data VPGTrans sees (the paper: 10.7%); "
                                                  "scratch sees all of it")
    lr: float = help_field(5e-4, help="peak learning rate, cosine to half of it (the warm-up runs at "
                                      "warmup_lr_scale x this)")
    warmup_lr_scale: float = help_field(5.0, help="warm-up LR = this x lr: the paper's 5 (lr is already 5x the "
                                                  "recipe's, so the world recipe's own 25x is not applied again)")
    eval_every: int = help_field(50, help="validation loss every N steps (the speed-up is read off these)")
    val_samples: int = help_field(128, help="validation captions per evaluation")
    test_images: int = help_field(64, help="test images captioned to score the final models (CIDEr, attributes)")
    show: int = help_field(4, help="test images whose captions are printed")
    seed: int = help_field(0, help="training seed")
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
        echo(f"using the world at {path} (seed {manifest.get('seed')}, built in {manifest.get('build_seconds')}s)")
        return path
    took = "7-15 minutes on a 2-core CPU, longer beside other jobs" if size == "full" else "seconds"
    echo(f"no world at {path}: building it ({took}; set VPGTRANS_HOME to build elsewhere)")
    return build_world(path, progress=echo, config=WorldConfig.preset(size))


def _eval_overrides(cfg: DemoConfig) -> list[str]:
    return [f"train.lr={cfg.lr}", f"train.min_lr={cfg.lr / 2}", f"train.eval_every={cfg.eval_every}",
            "eval.metrics=[val_loss]",
            f"data.max_val_samples={cfg.val_samples}", f"train.seed={cfg.seed}"]


def train_source(cfg: DemoConfig, out: Path, progress: bool, echo: Callable[[str], None]) -> Path:
    """BLIP-2 stage 2 (Q-Former + projector) on the source LLM; returns its model dir."""
    from .model import detect_llm_component
    from .recipes import load_recipe
    from .train.runner import run_recipe

    model_dir = out / "model"
    if model_dir.exists():
        echo(f"source model already trained: {model_dir}")
        return model_dir
    recipe = load_recipe("blip2_stage2_world", [
        f"model.llm.name={detect_llm_component(cfg.src)}", f"model.llm.path={cfg.src}",
        f"train.max_steps={cfg.source_steps}",
        f"train.warmup_steps={max(1, cfg.source_steps // 12)}", f"train.save_every={cfg.source_steps}",
        *_eval_overrides(cfg)])
    resume = "latest" if (out / "checkpoints").exists() else None
    run_recipe(recipe, out, resume=resume, force=resume is None, progress=progress, echo=echo)
    return model_dir


def run_transfer(cfg: DemoConfig, dst: str, source: Path, out: Path, progress: bool,
                 echo: Callable[[str], None]) -> TransferResult:
    """Scratch to its plateau on all the data, then VPGTrans source → dst on `data_fraction` until it matches."""
    from .transfer.options import TransferOptions
    from .transfer.race import TransferResult, transfer

    overrides = (f"train.max_steps={cfg.steps}", f"train.save_every={cfg.steps}", f"data.fraction={cfg.data_fraction}",
                 *_eval_overrides(cfg))
    result = transfer(TransferOptions(src=str(source), dst=dst, out=str(out), compare_scratch=True,
                                      warmup_lr_scale=cfg.warmup_lr_scale, overrides=overrides,
                                      recipe="vpgtrans_world", resume=out.exists(),
                                      progress=progress), echo=echo)
    assert isinstance(result, TransferResult)  # not a dry run
    return result


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
    if not 0.0 < cfg.data_fraction <= 1.0:
        raise ConfigError(f"--data-fraction must be in (0, 1], got {cfg.data_fraction}", "e.g. --data-fraction 0.107")
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
    """World → source VPG → VPGTrans vs scratch on each destination → tables, captions, PNGs; writes demo.json."""
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
    timings["world"] = time.perf_counter() - t

    t = _stage(echo, 2, f"train a Q-Former VPG on the source LLM {cfg.src} (BLIP-2 stage 2, {cfg.source_steps} steps)")
    source = train_source(cfg, out / "source", progress, echo)
    timings["source"] = time.perf_counter() - t

    races: dict[str, dict[str, Any]] = {}
    for i, dst in enumerate(cfg.dst, 1):
        which = f" ({i} of {len(cfg.dst)})" if len(cfg.dst) > 1 else ""
        t = _stage(echo, 3, f"the paper's protocol on {dst}{which}: a VPG from scratch on 100% of the data until its "
                            f"val_loss plateaus, then VPGTrans from {cfg.src} on {cfg.data_fraction:.1%} of the data "
                            "until it matches scratch's best")
        where = transfer_dir(out, dst)
        report = run_transfer(cfg, dst, source, where, progress, echo).to_json()
        timings[f"transfer {dst}"] = time.perf_counter() - t
        races[dst] = {"speedup": report.get("speedup"), "scratch": report.get("scratch"),
                      "stages": report.get("stages"), "catch_up": report.get("catch_up"),
                      "converter": {k: report["converter"].get(k)
                                    for k in ("n_pairs", "dst_coverage", "heldout_cosine")},
                      "plot": report.get("plot"), "report": str(where / "report.json")}

    t = _stage(echo, 4, "captions of test images")
    models = {f"source ({cfg.src})": source}
    for dst in cfg.dst:
        models[f"VPGTrans ({dst})"] = transfer_dir(out, dst) / "model"
        models[f"scratch ({dst})"] = transfer_dir(out, dst) / "scratch" / "model"
    captions = compare_captions(models, world, cfg)
    for line in caption_lines(captions):
        echo(line)
    timings["captions"] = time.perf_counter() - t
    timings = {k: round(v, 1) for k, v in timings.items()}
    timings["total"] = round(time.perf_counter() - started, 1)

    summary = {"config": asdict(cfg), "world": str(world), "timings_s": timings, "transfers": races,
               "captions": captions}
    from .checkpoint import atomic_write_text

    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2, default=str))
    echo("")
    for line in _summary_lines(summary, out):
        echo(line)
    return summary


def _summary_lines(summary: dict[str, Any], out: Path) -> list[str]:
    from .transfer.report import catch_up_lines, table

    lines = ["== summary"]
    for dst, race in summary["transfers"].items():
        lines.append(f"-- {summary['config']['src']} → {dst}")
        speed = race.get("speedup") or {}
        if "error" not in speed and speed:
            lines += table(speed)
            lines += _story(summary["config"], dst, race)
            lines += catch_up_lines(race.get("catch_up") or [], speed["metric"])
        else:
            lines.append(f"no speed-up figure: {speed.get('error', 'no evaluations logged')}")
        if race.get("plot"):
            lines.append(f"curves: {race['plot']}")
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


def _story(cfg: dict[str, Any], dst: str, race: dict[str, Any]) -> list[str]:
    """The speed-up in words: what scratch needed, what VPGTrans needed, warm-up and converter fit included."""
    speed, scratch = race["speedup"], race.get("scratch") or {}
    warm = ((race.get("stages") or {}).get("warmup") or {}).get("steps")
    plateau = scratch.get("plateau_step")
    lines = [f"scratch ({dst}, 100% of the data) reached its best at step {speed['scratch']['step']}"
             + (f" and plateaued at step {plateau}" if plateau else
                f" (no plateau within its {scratch.get('steps') or cfg['steps']}-step cap)")]
    ours = speed.get("vpgtrans")
    if ours:
        lines.append(f"VPGTrans ({cfg['src']} → {dst}, {cfg['data_fraction']:.1%} of the data) matched it at "
                     f"step {ours['step']} ({warm} of them the warm-up epoch): {speed['speedup_samples']:.2f}x fewer "
                     f"samples, {speed['speedup_wall_time']:.2f}x less wall time (converter fit included)")
    else:
        lines.append(f"VPGTrans did not reach scratch's best within {cfg['steps']} fine-tuning steps")
    return lines
