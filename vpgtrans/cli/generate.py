"""`vpgtrans generate`: caption or answer about an image with a trained model."""

from __future__ import annotations

import click


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A vpgtrans model directory.")
@click.option("--image", "image_path", required=True, type=click.Path(), help="Image file.")
@click.option("--prompt", default="", help="Instruction or question placed after the image.")
@click.option("--beams", default=1, show_default=True, type=click.IntRange(1), help="Beam width (1 = greedy).")
@click.option("--max-new-tokens", default=30, show_default=True, type=click.IntRange(1), help="Length limit.")
def generate(model_dir: str, image_path: str, prompt: str, beams: int, max_new_tokens: int) -> None:
    """Print the model's text for one image."""
    from ..checkpoint import load_model
    from ..images import open_image
    from ..interfaces import GenerationConfig

    image = open_image(image_path)
    model = load_model(model_dir)
    text = model.generate([image], prompt, config=GenerationConfig(max_new_tokens=max_new_tokens, num_beams=beams))
    click.echo(text[0])
