"""Hides a torchvision that cannot load beside this torch, at interpreter start (vpgtrans-torchvision-guard.pth).

The `eval` extra needs lmms-eval, which requires torchvision; PyPI has only CUDA builds of torchvision for Linux, and
one of them beside a CPU torch (`2.13.0+cpu`) fails on import (`operator torchvision::nms does not exist`).
transformers imports torchvision whenever it is installed, so every model import (and lmms-eval itself) failed.
Neither vpgtrans nor lmms-eval's local tasks use torchvision: when the two builds differ, `import torchvision`
raises ImportError instead, as if it were absent, and transformers runs without it. Two version files are read;
nothing is imported.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import sys


def build_tag(package: str, path: list[str] | None = None) -> str | None:
    """The local version of an installed package from its version.py ('+cpu', '+cu130', '' for none); None if absent.

    `path`: where to look instead of sys.path (tests).
    """
    try:
        spec = importlib.util.find_spec(package) if path is None else importlib.machinery.PathFinder.find_spec(
            package, path)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        with open(os.path.join(os.path.dirname(spec.origin), "version.py"), encoding="utf-8") as f:
            text = f.read(4096)
    except OSError:
        return None
    match = re.search(r"""__version__\s*=\s*['"][^'"+]*(\+[^'"]*)?['"]""", text)
    return (match.group(1) or "") if match else None


def mismatched(path: list[str] | None = None) -> bool:
    """True when torch is a CPU build and torchvision a CUDA/ROCm one: torchvision's operators cannot load."""
    torch_tag = build_tag("torch", path)
    vision_tag = build_tag("torchvision", path) if torch_tag == "+cpu" else None
    return bool(vision_tag and vision_tag.startswith(("+cu", "+rocm")))


if "torchvision" not in sys.modules and mismatched():
    sys.modules["torchvision"] = None  # type: ignore[assignment]  # `import torchvision` → ImportError
