"""On-disk cache of frozen vision features, keyed by encoder (`cache_id`) and image content (sha1).

The vision encoder never trains, so each image is encoded once, ever: later epochs and later
runs (any recipe using the same encoder) read `<root>/features/<cache_id>/<sha[:2]>/<sha>.safetensors`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import DataError, as_os_errors, write_error
from ..paths import honour_umask
from .readers import BadSamples, ImageReader


def default_cache_root() -> Path:
    """`$VPGTRANS_HOME/cache` (see vpgtrans.paths)."""
    from ..paths import home

    return home() / "cache"


class FeatureCache:
    """Feature tensors of one vision encoder, one safetensors file per distinct image."""

    def __init__(self, root: str | Path | None, cache_id: str):
        self.root = Path(root).expanduser() if root else default_cache_root()
        self.cache_id = cache_id
        self.dir = self.root / "features" / cache_id

    def path(self, sha: str) -> Path:
        """File holding the features of the image with content hash `sha`."""
        return self.dir / sha[:2] / f"{sha}.safetensors"

    def has(self, sha: str) -> bool:
        """True when the features of this image are on disk."""
        return self.path(sha).is_file()

    def load(self, sha: str) -> torch.Tensor:
        """Features [tokens, hidden] of one image."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(self.path(sha)))["features"]
        except (SafetensorError, KeyError, OSError) as exc:
            raise DataError(f"cached features {self.path(sha)} are damaged ({exc})",
                            "delete that file; it is recomputed on the next run") from None

    def save(self, sha: str, features: torch.Tensor) -> None:
        """Write one image's features atomically (a killed run never leaves a half file)."""
        from safetensors.torch import save_file

        final = self.path(sha)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{sha}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        honour_umask(tmp)  # mkstemp makes it 0600: a shared cache must be readable by the team
        try:
            with as_os_errors():
                save_file({"features": features.detach().to("cpu").contiguous()}, tmp)
            os.replace(tmp, final)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise write_error(exc, f"cached features under {self.dir}",  # type: ignore[misc]
                              "free disk space or set data.cache_dir to a disk with room") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def clean_stale(self, older_than_s: float = 600.0) -> int:
        """Remove temp files that killed runs left mid-write (old enough that no live writer owns them)."""
        import time

        limit, removed = time.time() - older_than_s, 0
        for tmp in [*self.dir.glob("*/.*.tmp"), *self.dir.glob("*/.tmp*")]:
            try:
                if tmp.is_file() and tmp.stat().st_mtime < limit:
                    tmp.unlink()
                    removed += 1
            except OSError:
                continue
        return removed


@dataclass
class CacheReport:
    """What feature preparation did."""

    images: int = 0
    cached: int = 0
    computed: int = 0
    bad: int = 0
    vision_batches: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        """One-line summary for the console."""
        bad = f", {self.bad} bad" if self.bad else ""
        return (f"features: {self.images} distinct images, {self.cached} from cache, {self.computed} computed "
                f"in {self.vision_batches} vision batches ({self.seconds:.1f}s){bad}")


def hash_images(records: Sequence[dict[str, Any]], reader: ImageReader, bad: BadSamples) -> list[str | None]:
    """sha1 of each record's image bytes (None where the image is unreadable and skipped)."""
    shas: list[str | None] = []
    for rec in records:
        try:
            shas.append(hashlib.sha1(reader.read_bytes(rec)).hexdigest())
        except DataError as exc:
            bad.add(exc)
            shas.append(None)
    return shas


def prepare_features(records: Sequence[dict[str, Any]], vision: Any, cache: FeatureCache, *,
                     batch_size: int = 32, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None, bad: BadSamples | None = None, progress: bool = True,
                     reader: ImageReader | None = None,
                     echo: Callable[[str], None] | None = print) -> tuple[list[str | None], CacheReport]:
    """Make sure every record's image has cached features; returns each record's sha (None = bad).

    Before encoding anything it says what the missing features will take (disk and pre-pass time), and refuses
    in one line, writing nothing, when they do not fit the free disk.
    """
    import time

    from ..progress import progress_bar

    bad = bad if bad is not None else BadSamples()
    reader = reader or ImageReader()
    report = CacheReport()
    start = time.perf_counter()
    shas = hash_images(records, reader, bad)
    cache.clean_stale()
    todo: dict[str, dict[str, Any]] = {}
    for rec, sha in zip(records, shas):
        if sha is not None and sha not in todo and not cache.has(sha):
            todo[sha] = rec
    distinct = {s for s in shas if s}
    report.images, report.cached = len(distinct), len(distinct) - len(todo)
    if todo:
        _check_disk(len(todo), vision, cache, dtype, echo)
    failed: set[str] = set()
    items = list(todo.items())
    bar = progress_bar(len(items), "vision features", "img", disable=not progress or not items, leave=False)
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        images, ok = [], []
        for sha, rec in chunk:
            try:
                # preprocess per image: one that decodes but cannot be preprocessed is a bad sample, not a crash
                images.append(vision.preprocess([reader.decode(rec)]))
                ok.append(sha)
            except DataError as exc:
                bad.add(exc)
                failed.add(sha)
        if images:
            feats = _encode(vision, torch.cat(images), device)
            report.vision_batches += 1
            for sha, f in zip(ok, feats):
                cache.save(sha, f.to(dtype) if dtype is not None else f)
            report.computed += len(ok)
        bar.update(len(chunk))
    bar.close()
    reader.close()
    shas = [None if s in failed else s for s in shas]
    report.bad = sum(1 for s in shas if s is None)
    report.seconds = time.perf_counter() - start
    return shas, report


def _check_disk(images: int, vision: Any, cache: FeatureCache, dtype: torch.dtype | None,
                echo: Callable[[str], None] | None) -> None:
    """Refuse features that do not fit the cache's disk; else say their size and the pre-pass's time."""
    from ..resources import CachePlan, free_disk

    tokens, width = getattr(vision, "num_tokens", None), getattr(vision, "hidden_size", None)
    if not tokens or not width:
        return  # an encoder that does not declare its shape: nothing to estimate
    name = str(dtype or torch.float32).removeprefix("torch.")
    params = sum(p.numel() for p in vision.parameters()) if hasattr(vision, "parameters") else 0
    plan = CachePlan(images, int(tokens), int(width), name, params, str(cache.root), free_disk(cache.root))
    if not plan.fits:
        raise DataError(*plan.refusal())
    if echo is not None:
        echo(f"feature cache: encoding {plan.size_line()}; pre-pass {plan.pre_pass()}")


@torch.no_grad()
def _encode(vision: Any, pixels: torch.Tensor, device: str | torch.device | None) -> torch.Tensor:
    if device is not None:
        pixels = pixels.to(device)
    return vision(pixels).float().cpu()


class FeatureStore:
    """Features by image sha: in memory when small enough (later epochs touch no disk), else read per item."""

    def __init__(self, cache: FeatureCache, shas: Sequence[str], preload_limit_bytes: int = 2 << 30):
        self.cache = cache
        self._index: dict[str, int] = {}
        self._table: torch.Tensor | None = None
        distinct = list(dict.fromkeys(shas))
        if distinct:
            first = cache.load(distinct[0])
            if first.numel() * first.element_size() * len(distinct) <= preload_limit_bytes:
                rows = [first] + [cache.load(s) for s in distinct[1:]]
                self._table = torch.stack(rows)
                self._index = {s: i for i, s in enumerate(distinct)}

    @property
    def preloaded(self) -> bool:
        """True when every feature sits in memory."""
        return self._table is not None

    def get(self, sha: str) -> torch.Tensor:
        """Features of one image."""
        if self._table is not None:
            return self._table[self._index[sha]]
        return self.cache.load(sha)
