"""Rendering scenes to small RGB images (PIL, 2x supersampled) plus a per-pixel object mask."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .scene import COLORS, SIZES

SUPERSAMPLE = 2


def _polygon(cx: float, cy: float, radii: list[float], angles: list[float]) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)]


def _regular(cx: float, cy: float, r: float, n: int, start: float) -> list[tuple[float, float]]:
    return _polygon(cx, cy, [r] * n, [start + 2 * math.pi * k / n for k in range(n)])


def _shape_points(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of a shape; None for the ellipse-drawn shapes."""
    if shape == "square":
        return _regular(cx, cy, r * 1.05, 4, math.pi / 4 + rot)
    if shape == "triangle":
        return _regular(cx, cy, r * 1.15, 3, -math.pi / 2 + rot)
    if shape == "diamond":  # a tall rhombus, so it never looks like a rotated square
        return _polygon(cx, cy, [r * 1.15, r * 0.65, r * 1.15, r * 0.65],
                        [-math.pi / 2 + rot, rot, math.pi / 2 + rot, math.pi + rot])
    if shape == "hexagon":
        return _regular(cx, cy, r, 6, rot)
    if shape == "star":
        angles = [-math.pi / 2 + rot + math.pi * k / 5 for k in range(10)]
        return _polygon(cx, cy, [r * 1.2 if k % 2 == 0 else r * 0.5 for k in range(10)], angles)
    if shape == "cross":
        t, pts = 0.36, []
        # A plus sign as a 12-gon: corners of the two bars, walked around the outline.
        for x, y in [(t, 1), (t, t), (1, t), (1, -t), (t, -t), (t, -1), (-t, -1), (-t, -t), (-1, -t), (-1, t),
                     (-t, t), (-t, 1)]:
            a, d = math.atan2(y, x) + rot, math.hypot(x, y) * r
            pts.append((cx + d * math.cos(a), cy + d * math.sin(a)))
        return pts
    return _extra_shape_points(shape, cx, cy, r, rot)


def _rotated(cx: float, cy: float, r: float, rot: float, unit: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """`unit` outline points (in radii, x right, y down) scaled by r, turned by rot, moved to (cx, cy)."""
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in unit]


def _extra_shape_points(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]] | None:
    """The shapes past the first 8 (worlds with num_shapes > 8); none reaches further out than the star (1.2 r)."""
    if shape == "pentagon":
        return _regular(cx, cy, r * 1.08, 5, -math.pi / 2 + rot)
    if shape == "semicircle":  # flat side down, moved so its area centre sits on the cell centre
        arc = [(1.2 * math.cos(a), 0.5 - 1.2 * math.sin(a)) for a in (math.pi * k / 12 for k in range(13))]
        return _rotated(cx, cy, r, rot, arc)
    if shape == "crescent":  # a thick "C" opening to the right
        angles = [0.3 * math.pi + 1.4 * math.pi * k / 14 for k in range(15)]
        outer = [(1.15 * math.cos(a), 1.15 * math.sin(a)) for a in angles]
        inner = [(0.25 + 0.75 * math.cos(a), 0.75 * math.sin(a)) for a in reversed(angles)]
        return _rotated(cx, cy, r, rot, outer + inner)
    if shape == "bar":
        return _rotated(cx, cy, r, rot, [(-1.2, -0.4), (1.2, -0.4), (1.2, 0.4), (-1.2, 0.4)])
    if shape == "trapezoid":
        return _rotated(cx, cy, r, rot, [(-1.15, 0.7), (1.15, 0.7), (0.55, -0.7), (-0.55, -0.7)])
    if shape == "arrow":
        return _rotated(cx, cy, r, rot, [(-1.15, -0.3), (0.1, -0.3), (0.1, -0.8), (1.15, 0.0), (0.1, 0.8),
                                         (0.1, 0.3), (-1.15, 0.3)])
    if shape == "frame":  # a square outline: outer corners, then the inner ones back (one simple polygon)
        o, i = 1.0, 0.55
        return _rotated(cx, cy, r, rot, [(-o, -o), (o, -o), (o, o), (-o, o), (-o, -o), (-i, -i), (-i, i), (i, i),
                                         (i, -i), (-i, -i)])
    return None


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, fill: Any) -> None:
    pts = _shape_points(shape, cx, cy, r, rot)
    if pts is not None:
        draw.polygon(pts, fill=fill)
    elif shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "oval":
        draw.ellipse([cx - r * 1.2, cy - r * 0.68, cx + r * 1.2, cy + r * 0.68], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r * 1.05, cy - r * 1.05, cx + r * 1.05, cy + r * 1.05], outline=fill,
                     width=max(2, int(round(r * 0.38))))
    else:  # pragma: no cover - guarded by the vocabulary
        raise ValueError(f"unknown shape {shape}")


def render(scene: dict[str, Any], rng: random.Random, size: int, jitter: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 [size, size, 3] image and uint8 [size, size] mask (0 = background, k = object k-1)."""
    big = size * SUPERSAMPLE
    level = rng.randint(15, 70)
    img = Image.new("RGB", (big, big), tuple(max(0, level + rng.randint(-12, 12)) for _ in range(3)))
    mask = Image.new("L", (big, big), 0)
    d_img, d_mask = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    cell = big / 3
    for k, obj in enumerate(scene["objects"]):
        cx = (obj["col"] + 0.5) * cell + rng.uniform(-jitter, jitter) * cell
        cy = (obj["row"] + 0.5) * cell + rng.uniform(-jitter, jitter) * cell
        r = SIZES[obj["size"]] * big * rng.uniform(0.92, 1.08)
        rot = rng.uniform(-0.25, 0.25)
        color = tuple(min(255, max(0, c + rng.randint(-14, 14))) for c in COLORS[obj["color"]])
        _draw(d_img, obj["shape"], cx, cy, r, rot, color)
        _draw(d_mask, obj["shape"], cx, cy, r, rot, k + 1)
    small = np.asarray(img.resize((size, size), Image.BOX), dtype=np.int16)
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, 5.0, size=small.shape)
    pixels = np.clip(small + noise, 0, 255).astype(np.uint8)
    return pixels, np.asarray(mask.resize((size, size), Image.NEAREST), dtype=np.uint8)


def patch_owner(mask: np.ndarray, patch: int, min_share: float = 0.2) -> np.ndarray:
    """Per-patch object id (0 = background): the object covering most of the patch, if >= min_share."""
    h, w = mask.shape
    gh, gw = h // patch, w // patch
    blocks = mask[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).transpose(0, 2, 1, 3).reshape(gh, gw, -1)
    counts = np.stack([(blocks == k).sum(-1) for k in range(1, 4)], axis=-1)
    best = counts.argmax(-1)
    share = counts.max(-1) / float(patch * patch)
    return np.where(share >= min_share, best + 1, 0).astype(np.int64)
