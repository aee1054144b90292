"""`vpgtrans train`: train a VPG + projector on a frozen vision encoder and LLM from a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from ..errors import VpgtransError
from ..threads import THREADS_HELP
# why project modules are imported inside the commands: `vpgtrans --help` must not import torch or transformers


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
@click.option("--force", is_flag=True, help="Start over: delete a previous run in --out (its run files only; "
              "other files there are kept). Never overrides a run in progress.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
@click.option("--threads", type=click.IntRange(1), default=None,
              help=THREADS_HELP)
def train(recipe: str, overrides: tuple[str, ...], out_dir: str | None, resume: str | None, until: str | None,
          max_steps: int | None, dry_run: bool, skip_bad_samples: bool, force: bool, no_progress: bool,
          threads: int | None) -> None:
    """Train from a recipe; overrides are key=value (e.g. train.lr=1e-4 max_steps=100 data.train=my.jsonl)."""
    from ..recipes import load_recipe
    from ..train.runner import run_recipe

    from ..threads import announce_before, apply_threads

    echo = announce_before(apply_threads(threads), click.echo)
    extra = list(overrides)
    if until:
        extra.append(f"train.until={until}")
    if max_steps:
        extra.append(f"train.max_steps={max_steps}")
    loaded = load_recipe(recipe, extra)
    out = Path(out_dir) if out_dir else Path("runs") / loaded.name
    if not dry_run:
        from ..names import missing_error, missing_weights, recipe_weights

        missing = missing_weights(recipe_weights(loaded))
        if missing:  # every absent weight named at once, before any data is read or anything is written
            raise missing_error(missing)
        run_recipe(loaded, out, resume=resume, force=force, dry_run=False, skip_bad=skip_bad_samples,
                   progress=not no_progress, echo=echo)
        return
    _dry_run(loaded, out, skip_bad_samples, echo)


def _dry_run(loaded: Any, out: Path, skip_bad: bool, echo: Callable[[str], None]) -> None:
    """Print the plan, then fail naming every missing weight (and missing data) at once."""
    from ..names import missing_error, missing_weights, recipe_weights
    from ..train.runner import run_recipe

    missing = missing_weights(recipe_weights(loaded), dry_run=True)
    try:
        run_recipe(loaded, out, dry_run=True, skip_bad=skip_bad, progress=False, echo=echo)
    except VpgtransError as exc:
        if not missing:
            raise
        err = missing_error(missing)
        raise type(err)(f"{exc.what}; {err.what}", "; ".join(f for f in (exc.fix, err.fix) if f)) from None
    for role, name, target, why in missing:
        echo(f"MISSING {role} {name}" + (f" ({target})" if target != name else "") + f": {why}")
    if missing:
        raise missing_error(missing)
