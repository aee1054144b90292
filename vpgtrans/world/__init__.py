"""The built-in synthetic world: rendered shapes, captions and VQA, a tiny frozen ViT and tiny LLMs.

`build_world(out, seed)` (also `vpgtrans world build`) writes everything; see `build` for the layout.
Importing this package is cheap: torch and transformers load only when building.
"""

from __future__ import annotations

from .build import build_world, is_complete, is_current, read_manifest
from .config import WorldConfig

__all__ = ["WorldConfig", "build_world", "is_complete", "is_current", "read_manifest"]
