"""Whether code shipped with a model may run: only when the user said so for this invocation.

Model directories are untrusted input. A `config.json` / `tokenizer_config.json` may name Python files
(`auto_map`) that transformers would import; vpgtrans lets that happen only after the command line got
`--trust-remote-code` (or Python code called `allow_remote_code(True)`), never because a manifest, recipe
or config file asks for it.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_allowed = False
_announced: set[str] = set()

# Files in a checkpoint directory whose `auto_map` tells transformers which module to import.
_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                 "image_processor_config.json")


def allow_remote_code(allowed: bool) -> None:
    """Set, for this process, whether code shipped with a model may run (the CLI's `--trust-remote-code`)."""
    global _allowed
    _allowed = bool(allowed)
    _announced.clear()


def remote_code_allowed() -> bool:
    """True only after an explicit opt-in for this invocation."""
    return _allowed


@contextmanager
def remote_code(allowed: bool) -> Iterator[None]:
    """Allow (or forbid) code shipped with models inside a `with` block, restoring the previous setting."""
    before = _allowed
    allow_remote_code(allowed)
    try:
        yield
    finally:
        allow_remote_code(before)


def shipped_code(target: str | Path) -> list[str]:
    """Python files a local checkpoint directory asks transformers to import (from every `auto_map`)."""
    root = Path(target)
    if not root.is_dir():
        return []
    files: set[str] = set()
    for name in _CODE_CONFIGS:
        try:
            data = json.loads((root / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if not isinstance(auto_map, dict):
            continue
        for ref in auto_map.values():
            for item in ref if isinstance(ref, list) else [ref]:
                if isinstance(item, str) and "." in item:
                    module = item.split("--")[-1].rsplit(".", 1)[0]
                    files.add(str(root / (module.replace(".", os.sep) + ".py")))
    return sorted(files)


def announce(what: str, name: str, target: str) -> None:
    """With the opt-in on, say on stderr which shipped code loading `target` may run (once per target)."""
    if not _allowed or target in _announced:
        return
    _announced.add(target)
    files = shipped_code(target)
    if files:
        print(f"warning: --trust-remote-code: loading {what} '{name}' runs code shipped with it: "
              f"{', '.join(files)}", file=sys.stderr)
    elif not os.path.isdir(target):
        print(f"warning: --trust-remote-code: loading {what} '{name}' may run code shipped in the hub "
              f"repository {target}", file=sys.stderr)


def refusal(what: str, name: str, target: str) -> tuple[str, str]:
    """(what, fix) of the one-line error for a checkpoint that cannot load without running its own code."""
    files = shipped_code(target)
    shown = ", ".join(files) if files else target
    return (f"{what} '{name}' needs code shipped with it to load ({shown}); vpgtrans never runs a model's "
            "own code unless asked on the command line",
            "read that code, then rerun with `vpgtrans --trust-remote-code …` if you trust it")
