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


def umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc), else set-and-restore."""
    import re

    try:
        with open("/proc/self/status", encoding="ascii") as f:
            match = re.search(r"^Umask:\s*([0-7]+)", f.read(), re.M)
        if match:
            return int(match.group(1), 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path, directory: bool = False) -> None:
    """Give a temp file (0600) or dir (0700) from `tempfile` the mode a plain open()/mkdir() would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())
