"""`vpgtrans export` / `vpgtrans import`: stock transformers checkpoints (BLIP-2, InstructBLIP, LLaVA)."""

from __future__ import annotations

import click

from ..errors import DataError
# why project modules are imported inside the commands: `vpgtrans --help` must not import torch or transformers

_FORMATS = ["hf-blip2", "hf-instructblip", "hf-llava"]


@click.command("export")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="A vpgtrans model directory.")
@click.option("--format", "fmt", type=click.Choice(_FORMATS), default="hf-blip2", show_default=True,
              help="Target: transformers Blip2 / InstructBlip / Llava ForConditionalGeneration.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write; an earlier export to the same format there is replaced atomically.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out that is not an export to this format.")
@click.option("--lora", type=click.Choice(["merge", "peft"]), default=None,
              help="For models with a LoRA adapter: merge it into the LLM weights (default) or ship it "
                   "unmerged in peft's format in OUT/lora.")
@click.option("--scores", "scores_path", type=click.Path(dir_okay=False), default=None,
              help="JSON written by `vpgtrans eval --out`: its metrics go into the model card (README.md).")
def export(model_dir: str, fmt: str, out_dir: str, force: bool, lora: str | None, scores_path: str | None) -> None:
    """Write a model that stock transformers loads with from_pretrained (processor, chat template, model card)."""
    import json
    from pathlib import Path

    from ..checkpoint import load_model, read_manifest
    from ..formats import FORMATS, export_model
    from ..formats._common import check_out, model_reads

    scores = None
    if scores_path:
        try:
            report = json.loads(Path(scores_path).read_text())
            scores = {**{k: report[k] for k in ("data", "task") if k in report}, **report["metrics"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"--scores {scores_path} is not a `vpgtrans eval --out` report ({type(exc).__name__})",
                            "pass the JSON file `vpgtrans eval ... --out FILE` wrote") from None
    manifest = read_manifest(model_dir)
    check_out(out_dir, fmt, {**model_reads(model_dir, manifest), "--scores file": scores_path}, force=force)
    model = load_model(model_dir).eval()
    result = export_model(model, out_dir, fmt, lora=lora, card={"manifest": manifest, "scores": scores})
    for note in result.notes:
        click.echo(f"note: {note}")
    cls = FORMATS[fmt][2].split()[1]
    click.echo(f"wrote {result.out} ({fmt}); load it with transformers.{cls}.from_pretrained('{result.out}'); "
               f"usage: {result.out}/README.md")


@click.command("import")
@click.option("--format", "fmt", type=click.Choice(_FORMATS), default="hf-blip2", show_default=True,
              help="What SRC holds.")
@click.option("--src", "src_dir", required=True, type=click.Path(), help="Stock transformers checkpoint directory.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="vpgtrans model directory to write (VPG + projector weights; vision/ and llm/ beside them); "
                   "an earlier import from the same format there is replaced atomically.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out that is not an import from this format.")
def import_cmd(fmt: str, src_dir: str, out_dir: str, force: bool) -> None:
    """Turn a published BLIP-2 / InstructBLIP / LLaVA directory into a vpgtrans model (e.g. to transfer from)."""
    from ..checkpoint import read_manifest
    from ..formats import import_model
    from ..formats._common import check_out

    check_out(out_dir, fmt, {"checkpoint": src_dir}, force=force, kind="import")
    out = import_model(src_dir, out_dir, fmt)
    spec = read_manifest(out)["spec"]
    click.echo(f"wrote {out}: vision {spec['vision']['name']}, VPG {spec['vpg']['name']}, LLM {spec['llm']['name']}")
