"""`vpgtrans plot`: render training logs (log.jsonl) to a PNG of loss / lr / metric curves."""

from __future__ import annotations

import click
# why project modules are imported inside the commands: `vpgtrans --help` must not import torch or transformers


@click.command("plot")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="PNG to write [default: RUN_DIR/curves.png of the first run].")
@click.option("--force", is_flag=True, help="Overwrite an --out file that is not a PNG.")
@click.option("--x", "x_axis", type=click.Choice(["step", "samples", "wall_time", "epoch"]), default="step",
              show_default=True, help="What the horizontal axis counts.")
@click.option("--label", "labels", multiple=True, help="Legend label per run (repeat; default: folder names).")
@click.option("--title", default=None, help="Figure title.")
def plot(run_dirs: tuple[str, ...], out_path: str | None, force: bool, x_axis: str, labels: tuple[str, ...],
         title: str | None) -> None:
    """Plot one run's curves, or overlay several runs (e.g. transfer vs. from scratch)."""
    from pathlib import Path

    from ..plot import plot_runs

    if out_path:
        from ..claim import check_out_file

        logs = {f"training log of {d}": Path(d) / "log.jsonl" if Path(d).is_dir() else Path(d) for d in run_dirs}
        check_out_file(out_path, logs, force=force, what="a PNG",
                       ours=lambda p: p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n")
    target = plot_runs(run_dirs, out_path, x=x_axis, labels=labels or None, title=title)
    click.echo(f"wrote {target}")
