"""Regime probe (issue 29 item 2): is a world in the paper's regime? One seed, per epoch, CPU, minutes.

    python benchmarks/_regime_probe.py --world DIR [--src opt-s --dst opt-m] [--stage1 DIR] [--out JSON]

Arms, all on cached frozen ViT features, batch 32, one random reference caption per image per epoch:
- source: fresh (or stage-1) Q-Former + projector trained on the source LLM (recipe LR shape: linear warm-up
  1e-6 → lr over 200 steps, cosine to lr/10 over `--src-epochs` epochs);
- only-linear (the paper's Fig. 3 arm): that VPG frozen, a fresh linear projector alone on the destination
  LLM, constant `--lin-scale` × lr (the VPGTrans warm-up LR);
- TFS: a fresh (or stage-1) Q-Former + projector on the destination, the source's schedule over
  `--tfs-epochs` epochs.
Each arm is scored after every epoch (and every half epoch in the first two): val_loss on the first reference
caption of `--val` val images, CIDEr and attribute accuracy of greedy captions on `--cider` val images.
Everything is one seed; the regime line compares only-linear's best within 2 epochs with TFS's best.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

QFORMER = {"name": "qformer", "num_query_tokens": 8, "hidden_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "intermediate_size": 256, "cross_attention_frequency": 1, "dropout": 0.1}


def _records(world: Path, split: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (world / "data" / f"{split}.jsonl").read_text().splitlines()]


def _features(world: Path, records: list[dict[str, Any]], vision: Any) -> torch.Tensor:
    from PIL import Image

    out = []
    with torch.no_grad():
        for start in range(0, len(records), 256):
            imgs = [Image.open(world / "data" / r["image"]).convert("RGB") for r in records[start:start + 256]]
            out.append(vision(vision.preprocess(imgs)))
    return torch.cat(out)


def _spec(world: Path, llm: str, qformer: dict[str, Any]) -> dict[str, Any]:
    return {"vision": {"name": "blip2-vit", "path": str(world / "vit")}, "vpg": dict(qformer),
            "llm": {"path": str(world / llm)}, "template": {"text": "<ImageHere>{instruction}"}}


class Probe:
    """Cached features and records of one world; trains and scores the arms."""

    def __init__(self, world: Path, val: int, n_cider: int, batch: int, max_text_len: int, qformer: dict[str, Any]):
        from vpgtrans.model import build_model

        self.world, self.batch, self.max_text_len, self.qformer = world, batch, max_text_len, qformer
        self.train_recs = _records(world, "train")
        self.val_recs = _records(world, "val")[:max(val, n_cider)]
        key = hashlib.sha256((world / "world.json").read_bytes()).hexdigest()[:16]
        # Beside the probe, never inside the world: a shared world is read-only for everyone but its builder.
        cache = Path("/tmp/vpgtrans-probe-features") / f"{key}-val{len(self.val_recs)}.pt"  # --cider may ask for more
        cache.parent.mkdir(parents=True, exist_ok=True)
        if cache.exists():
            self.train_x, self.val_x = torch.load(cache, weights_only=True)
        else:
            vision = build_model(_spec(world, "opt-s", qformer)).vision
            self.train_x = _features(world, self.train_recs, vision)
            self.val_x = _features(world, self.val_recs, vision)
            torch.save((self.train_x, self.val_x), cache)
        self.val, self.n_cider = val, n_cider

    def model(self, llm: str, seed: int, stage1: str | None = None) -> Any:
        """A fresh model on world LLM `llm` (Q-Former from stage 1 when given)."""
        from vpgtrans.model import build_model
        from vpgtrans.train.stage1 import init_vpg_from_stage1

        torch.manual_seed(seed)
        m = build_model(_spec(self.world, llm, self.qformer))
        if stage1:
            init_vpg_from_stage1(m.vpg, stage1)
        return m

    @torch.no_grad()
    def score(self, m: Any) -> dict[str, float]:
        """val_loss (first reference caption), CIDEr and attribute accuracy of greedy captions."""
        from vpgtrans.evaluation import score
        from vpgtrans.interfaces import GenerationConfig

        was = m.training
        m.eval()
        total, n = 0.0, 0
        for start in range(0, self.val, 64):
            recs = self.val_recs[start:min(self.val, start + 64)]
            samples = [m.template.sample("", r["captions"][0]) for r in recs]
            total += float(m(self.val_x[start:start + len(recs)], samples, max_text_len=self.max_text_len)) * len(recs)
            n += len(recs)
        preds = []
        for start in range(0, self.n_cider, 64):
            k = min(self.n_cider, start + 64) - start
            preds += m.generate(features=self.val_x[start:start + k], prompt="", config=GenerationConfig(max_new_tokens=30))
        s = score("caption", preds, self.val_recs[:self.n_cider])
        m.train(was)
        return {"val_loss": round(total / n, 4), "cider": round(s["cider"], 4),
                "attribute_accuracy": round(s.get("attribute_accuracy", 0.0), 4), "example": preds[0]}

    def train(self, m: Any, name: str, epochs: float, lr: float, *, vpg: bool, schedule: str, seed: int,
              log: Any) -> list[dict[str, Any]]:
        """Train `m` (VPG + projector, or projector alone) for `epochs`; the per-epoch curve."""
        m.set_trainable(vpg=vpg, projector=True)
        m.train()
        if not vpg:
            m.vpg.eval()  # a frozen VPG is a fixed feature extractor: no dropout
        params = [p for p in m.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        rest = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.98))
        per_epoch = len(self.train_recs) // self.batch
        total = int(round(epochs * per_epoch))
        warm = 200

        def factor(step: int) -> float:
            if schedule == "constant":
                return 1.0
            if step < warm:
                return (1e-6 + (lr - 1e-6) * step / warm) / lr
            t = min(1.0, (step - warm) / max(1, total - warm))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        marks = sorted({int(round(e * per_epoch)) for e in [0.5, 1.0, 1.5, 2.0] + list(range(3, int(epochs) + 1))
                        if e * per_epoch <= total} | {total})
        rng = random.Random(seed)
        curve = [{"epoch": 0.0, "step": 0, **self.score(m)}]
        log(f"  {name} epoch 0.00: {curve[-1]}")
        t0, step, losses = time.time(), 0, []
        while step < total:
            order = list(range(len(self.train_recs)))
            rng.shuffle(order)
            for start in range(0, per_epoch * self.batch, self.batch):
                if step >= total:
                    break
                idx = order[start:start + self.batch]
                samples = [m.template.sample("", rng.choice(self.train_recs[i]["captions"])) for i in idx]
                loss = m(self.train_x[idx], samples, max_text_len=self.max_text_len)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                step += 1
                if step in marks:
                    row = {"epoch": round(step / per_epoch, 2), "step": step, "train_loss": round(
                        sum(losses[-50:]) / len(losses[-50:]), 4), **self.score(m), "seconds": round(time.time() - t0, 1)}
                    if not vpg:
                        m.vpg.eval()
                    curve.append(row)
                    log(f"  {name} epoch {row['epoch']:.2f}: " + json.dumps(row))
        return curve


def regime(lin: list[dict[str, Any]], tfs: list[dict[str, Any]]) -> dict[str, Any]:
    """Only-linear's best within 2 epochs against TFS's best, and the epoch at which TFS reached its best."""
    out: dict[str, Any] = {}
    for metric, better in (("val_loss", min), ("cider", max), ("attribute_accuracy", max)):
        tfs_best = better(tfs, key=lambda r: r[metric])
        lin2 = better([r for r in lin if r["epoch"] <= 2.0], key=lambda r: r[metric])
        # epochs TFS needs to get within 2% of its own best: how long the destination takes to learn to see
        near = next(r for r in tfs if (r[metric] <= tfs_best[metric] * 1.02 if better is min
                                       else r[metric] >= tfs_best[metric] * 0.98))
        gap = (lin2[metric] / tfs_best[metric] - 1) if better is min else (1 - lin2[metric] / max(tfs_best[metric], 1e-9))
        out[metric] = {"tfs_best": tfs_best[metric], "tfs_best_epoch": tfs_best["epoch"],
                       "tfs_within_2pct_epoch": near["epoch"], "only_linear_best_2ep": lin2[metric],
                       "only_linear_epoch": lin2["epoch"], "only_linear_shortfall": round(gap, 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the probe and write its JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--src", default="opt-s")
    ap.add_argument("--dst", default="opt-m")
    ap.add_argument("--stage1", default=None, help="stage-1 Q-Former dir: every arm's Q-Former starts from it")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lin-scale", type=float, default=5.0)
    ap.add_argument("--src-epochs", type=float, default=10)
    ap.add_argument("--tfs-epochs", type=float, default=10)
    ap.add_argument("--lin-epochs", type=float, default=3)
    ap.add_argument("--val", type=int, default=128)
    ap.add_argument("--cider", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default="source,linear,tfs", help="any of source, linear, self (only-linear back "
                    "onto the source LLM: the control), tfs")
    ap.add_argument("--queries", type=int, default=QFORMER["num_query_tokens"], help="Q-Former query tokens")
    ap.add_argument("--source-ckpt", type=Path, default=None, help="reuse/save the source VPG+projector here")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    log = lambda s: print(s, flush=True)  # noqa: E731
    probe = Probe(a.world, a.val, a.cider, a.batch, 32, {**QFORMER, "num_query_tokens": a.queries})
    log(f"features ready ({time.time() - t0:.0f}s): train {tuple(probe.train_x.shape)}")
    arms = a.arms.split(",")
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}, "world": str(a.world)}
    src = probe.model(a.src, a.seed, a.stage1)
    ckpt = a.source_ckpt
    if ckpt and ckpt.exists():
        src.load_state_dict(torch.load(ckpt, weights_only=True), strict=False)
        result["source"] = json.loads(ckpt.with_suffix(".json").read_text())
        log(f"source from {ckpt}")
    elif {"source", "linear", "self"} & set(arms):
        result["source"] = probe.train(src, "source", a.src_epochs, a.lr, vpg=True, schedule="cosine", seed=a.seed,
                                       log=log)
        if ckpt:
            torch.save({k: v for k, v in src.state_dict().items() if k.startswith(("vpg.", "projector."))}, ckpt)
            ckpt.with_suffix(".json").write_text(json.dumps(result["source"]))
    if "linear" in arms:
        dst = probe.model(a.dst, a.seed + 1)
        dst.vpg.load_state_dict(src.vpg.state_dict())
        result["only_linear"] = probe.train(dst, "only-linear", a.lin_epochs, a.lr * a.lin_scale, vpg=False,
                                            schedule="constant", seed=a.seed, log=log)
    if "self" in arms:
        own = probe.model(a.src, a.seed + 3)
        own.vpg.load_state_dict(src.vpg.state_dict())
        result["only_linear_self"] = probe.train(own, "only-linear-self", a.lin_epochs, a.lr * a.lin_scale, vpg=False,
                                                 schedule="constant", seed=a.seed, log=log)
    if "tfs" in arms:
        tfs = probe.model(a.dst, a.seed + 2, a.stage1)
        result["tfs"] = probe.train(tfs, "tfs", a.tfs_epochs, a.lr, vpg=True, schedule="cosine", seed=a.seed, log=log)
    if "only_linear" in result and "tfs" in result:
        result["regime"] = regime(result["only_linear"], result["tfs"])
        log("regime: " + json.dumps(result["regime"]))
    result["seconds"] = round(time.time() - t0, 1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
