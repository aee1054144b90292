"""Opening images safely and turning every PIL mode into 8-bit RGB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import DataError


def to_rgb(img: Any) -> Any:
    """8-bit RGB view of a PIL image of any mode (alpha composited on white, 16-bit rescaled)."""
    import numpy as np
    from PIL import Image

    if not isinstance(img, Image.Image):
        raise DataError(f"expected a PIL image, got {type(img).__name__}", "pass PIL.Image objects or file paths")
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grey: stretch to 8 bits instead of letting PIL clip everything to white.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def open_image(path: str | Path) -> Any:
    """Open and fully decode an image file, raising a one-line DataError when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise DataError(f"image not found: {path}", "check the path or the image root directory")
    if path.stat().st_size == 0:
        raise DataError(f"image file is empty (0 bytes): {path}", "re-download or remove it from the annotations")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image is corrupt or not an image: {path} ({exc})",
                        "re-download it, or pass --skip-bad-samples to skip broken images") from None
