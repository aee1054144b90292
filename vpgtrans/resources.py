"""What the machine has and what tensors and the feature cache cost: free memory, free disk, bytes per dtype.

Low in the layers (torch and the standard library only): the data path, the LLM backends and the memory
planner (memory.py, which sits above data/ and train/) all read these.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def available_memory() -> tuple[str, int | None]:
    """(device, free bytes) where training would run: free GPU memory on CUDA, MemAvailable on CPU."""
    if torch.cuda.is_available():
        return "cuda", int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return "cpu", int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return "cpu", os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return "cpu", None


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element of a dtype given by name ("bfloat16") or object."""
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.empty((), dtype=dt).element_size()




# --- the feature cache's cost -----------------------------------------------------------------------------
# The pre-pass time is an estimate from FLOPs at this assumed rate (printed with it): one A100/H100-class GPU
# running a ViT forward in float16 at roughly a third of its peak. Decoding images is not counted.
ASSUMED_VISION_FLOPS = 100e12


@dataclass
class CachePlan:
    """What the frozen-feature cache of a run costs: disk (images × tokens × width × dtype) and a pre-pass."""

    images: int
    tokens: int
    width: int
    dtype: str
    vision_params: int
    root: str
    free: int | None

    @property
    def per_image(self) -> int:
        """Bytes of one image's features."""
        return self.tokens * self.width * dtype_bytes(self.dtype)

    @property
    def need(self) -> int:
        """Bytes of the whole cache (safetensors headers, ~100 bytes a file, not counted)."""
        return self.images * self.per_image

    @property
    def fits(self) -> bool:
        """True when the cache fits the free disk (or the free disk is unknown)."""
        return self.free is None or self.need <= self.free

    def pre_pass(self) -> str:
        """The encoding pre-pass as FLOPs and time at the assumed rate."""
        flops = 2.0 * self.vision_params * self.tokens * self.images
        return (f"{_flops(flops)} ≈ {_duration(flops / ASSUMED_VISION_FLOPS)} at an assumed "
                f"{ASSUMED_VISION_FLOPS / 1e12:.0f} TFLOP/s (one GPU, float16), before the first step")

    def size_line(self) -> str:
        """images × tokens × width × dtype = bytes, under root (free)."""
        free = "free space unknown" if self.free is None else f"{_bytes(self.free)} free"
        return (f"{self.images:,} images × {self.tokens} tokens × {self.width} × {self.dtype} = {_bytes(self.need)} "
                f"under {self.root} ({free})")

    def refusal(self) -> tuple[str, str]:
        """(what, fix) of the one-line error for a cache that does not fit."""
        return (f"the feature cache needs {_bytes(self.need)} ({self.size_line()})",
                "stream instead: data.feature_cache=false encodes images on the fly on the training device (and "
                "streams webdataset shards); or set data.cache_dir to a disk with room"
                + (", or data.cache_dtype=float16 (half the disk)" if self.dtype == "float32" else ""))


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


def _flops(n: float) -> str:
    for unit, size in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} FLOP"


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def free_disk(path: str | os.PathLike) -> int | None:
    """Free bytes on the disk that holds `path` (its nearest existing parent); None when unknown."""
    import shutil
    from pathlib import Path

    probe = Path(path).expanduser()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None
