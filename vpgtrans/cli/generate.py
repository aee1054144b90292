"""`vpgtrans generate`: caption or answer about one image, or caption a whole folder into JSONL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import click

from ..errors import ConfigError, DataError
# why project modules are imported inside the commands: `vpgtrans --help` must not import torch or transformers

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def generation_options(func: Callable) -> Callable:
    """The decoding and device options shared by `generate` and `chat`."""
    func = click.option("--device", default="auto", show_default=True,
                        help="cpu, cuda, cuda:1, ... (auto = cuda when available).")(func)
    func = click.option("--max-new-tokens", default=30, show_default=True, type=click.IntRange(1),
                        help="Length limit.")(func)
    func = click.option("--beams", default=1, show_default=True, type=click.IntRange(1),
                        help="Beam width (1 = greedy).")(func)
    return func


def load_for_inference(model_dir: str, device: str) -> Any:
    """Load a model directory onto `device` in eval mode (no dropout anywhere)."""
    import torch

    from ..checkpoint import load_model

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(model_dir, device=device).eval()


def list_images(root: str | Path) -> list[Path]:
    """Image files under `root` (recursively), in a stable order."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def caption_folder(model: Any, root: str | Path, out: str | Path, prompt: str, config: Any, *,
                   batch_size: int = 8, skip_bad: bool = False, progress: bool = True) -> tuple[int, int]:
    """Caption every image under `root` into `out` (JSONL, written atomically); returns (written, skipped)."""
    from ..checkpoint import atomic_write_text
    from ..images import open_image
    from ..progress import progress_bar

    root = Path(root)
    files = list_images(root)
    if not files:
        raise DataError(f"no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)})",
                        "point --images at a folder of image files")
    lines: list[str] = []
    skipped = 0
    with progress_bar(len(files), "captioning", "img", disable=not progress) as bar:
        for start in range(0, len(files), batch_size):
            names, images = [], []
            for path in files[start:start + batch_size]:
                try:
                    images.append(open_image(path))
                except DataError as exc:
                    if not skip_bad:
                        raise
                    skipped += 1
                    bar.write(f"skipped: {exc.what}")
                    continue
                names.append(path.relative_to(root).as_posix())
            if images:
                texts = model.generate(images, prompt, config=config)
                lines += [json.dumps({"image": n, "text": t}, ensure_ascii=False) for n, t in zip(names, texts)]
            bar.update(len(files[start:start + batch_size]))
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    return len(lines), skipped


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A vpgtrans model directory.")
@click.option("--image", "image_path", type=click.Path(dir_okay=False), help="One image file (text goes to stdout).")
@click.option("--images", "images_dir", type=click.Path(file_okay=False),
              help="Caption every image in this folder (recursively) into --out.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False),
              help="JSONL file for --images: one {\"image\", \"text\"} object per line, written atomically "
                   "(an earlier one there is replaced).")
@click.option("--force", is_flag=True, help="Overwrite an --out file that `vpgtrans generate` did not write.")
@click.option("--prompt", default="", help="Instruction or question placed after the image (model template).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="Images per batch (--images).")
@click.option("--skip-bad-images", is_flag=True, help="With --images: skip unreadable files instead of stopping.")
@generation_options
def generate(model_dir: str, image_path: str | None, images_dir: str | None, out_path: str | None, force: bool,
             prompt: str, batch_size: int, skip_bad_images: bool, beams: int, max_new_tokens: int, device: str) -> None:
    """Print the model's text for one image, or caption a folder of images into JSONL."""
    from ..images import open_image
    from ..interfaces import GenerationConfig

    if (image_path is None) == (images_dir is None):
        raise ConfigError("generate needs exactly one of --image and --images",
                          "pass --image FILE for one image or --images DIR --out FILE.jsonl for a folder")
    if images_dir is not None and not out_path:
        raise ConfigError("--images needs --out FILE.jsonl", "add --out captions.jsonl")
    if images_dir is not None and not Path(images_dir).is_dir():
        raise DataError(f"image folder not found: {images_dir}", "check the path")
    if images_dir is not None and out_path:
        from ..claim import check_out_file

        check_out_file(out_path, {}, force=force, what="a `vpgtrans generate` caption file",
                       ours=lambda p: {"image", "text"} <= set(json.loads(p.read_text().splitlines()[0])))
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=beams)
    if image_path is not None:
        image = open_image(image_path)  # fail on a bad image before the (slow) model load
        model = load_for_inference(model_dir, device)
        click.echo(model.generate([image], prompt, config=config)[0])
        return
    model = load_for_inference(model_dir, device)
    written, skipped = caption_folder(model, images_dir, out_path, prompt, config, batch_size=batch_size,
                                      skip_bad=skip_bad_images)
    click.echo(f"wrote {written} captions to {out_path}" + (f" ({skipped} unreadable images skipped)" if skipped
                                                          else ""), err=True)
