"""`vpgtrans world`: build and inspect the built-in synthetic world."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from ..errors import WeightsNotFoundError
# why project modules are imported inside the commands: `vpgtrans --help` must not import torch or transformers


@click.group()
def world() -> None:
    """The built-in synthetic world: rendered shapes, a tiny ViT and tiny LLMs (OPT, LLaMA, FlanT5)."""


@world.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to build it [default: $VPGTRANS_HOME/world, else ~/.cache/vpgtrans/world].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed: same seed, same files.")
@click.option("--size", type=click.Choice(["full", "tiny"]), default="full", show_default=True,
              help="'tiny' builds a toy world in seconds (for tests).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a world knob, e.g. --set relation_share=0.9 --set max_objects=2 (see `world knobs`).")
@click.option("--force", is_flag=True, help="Rebuild even if an identical world is already there.")
def build(out: Path | None, seed: int, size: str, overrides: tuple[str, ...], force: bool) -> None:
    """Build the world (images, captions, VQA, ViT, LLMs); skipped when already built alike."""
    from ..world.build import build_world

    path = build_world(out, seed=seed, progress=click.echo, config=_config(size, overrides), force=force)
    click.echo(f"world ready at {path}")


def _config(size: str, overrides: tuple[str, ...]):
    from ..config import from_dict, parse_override
    from ..world.config import WorldConfig

    values = dataclasses.asdict(WorldConfig.preset(size))
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    return from_dict(WorldConfig, values, where="world")


@world.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="World directory [default: $VPGTRANS_HOME/world].")
def info(out: Path | None) -> None:
    """Print the manifest summary of a built world."""
    from ..paths import world_dir
    from ..world.build import read_manifest

    out = out or world_dir()
    manifest = read_manifest(out)
    if manifest is None:
        raise WeightsNotFoundError(f"no world at {out}", "run `vpgtrans world build` first")
    summary = {k: manifest.get(k) for k in ("seed", "sizes", "build_seconds", "timings", "vit_probe",
                                            "lm_context_check", "versions")}
    summary["files"] = len(manifest.get("files", {}))
    click.echo(json.dumps(summary, indent=1))


@world.command()
def knobs() -> None:
    """List the world's knobs (for `world build --set`), with defaults and help."""
    from ..config import describe_fields
    from ..world.config import WorldConfig

    for f in describe_fields(WorldConfig):
        click.echo(f"{f['name']:<20} {str(f['default']):<22} {f['help']}")


@world.command("export-cc-sbu")
@click.option("--world", "world_path", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="World directory [default: $VPGTRANS_HOME/world].")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: <world>/cc_sbu_align, where the MiniGPT-4 world recipes look].")
@click.option("--limit", type=int, default=None, help="Export only the first N images.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out that is not a cc_sbu_align export.")
def export_cc_sbu_command(world_path: Path | None, split: str, out: Path | None, limit: int | None,
                          force: bool) -> None:
    """Write the world's captions in MiniGPT-4's cc_sbu_align layout (filter_cap.json + image/{id}.jpg)."""
    from ..claim import refuse_overlap
    from ..data.cc_sbu_export import export_cc_sbu
    from ..errors import ConfigError
    from ..paths import world_dir

    root = world_path or world_dir()
    source = root / "data" / f"{split}.jsonl"
    if not source.is_file():
        raise WeightsNotFoundError(f"no world data at {source}", "run `vpgtrans world build` first")
    out = out or root / "cc_sbu_align"
    # The export replaces --out in one rename: never over the world's data, nor over files it did not write.
    refuse_overlap(out, {"world data": root / "data"})
    if out.is_dir() and any(out.iterdir()) and not (out / "filter_cap.json").is_file() and not force:
        raise ConfigError(f"--out {out} is not empty and holds no cc_sbu_align export",
                          "choose another --out, or pass --force to replace it (everything in it is deleted)")
    summary = export_cc_sbu(source, out, limit=limit)
    click.echo(f"exported {summary['images']} images to {summary['out']}")
