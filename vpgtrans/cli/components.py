"""`vpgtrans components`: what is registered, by whom.

Listing must not pay for importing every plugin (torch, transformers: seconds): the descriptions are kept
in `$VPGTRANS_HOME/components.json`, keyed by the installed entry points and the modification times of
the files that define them, and rebuilt from the real registry whenever anything changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import click
# why project modules are imported inside the commands: `vpgtrans --help` must not import torch or transformers

CACHE_FILE = "components.json"


def _fingerprint() -> str:
    """Hash of every component entry point, its distribution version, and the mtimes of the code behind them."""
    import importlib.metadata
    import importlib.util

    from ..registry import ENTRY_POINT_GROUPS

    parts: list[str] = []
    for group in sorted(ENTRY_POINT_GROUPS.values()):
        for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
            version = ep.dist.version if ep.dist is not None else "?"
            module = ep.value.split(":", 1)[0]
            try:
                # find_spec of a top-level module reads no code; of a submodule it imports only the parent package.
                spec = importlib.util.find_spec(module)
                origin = spec.origin if spec is not None else None
            except (ImportError, ValueError):
                origin = None
            mtime = Path(origin).stat().st_mtime_ns if origin and Path(origin).exists() else 0
            parts.append(f"{group}|{ep.name}|{ep.value}|{version}|{mtime}")
    own = Path(__file__).resolve().parent.parent  # describe() and the config field listing live here
    parts += [str((own / f).stat().st_mtime_ns) for f in ("registry.py", "config.py") if (own / f).exists()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def described(use_cache: bool = True) -> list[dict[str, Any]]:
    """`registry.describe` of every component, from the cache when it is current."""
    from ..paths import home
    from ..registry import REGISTRY

    # Components registered in this process (or plugins already loaded) are listed live: nothing to save.
    use_cache = use_cache and not REGISTRY._items
    cache = home() / CACHE_FILE
    key = _fingerprint() if use_cache else ""
    if use_cache:
        try:
            saved = json.loads(cache.read_text())
            if saved.get("fingerprint") == key:
                return saved["components"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    from ..registry import available, describe

    items = [describe(r) for r in available()]
    if use_cache:
        try:
            from ..checkpoint import atomic_write_text

            atomic_write_text(cache, json.dumps({"fingerprint": key, "components": items}, default=str))
        except OSError:  # a read-only cache: listing still works, just not faster next time
            pass
    return items


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output with each component's config fields.")
@click.option("--kind", type=click.Choice(["vision", "vpg", "llm", "converter"]), help="Only one kind.")
@click.option("--no-cache", is_flag=True, help="Load every plugin now instead of reading the listing cache.")
def components(as_json: bool, kind: str | None, no_cache: bool) -> None:
    """List registered components: kind, name, provider package, description."""
    items = [it for it in described(not no_cache) if kind is None or it["kind"] == kind]
    if as_json:
        click.echo(json.dumps(items, indent=2, default=str))
        return
    click.echo(f"{'kind':<10}{'name':<20}{'provider':<20}description")
    for it in items:
        click.echo(f"{it['kind']:<10}{it['name']:<20}{it['provider']:<20}{it['description']}")
