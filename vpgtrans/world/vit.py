"""The world's frozen vision encoder: a tiny `Blip2VisionModel`, pretrained briefly on the world.

Pretraining heads (discarded afterwards) make the features carry the content a VPG needs:
every patch token predicts the colour, shape and size of the object covering it (or background),
and the CLS token predicts the object count and which colours and shapes are present.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .config import WorldConfig
from .render import patch_owner
from .scene import vocabulary

# OpenAI CLIP statistics, what BLIP-2's image processor uses.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
ATTRS = ("color", "shape", "size")


def make_vit(cfg: WorldConfig) -> Any:
    """A freshly initialised Blip2VisionModel for the world's image size."""
    from transformers import Blip2VisionConfig, Blip2VisionModel

    heads = max(1, cfg.vit_hidden // 32)
    return Blip2VisionModel(Blip2VisionConfig(
        image_size=cfg.image_size, patch_size=cfg.vit_patch, hidden_size=cfg.vit_hidden,
        intermediate_size=cfg.vit_hidden * 4, num_hidden_layers=cfg.vit_layers, num_attention_heads=heads,
        attention_dropout=0.0, qkv_bias=True, layer_norm_eps=1e-6))


def preprocessor_config(cfg: WorldConfig) -> dict[str, Any]:
    """What `AutoImageProcessor` (BlipImageProcessor) and our own preprocessing read."""
    return {"image_processor_type": "BlipImageProcessor", "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD,
            "size": {"height": cfg.image_size, "width": cfg.image_size}, "do_resize": True, "resample": 3,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True}


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] → normalised float [N, 3, H, W], exactly as the preprocessor config says."""
    x = torch.from_numpy(images).float().div_(255.0).permute(0, 3, 1, 2)
    return (x - torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGE_STD).view(1, 3, 1, 1)


def labels_for(scenes: list[dict[str, Any]], masks: np.ndarray, cfg: WorldConfig) -> dict[str, np.ndarray]:
    """Pretraining targets: per-patch attributes (0 = background), count, multi-hot colours/shapes."""
    voc = vocabulary(cfg)
    index = {a: {v: i + 1 for i, v in enumerate(voc[a + "s"])} for a in ATTRS}
    n = len(scenes)
    grid = cfg.image_size // cfg.vit_patch
    out = {f"patch_{a}": np.zeros((n, grid * grid), np.int64) for a in ATTRS}
    out.update({f"has_{a}": np.zeros((n, len(voc[a + "s"])), np.float32) for a in ("color", "shape")})
    out["count"] = np.zeros(n, np.int64)
    for i, (scene, mask) in enumerate(zip(scenes, masks)):
        owner = patch_owner(mask, cfg.vit_patch).reshape(-1)
        out["count"][i] = scene["count"] - 1
        for k, obj in enumerate(scene["objects"]):
            for a in ATTRS:
                out[f"patch_{a}"][i][owner == k + 1] = index[a][obj[a]]
                if a != "size":
                    out[f"has_{a}"][i, index[a][obj[a]] - 1] = 1.0
    return out


class _Heads(nn.Module):
    def __init__(self, hidden: int, cfg: WorldConfig):
        super().__init__()
        voc = vocabulary(cfg)
        self.sizes = {a: len(voc[a + "s"]) + 1 for a in ATTRS}
        self.patch = nn.ModuleDict({a: nn.Linear(hidden, k) for a, k in self.sizes.items()})
        self.has = nn.ModuleDict({a: nn.Linear(hidden, self.sizes[a] - 1) for a in ("color", "shape")})
        self.count = nn.Linear(hidden, 3)

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        cls, patches = feats[:, 0], feats[:, 1:]
        out = {f"patch_{a}": head(patches) for a, head in self.patch.items()}
        out.update({f"has_{a}": head(cls) for a, head in self.has.items()})
        out["count"] = self.count(cls)
        return out


def _loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    total = torch.zeros(())
    for k, v in logits.items():
        if k.startswith("has_"):
            total = total + nn.functional.binary_cross_entropy_with_logits(v, labels[k])
        else:
            total = total + nn.functional.cross_entropy(v.reshape(-1, v.shape[-1]), labels[k].reshape(-1))
    return total


def pretrain_vit(cfg: WorldConfig, seed: int, images: np.ndarray, labels: dict[str, np.ndarray],
                 log: Callable[[str], None]) -> tuple[Any, nn.Module]:
    """Train the ViT + throwaway heads with AdamW; returns both (eval mode)."""
    torch.manual_seed(seed)
    vit = make_vit(cfg)
    heads = _Heads(cfg.vit_hidden, cfg)
    params = list(vit.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vit_lr, weight_decay=0.05)
    steps, warm = cfg.vit_steps, max(1, cfg.vit_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(seed)
    lab = {k: torch.from_numpy(v) for k, v in labels.items()}
    vit.train()
    t0, recent, last = time.time(), [], time.time()
    perm = torch.randperm(len(images), generator=gen)
    for step in range(steps):
        start = (step * cfg.vit_batch) % len(images)
        idx = perm[start:start + cfg.vit_batch]
        if len(idx) < cfg.vit_batch:  # wrapped around: reshuffle for the next pass
            perm = torch.randperm(len(images), generator=gen)
            idx = torch.cat([idx, perm[: cfg.vit_batch - len(idx)]])
        feats = vit(pixel_values=to_pixels(images[idx.numpy()])).last_hidden_state
        loss = _loss(heads(feats), {k: v[idx] for k, v in lab.items()})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        recent.append(loss.item())
        # At least every 30 s (a slow, busy machine must not look hung), with an ETA from the speed so far.
        now = time.time()
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps or now - last >= 30:
            last, eta = now, (now - t0) / (step + 1) * (steps - step - 1)
            log(f"    step {step + 1}/{steps} loss {np.mean(recent[-20:]):.3f} ({now - t0:.0f}s, ETA {eta:.0f}s)")
    vit.eval()
    return vit, heads.eval()


@torch.no_grad()
def probe_accuracy(vit: Any, heads: nn.Module, images: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Held-out accuracy of the pretraining heads (object patches only; `object_*`: majority vote per object)."""
    correct: dict[str, list[float]] = {}
    for start in range(0, len(images), 128):
        logits = heads(vit(pixel_values=to_pixels(images[start:start + 128])).last_hidden_state)
        for k, v in logits.items():
            y = torch.from_numpy(labels[k][start:start + 128])
            if k.startswith("has_"):  # exact set of colours / shapes
                correct.setdefault(k, []).extend(((v > 0).float() == y).all(-1).float().tolist())
                continue
            keep = y > 0 if k != "count" else torch.ones_like(y, dtype=torch.bool)
            correct.setdefault(k, []).extend((v.argmax(-1)[keep] == y[keep]).float().tolist())
            if k.startswith("patch_"):  # per object: majority vote of its patches (colours are unique per image)
                objects = torch.from_numpy(labels["patch_color"][start:start + 128])
                pred = v.argmax(-1)
                for i in range(len(y)):
                    for c in objects[i].unique().tolist():
                        if c:
                            sel = objects[i] == c
                            vote = torch.mode(pred[i][sel]).values
                            correct.setdefault("object_" + k[6:], []).append(float(vote == y[i][sel][0]))
    return {k: round(float(np.mean(v)), 4) if v else 0.0 for k, v in correct.items()}


def save_vit(vit: Any, cfg: WorldConfig, out: Path) -> None:
    """save_pretrained + preprocessor_config.json."""
    vit.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(cfg), indent=2) + "\n")
