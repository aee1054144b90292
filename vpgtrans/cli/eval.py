"""`vpgtrans eval`: caption CIDEr (+ attribute accuracy) or VQA accuracy of a trained model on JSONL data."""

from __future__ import annotations

import codecs
import json
import time

import click

from ..threads import THREADS_HELP
# why project modules are imported inside the commands: `vpgtrans --help` must not import torch or transformers


@click.command("eval")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="A vpgtrans model directory.")
@click.option("--data", "data_path", required=True, type=click.Path(),
              help="JSONL {image, caption|question+answer, attributes?} (paths relative to the file), "
                   "COCO captions JSON, cc_sbu_align folder or .tar shards.")
@click.option("--task", type=click.Choice(["caption", "vqa"]), default="caption", show_default=True)
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate only the first N records.")
@click.option("--beams", default=1, show_default=True, type=click.IntRange(1), help="Beam width (1 = greedy).")
@click.option("--max-new-tokens", default=30, show_default=True, type=click.IntRange(1), help="Length limit.")
@click.option("--stop", multiple=True, metavar="TEXT",
              help="Cut each prediction at this string (repeatable; backslash escapes read: '\\n' for one-word "
                   "answers, as lmms-eval's until).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--prompt", default=None,
              help="Caption instruction (default none) or VQA format string (default 'Question: {} Answer:').")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Write metrics and every prediction to this JSON file (an earlier report there is replaced).")
@click.option("--force", is_flag=True, help="Overwrite an --out file that is not a `vpgtrans eval` report.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help=THREADS_HELP)
@click.option("--no-progress", is_flag=True, help="No progress lines.")
def eval_command(model_dir: str, data_path: str, task: str, limit: int | None, beams: int, max_new_tokens: int,
                 stop: tuple[str, ...], batch_size: int, prompt: str | None, out_path: str | None, force: bool,
                 threads: int | None, no_progress: bool) -> None:
    """Generate for every record and print the metrics."""
    from ..checkpoint import atomic_write_text, load_model
    from ..evaluation import load_eval_records, predict, score
    from ..interfaces import GenerationConfig
    from ..threads import announce_before, apply_threads

    config = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=beams, stop=tuple(map(unescape, stop)))
    threads_line = apply_threads(threads)
    note = announce_before(threads_line, lambda text: click.echo(text, err=True))
    if out_path:
        from ..claim import check_out_file

        check_out_file(out_path, {"data file": data_path}, force=force, what="a `vpgtrans eval` report",
                       ours=lambda p: {"metrics", "predictions"} <= set(json.loads(p.read_text())))
    records = load_eval_records(data_path, task, limit)
    model = load_model(model_dir)
    start = time.perf_counter()
    predictions: list[str] = []
    last = start
    # Chunks of a few batches: a progress line (with ETA from the measured speed) at most every 10 s.
    chunk = batch_size * 4
    for first in range(0, len(records), chunk):
        part = records[first:first + chunk]
        predictions += predict(model, part, task=task, batch_size=batch_size, gen_config=config, prompt=prompt)
        now = time.perf_counter()
        if not no_progress and (now - last >= 10 or len(predictions) == len(records)) and len(records) > chunk:
            last = now
            note(progress_line("eval", len(predictions), len(records), now - start))
    metrics = score(task, predictions, records)
    seconds = time.perf_counter() - start
    for key, value in metrics.items():
        click.echo(f"{key}: {int(value) if key == 'n' else f'{value:.4f}'}")
    click.echo(f"time: {seconds:.1f}s ({len(records) / max(seconds, 1e-9):.1f} samples/s); {threads_line}")
    if out_path:
        rows = [{"image": r["image"], "prediction": p, **({"question": r["question"]} if task == "vqa" else {})}
                for r, p in zip(records, predictions)]
        atomic_write_text(out_path, json.dumps({"model": model_dir, "data": data_path, "task": task,
                                                "metrics": metrics, "predictions": rows}, indent=2))


def unescape(text: str) -> str:
    """`--stop '\\n'` → a newline: a shell passes backslash + n, which is what users type for one."""
    try:
        return codecs.decode(text, "unicode_escape")
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{text!r} is not a valid escaped string ({exc.reason})", param_hint="--stop")


def progress_line(what: str, done: int, total: int, seconds: float) -> str:
    """'eval 64/500 (12.8%), 3.2/s, ETA 2 min 16 s' from the speed measured so far."""
    rate = done / max(seconds, 1e-9)
    left = (total - done) / max(rate, 1e-9)
    eta = f"{int(left // 60)} min {int(left % 60)} s" if left >= 60 else f"{left:.0f} s"
    return f"{what} {done}/{total} ({100 * done / max(total, 1):.1f}%), {rate:.1f}/s, ETA {eta}"
