"""`vpgtrans transfer`: move a trained VPG to another LLM (VPGTrans: converter, 5x warm-up, fine-tune)."""

from __future__ import annotations

from typing import Any

import click

from ..errors import ConfigError
from ..threads import THREADS_HELP
# why project modules are imported inside the commands: `vpgtrans --help` must not import torch or transformers


@click.command()
@click.option("--src", required=True, help="Source model: vpgtrans model dir, HF BLIP-2 dir, LAVIS .pth or alias.")
@click.option("--dst", required=True, help="Destination LLM: alias, path or world name (world-llama, ...).")
@click.argument("overrides", nargs=-1)
@click.option("--data", default=None,
              help="Training annotations (sets data.train): COCO Karpathy / LAVIS JSON, JSONL, webdataset .tar shards "
                   "or a cc_sbu_align folder. Real models need it unless the recipe's data exists.")
@click.option("--data-fraction", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Train on this seeded random fraction of the training set (data.fraction; the paper: 0.107).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/transfer", show_default=True,
              help="Output directory.")
@click.option("--recipe", default=None,
              help="Recipe name or YAML path. Default: chosen from the models: world names → vpgtrans_world; same "
                   "LLM family (OPT-2.7B → 6.7B) → vpgtrans_opt2.7b_to_6.7b; another family (OPT → LLaMA) or "
                   "Vicuna → vpgtrans_vl_llama (the paper's values; the plan says which and why).")
@click.option("--converter", default="auto", show_default=True,
              help="Embedding converter (linear-cosine, lstsq, procrustes, ridge, ridge-whitened, anchor-omp, "
                   "identity; `vpgtrans components` lists all); auto: identity when the vocabularies are identical "
                   "(a surrogate source), else linear-cosine.")
@click.option("--warmup-lr-scale", type=float, default=None,
              help="Warm-up LR = this × the recipe's LR. Default: the recipe's transfer.warmup_lr_scale, else 5 (the "
                   "paper's); 1 when the source was trained on a surrogate of DST (`vpgtrans surrogate`), whose "
                   "projector already fits DST's embeddings.")
@click.option("--warmup-batch-size", type=click.IntRange(min=1), default=None,
              help="Warm-up batch size. Default: the recipe's transfer.warmup_batch_size, else its train.batch_size "
                   "(the warm-up epoch still sees one training epoch's samples).")
@click.option("--warmup-epochs", type=float, default=1.0, show_default=True, help="Length of the warm-up in epochs.")
@click.option("--lora", is_flag=True, help="Also train a LoRA adapter on the LLM while fine-tuning.")
@click.option("--until", default=None, metavar="METRIC>=VALUE", help="Stop fine-tuning once a metric reaches a target.")
@click.option("--compare-scratch", is_flag=True, help="Also train from scratch and report the speed-up.")
@click.option("--dry-run", is_flag=True, help="Print the plan and exit without training.")
@click.option("--resume", is_flag=True, help="Continue a transfer in --out (finished stages are skipped).")
@click.option("--force", is_flag=True, help="Delete everything in --out first (a previous run, or other files). "
              "Never overrides a run in progress.")
@click.option("--trust-pickle", is_flag=True, help="Allow a .pth source (loaded with weights_only=True).")
@click.option("--src-llm", default=None, help="LLM the source was trained with, when the source does not say.")
@click.option("--min-coverage", type=float, default=0.05, show_default=True,
              help="Refuse token pairings covering less of the destination vocabulary.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help=THREADS_HELP)
@click.option("--then-data", default=None,
              help="Into Vicuna (VL-Vicuna): also run the paper's next stage (recipe vl_vicuna) on this "
                   "cc_sbu_align folder, into OUT/vl_vicuna.")
@click.option("--then", "then_overrides", multiple=True, metavar="KEY=VALUE",
              help="Override of the next stage's recipe (repeat), e.g. --then train.max_steps=400.")
def transfer(overrides: tuple[str, ...], out_dir: str, no_progress: bool, threads: int | None,
             then_data: str | None, then_overrides: tuple[str, ...], **options: Any) -> None:
    """Transfer the VPG of SRC to the LLM DST; overrides are recipe key=value (e.g. train.max_steps=500)."""
    from ..threads import announce_before, apply_threads
    from ..transfer.options import TransferOptions
    from ..transfer.race import transfer as run

    echo = announce_before(apply_threads(threads), click.echo)
    # Every other option is a TransferOptions field of the same name.
    opts = TransferOptions(overrides=overrides, out=out_dir, progress=not no_progress, **options)
    followup = _followup(opts.src, opts.dst, opts.src_llm, opts.recipe, then_data, then_overrides)
    run(opts, echo=echo)
    if followup and then_data and not opts.dry_run:
        from ..transfer.followup import run_followup

        run_followup(out_dir, followup, then_data, then_overrides, progress=not no_progress, echo=echo)


def _followup(src: str, dst: str, src_llm: str | None, recipe: str | None, then_data: str | None,
              then_overrides: tuple[str, ...]) -> str | None:
    """The recipe following this transfer (vl_vicuna into Vicuna); --then-data elsewhere is refused up front."""
    from ..transfer.choose import choose_recipe

    followup = choose_recipe(src, dst, src_llm).followup if recipe is None else None
    if (then_data or then_overrides) and not followup:
        raise ConfigError("--then-data/--then apply to a transfer into Vicuna (VL-Vicuna's next stage)",
                          "drop them, or run `vpgtrans train --recipe ... train.init_from=OUT/model` afterwards")
    return followup
