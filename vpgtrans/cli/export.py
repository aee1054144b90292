"""`vpgtrans export` / `vpgtrans import`: stock transformers checkpoints (BLIP-2, InstructBLIP, LLaVA)."""

from __future__ import annotations

import click

_FORMATS = ["hf-blip2", "hf-instructblip", "hf-llava"]


@click.command("export")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="A vpgtrans model directory.")
@click.option("--format", "fmt", type=click.Choice(_FORMATS), default="hf-blip2", show_default=True,
              help="Target: transformers Blip2 / InstructBlip / Llava ForConditionalGeneration.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write (replaced atomically if it exists).")
@click.option("--lora", type=click.Choice(["merge", "peft"]), default=None,
              help="For models with a LoRA adapter: merge it into the LLM weights (default) or ship it "
                   "unmerged in peft's format in OUT/lora.")
def export(model_dir: str, fmt: str, out_dir: str, lora: str | None) -> None:
    """Write a model that stock transformers loads with from_pretrained (plus its processor)."""
    from ..checkpoint import load_model
    from ..formats import FORMATS, export_model

    model = load_model(model_dir).eval()
    result = export_model(model, out_dir, fmt, lora=lora)
    for note in result.notes:
        click.echo(f"note: {note}")
    cls = FORMATS[fmt][2].split()[1]
    click.echo(f"wrote {result.out} ({fmt}); load it with transformers.{cls}.from_pretrained('{result.out}')")


@click.command("import")
@click.option("--format", "fmt", type=click.Choice(_FORMATS), default="hf-blip2", show_default=True,
              help="What SRC holds.")
@click.option("--src", "src_dir", required=True, type=click.Path(), help="Stock transformers checkpoint directory.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="vpgtrans model directory to write (VPG + projector weights; vision/ and llm/ beside them).")
def import_cmd(fmt: str, src_dir: str, out_dir: str) -> None:
    """Turn a published BLIP-2 / InstructBLIP / LLaVA directory into a vpgtrans model (e.g. to transfer from)."""
    from ..checkpoint import read_manifest
    from ..formats import import_model

    out = import_model(src_dir, out_dir, fmt)
    spec = read_manifest(out)["spec"]
    click.echo(f"wrote {out}: vision {spec['vision']['name']}, VPG {spec['vpg']['name']}, LLM {spec['llm']['name']}")
