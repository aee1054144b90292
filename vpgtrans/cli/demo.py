"""`vpgtrans demo`: world → source VPG → TFS and VPGTrans per epoch on each destination → regime, Table 3 speed-up."""

from __future__ import annotations

import click
# why project modules are imported inside the commands: `vpgtrans --help` must not import torch or transformers


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/demo", show_default=True,
              help="Where every stage writes (a second run continues what the first left).")
@click.option("--src", default="world-opt-s", show_default=True, help="Source LLM (the VPG is trained here).")
@click.option("--dst", multiple=True, default=("world-opt-m",), show_default=True,
              help="Destination LLM (the VPG is moved here); repeat it for several, e.g. --dst world-opt-m "
                   "--dst world-flant5 (a size, then a type transfer).")
@click.option("--epochs", type=click.IntRange(2), default=10, show_default=True,
              help="Epochs of TFS and of the source (the paper's 10); VPGTrans's cap, warm-up included.")
@click.option("--epoch-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.25, show_default=True,
              help="Share of the world's training images one epoch passes over.")
@click.option("--eval-images", type=click.IntRange(1), default=256, show_default=True,
              help="Val images captioned after every epoch.")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed.")
@click.option("--world-size", type=click.Choice(["full", "tiny"]), default="full", show_default=True,
              help="World to build when none exists ('tiny', with --epoch-fraction 1, is a seconds-long "
                   "smoke test).")
@click.option("--force", is_flag=True, help="Delete --out first and start over.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo(out_dir: str, src: str, dst: tuple[str, ...], epochs: int, epoch_fraction: float, eval_images: int,
         seed: int, world_size: str, force: bool, no_progress: bool) -> None:
    """Build the world if absent, train a VPG on SRC, then TFS and VPGTrans on each DST, read per epoch."""
    from ..demo import DemoConfig, run_demo

    cfg = DemoConfig(src=src, dst=list(dst), epochs=epochs, epoch_fraction=epoch_fraction, eval_images=eval_images,
                     seed=seed, world_size=world_size)
    run_demo(out_dir, cfg, force=force, progress=not no_progress, echo=click.echo)
