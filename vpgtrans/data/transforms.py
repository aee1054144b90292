"""The official training-time image transform (LAVIS `blip2_image_train`) and the eval transform, in PIL.

BLIP-2, VPGTrans and MiniGPT-4 train on `RandomResizedCrop(size, scale=(0.5, 1.0), bicubic)` then
`RandomHorizontalFlip()`, and evaluate on a plain bicubic resize. torchvision cannot be imported beside the
CPU torch wheel these machines carry, so the crop is torchvision's procedure re-implemented on PIL (ten tries at a
random area and a log-uniform aspect ratio, else a centre crop), then PIL's bicubic resize — drawn from Python's
`random`, so the same distribution as torchvision's, not the same numbers.
Each image's draws come from its own `random.Random`, seeded by the caller from (seed, epoch, sample), so a
resumed run crops every image as the uninterrupted one did and no global RNG moves.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

# LAVIS BlipImageTrainProcessor's defaults (min_scale 0.5, max_scale 1.0) and torchvision's aspect-ratio range.
OFFICIAL_SCALE = (0.5, 1.0)
OFFICIAL_RATIO = (3 / 4, 4 / 3)


def crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float] = OFFICIAL_SCALE,
             ratio: tuple[float, float] = OFFICIAL_RATIO) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random resized crop, drawn as torchvision's `RandomResizedCrop.get_params`."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # Fallback after ten misses (very elongated images): the largest centre crop within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclass(frozen=True)
class TrainTransform:
    """Random resized crop (bicubic) to `size`, then a horizontal flip with probability 1/2 unless `flip` is off."""

    size: tuple[int, int]  # (height, width), the vision encoder's input
    scale: tuple[float, float] = OFFICIAL_SCALE
    flip: bool = True

    def __call__(self, image: Any, rng: random.Random) -> Any:
        """The transformed RGB PIL image (same size as the encoder's input, so its own resize is a no-op)."""
        from PIL import Image

        left, top, w, h = crop_box(image.width, image.height, rng, self.scale)
        out = image.crop((left, top, left + w, top + h)).resize((self.size[1], self.size[0]), Image.BICUBIC)
        # The draw happens even with the flip off, so switching it off changes no crop of any image.
        if rng.random() < 0.5 and self.flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return out


def input_size(vision: Any, fallback: tuple[int, int] | None = None) -> tuple[int, int]:
    """(height, width) the vision encoder's preprocess produces; its `input_hw`, else its `image_size`."""
    hw = getattr(vision, "input_hw", None)
    if hw:
        return int(hw[0]), int(hw[1])
    size = getattr(vision, "image_size", None)
    if size:
        return int(size), int(size)
    if fallback is None:
        from ..errors import ConfigError

        raise ConfigError(f"the vision encoder {type(vision).__name__} does not say its input size",
                          "set data.augment=false (the encoder's own preprocessing only)")
    return fallback


def train_transform(vision: Any, config: Any) -> TrainTransform | None:
    """The recipe's train transform for `vision`, or None when `data.augment` is off."""
    if not getattr(config, "augment", False):
        return None
    lo, hi = (float(v) for v in config.crop_scale)
    return TrainTransform(input_size(vision), (lo, hi), bool(config.flip))
