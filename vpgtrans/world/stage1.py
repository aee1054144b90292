"""The world's stage-1 Q-Former: BLIP-2 stage 1 (ITC + ITM + ITG, no LLM) on the world's images.

The paper starts every arm — the source VPG, training from scratch (TFS), every transfer — from a Q-Former
that had BLIP-2's stage-1 pre-training; the cheap re-aiming of a frozen VPG at a new LLM that VPGTrans
rests on needs a VPG that has already learned to see. The world ships one, trained with the
`blip2_stage1_world` recipe on the world's ViT and training images, so every demo and benchmark arm
starts from the same Q-Former without training it again. Nothing in it knows about LLMs or transfers:
its only text side is a small Q-Former text encoder over the world-opt-s tokenizer.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import VpgtransError
from .config import WorldConfig

STAGE1_DIR = "qformer-stage1"
STAGE1_RECIPE = "blip2_stage1_world"


def stage1_recipe_identity() -> dict[str, Any]:
    """The stage-1 recipe as the world is built from it: a change to it makes older worlds out of date."""
    from ..recipes import load_recipe

    raw = load_recipe(STAGE1_RECIPE).raw
    # The data paths name wherever the world is; the world build points them into itself anyway.
    data = {k: v for k, v in raw.get("data", {}).items() if k not in ("train", "val")}
    return {"model": raw.get("model"), "train": raw.get("train"), "eval": raw.get("eval"), "data": data}


def stage1_overrides(root: Path, *, steps: int, batch: int, seed: int, work: Path,
                     tokenizer: Path | None = None) -> list[str]:
    """The recipe's world paths pointed into the world at `root`, with its steps, batch, seed and run dir."""
    return [f"data.train={root / 'data' / 'train.jsonl'}", f"data.val={root / 'data' / 'val.jsonl'}",
            f"model.vision.path={root / 'vit'}", f"model.vpg.tokenizer={tokenizer or root / 'opt-s'}",
            f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
            f"train.batch_size={batch}", f"train.eval_every={steps}", f"train.save_every={steps}",
            f"train.log_every={max(1, steps // 10)}", f"train.seed={seed}", f"data.cache_dir={work / 'cache'}"]


def train_stage1(root: str, cfg: WorldConfig, seed: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the stage-1 Q-Former into root/qformer-stage1 (one thread); its recall, time and settings."""
    import torch

    from ..recipes import load_recipe
    from ..train.runner import run_recipe

    torch.set_num_threads(1)  # as every world part: the same weights on every machine
    t, cpu = time.time(), time.process_time()
    root_path = Path(root)
    work = root_path / ".stage1-run"
    recipe = load_recipe(STAGE1_RECIPE, stage1_overrides(
        root_path, steps=cfg.stage1_steps, batch=cfg.stage1_batch, seed=seed, work=work))
    log(f"[world] {STAGE1_DIR}: BLIP-2 stage 1 (ITC + ITM + ITG) on the world ViT, {cfg.stage1_steps} steps "
        f"of {cfg.stage1_batch} images")

    stop = threading.Event()
    watcher = threading.Thread(target=_report_steps, args=(work / "run" / "log.jsonl", cfg.stage1_steps, log, stop),
                               daemon=True)
    watcher.start()
    try:
        # The runner's plan lines are the recipe's business; the world build reports steps from its log instead.
        run = run_recipe(recipe, work / "run", force=True, progress=False, echo=lambda line: None)
    finally:
        stop.set()
        watcher.join()
    trained = work / "run" / "stage1"
    if not (trained / "stage1.json").exists():
        raise VpgtransError(f"stage-1 training wrote no Q-Former into {trained}", "rebuild the world with --force")
    shutil.move(str(trained), str(root_path / STAGE1_DIR))
    shutil.rmtree(work, ignore_errors=True)  # its checkpoints and feature cache are not part of the world
    metrics = (run.get("results") or {}).get("metrics") or {}
    recall = {k: round(float(metrics[k]), 4) for k in ("i2t_r1", "t2i_r1") if k in metrics}
    log(f"[world] {STAGE1_DIR}: val image→text recall@1 {recall.get('i2t_r1', float('nan')):.3f}, "
        f"text→image {recall.get('t2i_r1', float('nan')):.3f} among {recipe.eval.max_samples} "
        f"({time.time() - t:.0f}s)")
    return {"steps": cfg.stage1_steps, "batch_size": cfg.stage1_batch, "recall": recall,
            "seconds": round(time.time() - t, 1), "cpu_seconds": round(time.process_time() - cpu, 1)}


def _report_steps(log_file: Path, total: int, log: Callable[[str], None], stop: threading.Event,
                  every: float = 30.0) -> None:
    """Every `every` seconds, the last logged step and loss: minutes of training must not look hung."""
    t0, last = time.time(), None
    while not stop.wait(every):
        try:
            rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            continue
        row = next((r for r in reversed(rows) if "loss" in r), None)
        if row and row["step"] != last:
            last = row["step"]
            eta = (time.time() - t0) / last * (total - last)
            log(f"  {STAGE1_DIR}    step {last}/{total} loss {row['loss']:.3f} ({time.time() - t0:.0f}s, "
                f"ETA {eta:.0f}s)")
