"""`vpgtrans surrogate`: a cheap stand-in for an LLM (its first K layers) to train a VPG on, then transfer."""

from __future__ import annotations

import click
# why project modules are imported inside the commands: `vpgtrans --help` must not import torch or transformers


@click.command()
@click.option("--llm", required=True, help="LLM to cut down: alias (smollm2-135m, …), directory, hub id or .gguf file.")
@click.option("--layers", "-k", type=int, required=True, help="Decoder layers to keep (the first K).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Output directory.")
@click.option("--last-layers", type=int, default=0, show_default=True,
              help="Also keep the LLM's last L layers, joined to the first K by a translator (layer K, trained "
                   "by healing) that stands in for the layers between (arXiv 2505.22664). 0: first K layers only.")
@click.option("--heal-steps", type=int, default=0, show_default=True,
              help="Distillation steps from the full LLM (0: no healing).")
@click.option("--heal-data", type=click.Path(dir_okay=False), default=None,
              help="Healing text: one passage per line (.jsonl: 'text' or 'caption' field); 10% is held out.")
@click.option("--heal-lr", type=float, default=2e-3, show_default=True,
              help="Healing learning rate (Adam; trains the translator, else the top kept layer and the final norm).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def surrogate(llm: str, layers: int, out_dir: str, last_layers: int, heal_steps: int, heal_data: str | None,
              heal_lr: float, force: bool) -> None:
    """Write a Hugging Face causal-LM dir: LLM's embeddings + first K layers (+ translator + last L) + norm + head.

    Train a VPG on it (model.llm.path=OUT), then `vpgtrans transfer --src RUN/model --dst LLM`.
    """
    from ..surrogate import make_surrogate

    make_surrogate(llm, layers, out_dir, last_layers=last_layers, heal_steps=heal_steps, heal_data=heal_data,
                   heal_lr=heal_lr, force=force, echo=click.echo)
