"""Where vpgtrans keeps its cache: `$VPGTRANS_HOME`, else `$XDG_CACHE_HOME/vpgtrans`, else `~/.cache/vpgtrans`."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The vpgtrans cache root (not created here)."""
    explicit = os.environ.get("VPGTRANS_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vpgtrans"


def world_dir() -> Path:
    """Default location of the built-in synthetic world (`vpgtrans world build`)."""
    return home() / "world"
