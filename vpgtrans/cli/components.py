"""`vpgtrans components`: what is registered, by whom."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output with each component's config fields.")
@click.option("--kind", type=click.Choice(["vision", "vpg", "llm", "converter"]), help="Only one kind.")
def components(as_json: bool, kind: str | None) -> None:
    """List registered components: kind, name, provider package, description."""
    from ..registry import available, describe

    items = [describe(r) for r in available(kind)]
    if as_json:
        click.echo(json.dumps(items, indent=2, default=str))
        return
    click.echo(f"{'kind':<10}{'name':<20}{'provider':<20}description")
    for it in items:
        click.echo(f"{it['kind']:<10}{it['name']:<20}{it['provider']:<20}{it['description']}")
