"""`vpgtrans demo`: world → source VPG → scratch to its plateau vs VPGTrans on 10.7% of the data → speed-up."""

from __future__ import annotations

import click
# why project modules are imported inside the commands: `vpgtrans --help` must not import torch or transformers


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/demo", show_default=True,
              help="Where every stage writes (a second run continues what the first left).")
@click.option("--src", default="world-opt-s", show_default=True, help="Source LLM (the VPG is trained here).")
@click.option("--dst", multiple=True, default=("world-opt-m", "world-flant5"), show_default=True,
              help="Destination LLM (the VPG is moved here); repeat it for several races (the default: the "
                   "paper's size transfer, then a type transfer).")
@click.option("--source-steps", type=click.IntRange(1), default=600, show_default=True,
              help="BLIP-2 stage-2 steps on the source.")
@click.option("--steps", type=click.IntRange(1), default=400, show_default=True,
              help="Step cap of scratch (it stops at its plateau) and of VPGTrans's fine-tuning.")
@click.option("--data-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.107, show_default=True,
              help="Share of the training data VPGTrans sees (the paper: 10.7%); scratch sees all of it.")
@click.option("--eval-every", type=click.IntRange(1), default=50, show_default=True, help="Validation interval.")
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed.")
@click.option("--world-size", type=click.Choice(["full", "tiny"]), default="full", show_default=True,
              help="World to build when none exists ('tiny' is a seconds-long smoke test).")
@click.option("--force", is_flag=True, help="Delete --out first and start over.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo(out_dir: str, src: str, dst: tuple[str, ...], source_steps: int, steps: int, data_fraction: float,
         eval_every: int, seed: int, world_size: str, force: bool, no_progress: bool) -> None:
    """Build the world if absent, train a VPG on SRC, transfer it to each DST next to a from-scratch run, report."""
    from ..demo import DemoConfig, run_demo

    cfg = DemoConfig(src=src, dst=list(dst), source_steps=source_steps, steps=steps, data_fraction=data_fraction,
                     eval_every=eval_every, seed=seed, world_size=world_size)
    run_demo(out_dir, cfg, force=force, progress=not no_progress, echo=click.echo)
