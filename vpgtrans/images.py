"""Opening images safely and turning every PIL mode into 8-bit RGB."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

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


# Decoded pixels allowed per image: well below Pillow's decompression-bomb limit (~89 MP), so a batch of large
# images cannot take gigabytes. JPEGs above it are decoded at a reduced scale (Image.draft); others are refused.
DEFAULT_MAX_PIXELS = 50_000_000
MAX_PIXELS_ENV = "VPGTRANS_MAX_IMAGE_PIXELS"


def max_pixels() -> int:
    """The decoded-pixel cap: $VPGTRANS_MAX_IMAGE_PIXELS, else DEFAULT_MAX_PIXELS."""
    import os

    raw = os.environ.get(MAX_PIXELS_ENV, "")
    try:
        value = int(float(raw)) if raw else DEFAULT_MAX_PIXELS
    except ValueError:
        raise DataError(f"{MAX_PIXELS_ENV}={raw!r} is not a number", "set it to a pixel count, e.g. 50000000") from None
    return value if value > 0 else DEFAULT_MAX_PIXELS


def decode_image(source: str | Path | IO[bytes], where: str, fix: str) -> Any:
    """Decode an image file or stream to 8-bit RGB with at most `max_pixels()` pixels; DataError otherwise."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    cap = max_pixels()
    try:
        with warnings.catch_warnings():
            # Between Pillow's limit and twice it Pillow only warns: our own cap (below that limit) decides then,
            # so such a JPEG is decoded reduced instead of whole. Beyond twice the limit Pillow refuses to open.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                w, h = img.size
                if w * h > cap and img.format == "JPEG":
                    # DCT scaling: the decoder itself produces 1/2, 1/4 or 1/8 size; full size is never held.
                    s = next((s for s in (2, 4, 8) if -(-w // s) * -(-h // s) <= cap), 8)
                    img.draft("RGB", (-(-w // s), -(-h // s)))
                if img.size[0] * img.size[1] > cap:
                    raise DataError(f"image is too large: {where} ({w}×{h} = {w * h:,} pixels, the cap is {cap:,})",
                                    f"downscale it, set {MAX_PIXELS_ENV} higher, or {fix}")
                img.load()
                return to_rgb(img)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"image is too large to decode safely: {where} ({exc})", f"downscale it or {fix}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"image is corrupt or not an image: {where} ({detail})", f"re-download it, or {fix}") from None


def open_image(path: str | Path) -> Any:
    """Open and decode an image file (pixel cap applied before decoding), raising a one-line DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"image not found: {path}", "check the path or the image root directory")
    if path.is_dir():
        raise DataError(f"image path is a directory: {path}", "pass an image file")
    if path.stat().st_size == 0:
        raise DataError(f"image file is empty (0 bytes): {path}", "re-download or remove it from the annotations")
    return decode_image(path, str(path), "pass --skip-bad-samples to skip broken images")
