"""`vpgtrans train`: train a VPG + projector on a frozen vision encoder and LLM from a recipe."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--recipe", required=True, help="Recipe name (see recipes/) or path to a YAML file.")
@click.argument("overrides", nargs=-1)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: runs/<recipe name>).")
@click.option("--resume", default=None, metavar="latest|PATH", help="Continue from the last or a given checkpoint.")
@click.option("--until", default=None, metavar="METRIC>=VALUE", help="Stop once a metric reaches a target.")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Override train.max_steps.")
@click.option("--dry-run", is_flag=True, help="Validate the recipe and data, print the plan, and exit.")
@click.option("--skip-bad-samples", is_flag=True, help="Skip unreadable rows/images (with a count) instead of failing.")
@click.option("--force", is_flag=True, help="Overwrite a previous run in --out.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
def train(recipe: str, overrides: tuple[str, ...], out_dir: str | None, resume: str | None, until: str | None,
          max_steps: int | None, dry_run: bool, skip_bad_samples: bool, force: bool, no_progress: bool) -> None:
    """Train from a recipe; overrides are key=value (e.g. train.lr=1e-4 max_steps=100 data.train=my.jsonl)."""
    from ..recipes import load_recipe
    from ..train.runner import run_recipe

    extra = list(overrides)
    if until:
        extra.append(f"train.until={until}")
    if max_steps:
        extra.append(f"train.max_steps={max_steps}")
    loaded = load_recipe(recipe, extra)
    out = Path(out_dir) if out_dir else Path("runs") / loaded.name
    run_recipe(loaded, out, resume=resume, force=force, dry_run=dry_run, skip_bad=skip_bad_samples,
               progress=not no_progress, echo=click.echo)
