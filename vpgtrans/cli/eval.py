"""`vpgtrans eval`: caption CIDEr (+ attribute accuracy) or VQA accuracy of a trained model on JSONL data."""

from __future__ import annotations

import json
import time

import click


@click.command("eval")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="A vpgtrans model directory.")
@click.option("--data", "data_path", required=True, type=click.Path(),
              help="JSONL {image, caption|question+answer, attributes?} (paths relative to the file), "
                   "COCO captions JSON, cc_sbu_align folder or .tar shards.")
@click.option("--task", type=click.Choice(["caption", "vqa"]), default="caption", show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate only the first N records.")
@click.option("--beams", default=1, show_default=True, type=click.IntRange(1), help="Beam width (1 = greedy).")
@click.option("--max-new-tokens", default=30, show_default=True, type=click.IntRange(1), help="Length limit.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--prompt", default=None,
              help="Caption instruction (default none) or VQA format string (default 'Question: {} Answer:').")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Write metrics and every prediction to this JSON file.")
def eval_command(model_dir: str, data_path: str, task: str, limit: int | None, beams: int, max_new_tokens: int,
                 batch_size: int, prompt: str | None, out_path: str | None) -> None:
    """Generate for every record and print the metrics."""
    from ..checkpoint import atomic_write_text, load_model
    from ..evaluation import load_eval_records, predict, score
    from ..interfaces import GenerationConfig

    records = load_eval_records(data_path, task, limit)
    model = load_model(model_dir)
    start = time.perf_counter()
    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=beams)
    predictions = predict(model, records, task=task, batch_size=batch_size, gen_config=config, prompt=prompt)
    metrics = score(task, predictions, records)
    seconds = time.perf_counter() - start
    for key, value in metrics.items():
        click.echo(f"{key}: {int(value) if key == 'n' else f'{value:.4f}'}")
    click.echo(f"time: {seconds:.1f}s ({len(records) / max(seconds, 1e-9):.1f} samples/s)")
    if out_path:
        rows = [{"image": r["image"], "prediction": p, **({"question": r["question"]} if task == "vqa" else {})}
                for r, p in zip(records, predictions)]
        atomic_write_text(out_path, json.dumps({"model": model_dir, "data": data_path, "task": task,
                                                "metrics": metrics, "predictions": rows}, indent=2))
