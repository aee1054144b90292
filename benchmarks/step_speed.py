"""Training-step speed: vpgtrans's Trainer vs. the loop a user writes with stock `Blip2ForConditionalGeneration`.

    python benchmarks/step_speed.py            # small config, batch 4/16/64 × queries 8/32/64 (≤ ~5 min, 2 cores)
    python benchmarks/step_speed.py --quick    # tiny config, ≤ ~1 min

Both sides train the *same* model: ours is built with `build_model`, then exported with
`export_model(..., "hf-blip2")`, and the stock side loads that directory (the run checks that both give the
same loss and projector gradient on the same batch). (a) is the real `vpgtrans.train.Trainer` reading
cached vision features; (b) is a plain AdamW loop over Q-Former + query tokens + language_projection
with a vision forward every step. (c) is the machine's best fp32 `torch.matmul` rate. FLOPs per step
are measured with `torch.utils.flop_counter.FlopCounterMode` on one real forward + backward (matmul-like
ops only: mm/addmm/bmm/SDPA/conv; elementwise work is not counted). Each variant runs in its own
process (forkserver), so its peak RSS is its own. Timings use one torch thread; median of N steps
after warm-up. Writes <out>/step_speed.json and step_speed.png.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, peak_rss_mb, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MAX_TEXT_LEN = 64

# Widths: vision = Blip2VisionModel, llm = OPT, qformer = our Q-Former VPG (BLIP-2 layout).
SIZES = {
    "tiny": {"vision": dict(hidden=64, layers=2, heads=4, ffn=128, image=32, patch=8),
             "llm": dict(hidden=64, layers=2, heads=4, ffn=128),
             "qformer": dict(hidden=64, layers=2, heads=4, ffn=128)},
    # Vision forward ≈ LLM forward + backward per sample, the proportion of EVA ViT-g vs OPT-2.7B.
    "small": {"vision": dict(hidden=256, layers=6, heads=4, ffn=1024, image=64, patch=8),
              "llm": dict(hidden=256, layers=4, heads=4, ffn=1024),
              "qformer": dict(hidden=256, layers=2, heads=4, ffn=1024)},
}
PROFILES: dict[str, dict[str, Any]] = {
    "quick": dict(size="tiny", batches=[2, 4], queries=[4, 8], batch=4, query=8, warmup=1, steps=3,
                  repeats=1, caption_words=8, matmul=[128, 256, 512]),
    "default": dict(size="small", batches=[4, 16, 64], queries=[8, 32, 64], batch=16, query=32, warmup=2,
                    steps=5, repeats=3, caption_words=5, matmul=[256, 512, 1024, 2048]),
}
# What was tried to make our step fast, each measured at the base (batch, queries) point.
ABLATIONS = {
    "trainer-nocache": "Trainer, feature cache off: images decoded + vision forward every step",
    "trainer-eager": "Trainer, cached features, LLM attn_implementation=eager (default sdpa)",
    "trainer-adamw-foreach": "Trainer with torch's default (foreach) AdamW instead of the fused kernel",
    "trainer-ckpt": "Trainer with train.gradient_checkpointing=true (the LLM's layers recomputed in backward)",
    "manual": "our model in a bare loop (no Trainer: no accelerate, logging, data pipeline)",
    "manual-grads-into-llm": "bare loop, LLM weights left requires_grad=True (frozen only by the optimizer)",
    "stock-eager": "stock loop, attn_implementation=eager",
}
SWEEP = {"trainer": "ours: vpgtrans Trainer, cached features", "stock": "stock Blip2ForConditionalGeneration loop"}


# --- building the shared configuration ----------------------------------------------------------------
def make_models(root: Path, size: str) -> dict[str, Path]:
    """Write the OPT LLM (tokenizer with an `<image>` token) and BLIP-2 ViT at `size` with save_pretrained."""
    import torch
    from transformers import Blip2VisionConfig, Blip2VisionModel, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import AddedToken

    from vpgtrans.testing import _bpe_bytelevel, _preprocessor

    s = SIZES[size]
    paths = {"llm": root / "opt", "vision": root / "vit"}
    raw, specials = _bpe_bytelevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, **specials)
    # The image token is in the vocabulary from the start: the export then adds no row, so the stock
    # model's softmax runs over exactly our vocabulary and both losses agree to float rounding.
    tok.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    tok.save_pretrained(paths["llm"])
    m = s["llm"]
    torch.manual_seed(1)
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=m["hidden"], ffn_dim=m["ffn"], num_hidden_layers=m["layers"],
                             num_attention_heads=m["heads"], word_embed_proj_dim=m["hidden"],
                             max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id)).save_pretrained(paths["llm"])
    v = s["vision"]
    torch.manual_seed(4)
    Blip2VisionModel(Blip2VisionConfig(hidden_size=v["hidden"], intermediate_size=v["ffn"], num_hidden_layers=v["layers"],
                                       num_attention_heads=v["heads"], image_size=v["image"], patch_size=v["patch"],
                                       initializer_range=0.02)).save_pretrained(paths["vision"])
    _preprocessor(paths["vision"], v["image"])
    return paths


def spec_for(paths: dict[str, Path], size: str, queries: int, attn: str = "sdpa") -> dict[str, Any]:
    """ModelSpec dict: BLIP-2 ViT → Q-Former with `queries` queries → OPT."""
    q = SIZES[size]["qformer"]
    return {"vision": {"name": "blip2-vit", "path": str(paths["vision"])},
            "vpg": {"name": "qformer", "num_query_tokens": queries, "hidden_size": q["hidden"],
                    "num_hidden_layers": q["layers"], "num_attention_heads": q["heads"],
                    "intermediate_size": q["ffn"], "dropout": 0.0},
            "llm": {"name": "opt", "path": str(paths["llm"]), "attn_implementation": attn}}


def make_records(root: Path, n: int, words: int, image: int) -> list[dict[str, Any]]:
    """`n` random-noise PNG images with captions of `words` words (fixed seed)."""
    import numpy as np
    from PIL import Image

    from vpgtrans.testing import WORDS

    rng, nrng = random.Random(0), np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        path = root / "images" / f"{i}.png"
        Image.fromarray(nrng.integers(0, 255, (image, image, 3), dtype=np.uint8)).save(path)
        records.append({"image": str(path), "caption": " ".join(rng.choice(WORDS) for _ in range(words))})
    return records


def prepare(root: Path, paths: dict[str, Path], size: str, queries: int, records: list[dict[str, Any]]) -> dict:
    """Build our model, save its trainable weights, export it as stock BLIP-2, and pre-tokenise the stock inputs."""
    import torch
    from safetensors.torch import save_file

    from vpgtrans.formats import export_model, stock_inputs
    from vpgtrans.model import build_model

    torch.manual_seed(0)
    model = build_model(spec_for(paths, size, queries))
    weights = root / f"trainable_q{queries}.safetensors"
    save_file({k: v.contiguous() for k, v in model.trainable_state_dict().items()}, str(weights))
    result = export_model(model, root / f"blip2_q{queries}", "hf-blip2")
    rows = []
    for rec in records:  # one example at a time: unpadded rows, the stock loop's collate pads per batch
        inp = stock_inputs(model, [model.template.sample("", rec["caption"])], result.image_token_id,
                           max_text_len=MAX_TEXT_LEN)
        rows.append({"input_ids": inp["input_ids"][0].tolist(), "labels": inp["labels"][0].tolist()})
    pixels = root / "pixels.safetensors"
    if not pixels.exists():
        from vpgtrans.data.dataset import DataConfig, build_dataset

        # Fill the feature cache here, so no timed process pays (or counts in its RSS) the one-off encoding.
        build_dataset(records, model, DataConfig(cache_dir=str(root / "cache")), progress=False)
        from vpgtrans.data.readers import ImageReader

        reader = ImageReader()
        pix = model.vision.preprocess([reader.decode(r) for r in records]).contiguous()
        save_file({"pixels": pix}, str(pixels))
    return {"weights": str(weights), "export": str(result.out), "stock_rows": rows, "pixels": str(pixels),
            "pad_id": int(model.llm.tokenizer.pad_token_id), "image_token_id": result.image_token_id,
            "model": model}


def equivalence(prep: dict[str, Any], records: list[dict[str, Any]], batch: int) -> dict[str, float]:
    """Loss and projector gradient of our model and the exported stock model on the same batch."""
    from safetensors.torch import load_file
    from transformers import Blip2ForConditionalGeneration

    from vpgtrans.formats import stock_inputs

    model = prep["model"]
    stock = Blip2ForConditionalGeneration.from_pretrained(prep["export"])
    samples = [model.template.sample("", r["caption"]) for r in records[:batch]]
    pixels = load_file(prep["pixels"])["pixels"][:batch]
    ours = model(model.encode_images(pixels), samples, max_text_len=MAX_TEXT_LEN)
    ours.backward()
    theirs = stock(pixel_values=pixels, **stock_inputs(model, samples, prep["image_token_id"],
                                                        max_text_len=MAX_TEXT_LEN)).loss
    theirs.backward()
    grad_diff = (model.projector.weight.grad - stock.language_projection.weight.grad).abs().max()
    model.zero_grad(set_to_none=True)
    ours, theirs = ours.detach(), theirs.detach()
    return {"loss_ours": float(ours), "loss_stock": float(theirs), "loss_abs_diff": abs(float(ours) - float(theirs)),
            "projector_grad_max_abs_diff": float(grad_diff)}


def optimizer_step_ms(model: Any, repeats: int = 30) -> dict[str, Any]:
    """CPU ms of one AdamW step over our trainable parameters: default foreach vs fused, interleaved."""
    import torch

    from vpgtrans.train import TrainConfig, make_optimizer, param_groups

    groups = param_groups(model, 0.05)
    for p in (p for g in groups for p in g["params"]):
        p.grad = torch.randn_like(p)
    c = TrainConfig()
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    opts = {"foreach": torch.optim.AdamW(clean, lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay),
            "make_optimizer": make_optimizer(groups, c)}
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(repeats):
        for name, opt in opts.items():
            times[name].append(_timed(opt.step))
    model.zero_grad(set_to_none=True)
    return {"params": sum(p.numel() for g in groups for p in g["params"]),
            "make_optimizer_fused": bool(opts["make_optimizer"].defaults.get("fused")),
            **{f"{k}_ms": round(statistics.median(v[1:]) * 1000, 2) for k, v in times.items()}}


def matmul_peak(sizes: list[int], repeats: int = 3) -> dict[str, Any]:
    """Best fp32 torch.matmul rate (GFLOP per CPU-second) over square sizes, on the current thread setting."""
    import torch

    rates = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.matmul(a, b)
        best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
        rates[str(n)] = round(2 * n ** 3 / best / 1e9, 2)
    return {"gflops_by_size": rates, "peak_gflops": max(rates.values())}


def _timed(fn: Any) -> float:
    start = time.process_time()  # CPU time, like the step times: other jobs on the box do not deflate it
    fn()
    return time.process_time() - start


# --- one variant, in its own process ----------------------------------------------------------------
def _quiet() -> None:
    import torch
    from transformers.utils import logging

    torch.set_num_threads(1)
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Time one variant at one (batch, queries) point; returns step times, FLOPs, tokens and peak RSS."""
    _quiet()
    import torch

    torch.manual_seed(0)
    rss_start = peak_rss_mb()
    kind = job["variant"]
    runner = _run_stock if kind.startswith("stock") else _run_trainer if kind.startswith("trainer") else _run_manual
    clock = Clock()
    flops, tokens, losses = runner(job, clock)
    wall, cpu = (clock.steps(t)[job["warmup"]:] for t in (clock.wall, clock.cpu))
    median, median_wall = statistics.median(cpu), statistics.median(wall)
    out = {k: job[k] for k in ("variant", "batch", "queries")}
    out.update(cpu_step_s=[round(t, 4) for t in cpu], wall_step_s=[round(t, 4) for t in wall],
               median_step_s=round(median, 5), median_wall_s=round(median_wall, 5), min_step_s=round(min(cpu), 5),
               samples_per_s=round(job["batch"] / median, 2), tokens_per_step=tokens,
               tokens_per_s=round(tokens / median, 1), flops_per_step=flops,
               achieved_gflops=round(flops / median / 1e9, 3), loss_first=round(losses[0], 5),
               loss_last=round(losses[-1], 5), rss_start_mb=rss_start, rss_peak_mb=peak_rss_mb())
    out["rss_growth_mb"] = round(out["rss_peak_mb"] - rss_start, 1)
    return out


class Clock:
    """Wall and process-CPU time at the start of every step (CPU time: what another job on the box cannot inflate)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        """Mark the start of a step (and the end of the previous one)."""
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    @staticmethod
    def steps(marks: list[float]) -> list[float]:
        """Durations between consecutive marks."""
        return [b - a for a, b in zip(marks, marks[1:])]


def _count_flops(step: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def _our_model(job: dict[str, Any]) -> Any:
    from safetensors.torch import load_file

    from vpgtrans.model import build_model

    model = build_model(job["spec"])
    state = load_file(job["weights"])
    model.vpg.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("vpg.")})
    model.projector.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("projector.")})
    return model


def _run_trainer(job: dict[str, Any], clock: Clock) -> tuple[int, int, list[float]]:
    import torch

    from vpgtrans.data.dataset import DataConfig, build_dataset
    from vpgtrans.train.config import TrainConfig
    from vpgtrans.train.objectives import lm_loss
    from vpgtrans.train import trainer as trainer_module
    from vpgtrans.train.runlog import read_log

    model = _our_model(job)
    data = DataConfig(feature_cache=job["variant"] != "trainer-nocache", cache_dir=job["cache_dir"])
    dataset, _ = build_dataset(job["records"], model, data, progress=False)
    # One step more than timed: a step ends where the next one's loss_fn call begins.
    cfg = TrainConfig(batch_size=job["batch"], max_steps=job["warmup"] + job["steps"] + 1, schedule="constant",
                      log_every=1, max_text_len=MAX_TEXT_LEN, gradient_checkpointing=job["variant"] == "trainer-ckpt")
    loss_fn = lm_loss(MAX_TEXT_LEN)

    def timed_loss(module: Any, batch: Any) -> Any:
        clock.tick()
        return loss_fn(module, batch)

    chosen = trainer_module.make_optimizer
    if job["variant"] == "trainer-adamw-foreach":  # how make_optimizer built AdamW before it asked for fused
        trainer_module.make_optimizer = lambda groups, c: torch.optim.AdamW(
            [{k: v for k, v in g.items() if k != "names"} for g in groups], lr=c.lr, betas=tuple(c.betas), eps=c.eps,
            weight_decay=c.weight_decay)
    try:
        with tempfile.TemporaryDirectory() as out:
            trainer = trainer_module.Trainer(model, timed_loss, dataset, cfg, out, progress=False, echo=lambda _: None)
            trainer.train()
            losses = [row["loss"] for row in read_log(Path(out) / "log.jsonl")]
    finally:
        trainer_module.make_optimizer = chosen
    batch = next(trainer.stream.batches(0))
    flops = _count_flops(lambda: loss_fn(model, batch).backward())
    return flops, _our_tokens(model, batch["samples"]), losses


def _our_tokens(model: Any, samples: list[Any]) -> int:
    ids, *_ = model.llm._sequences(model.vpg.config.num_query_tokens, samples, MAX_TEXT_LEN, True, False)
    return int(ids.numel())


def _run_manual(job: dict[str, Any], clock: Clock) -> tuple[int, int, list[float]]:
    from vpgtrans.data.readers import ImageReader
    from vpgtrans.train import TrainConfig, make_optimizer, param_groups

    model = _our_model(job)
    records = job["records"][: job["batch"]]
    reader = ImageReader()
    feats = model.encode_images(model.vision.preprocess([reader.decode(r) for r in records]))
    samples = [model.template.sample("", r["caption"]) for r in records]
    opt = make_optimizer(param_groups(model, 0.05), TrainConfig())  # the Trainer's optimizer, without the Trainer
    if job["variant"] == "manual-grads-into-llm":
        model.llm.requires_grad_(True)  # the mistake: frozen by the optimizer only, autograd still does the work
    model.train()
    losses = []
    for _ in range(job["warmup"] + job["steps"]):
        clock.tick()
        loss = model(feats, samples, max_text_len=MAX_TEXT_LEN)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    clock.tick()
    flops = _count_flops(lambda: model(feats, samples, max_text_len=MAX_TEXT_LEN).backward())
    return flops, _our_tokens(model, samples), losses


def _run_stock(job: dict[str, Any], clock: Clock) -> tuple[int, int, list[float]]:
    """What a user writes: preprocessed pixels + token ids in a DataLoader, frozen ViT/LLM, AdamW."""
    import torch
    from safetensors.torch import load_file
    from transformers import Blip2ForConditionalGeneration

    attn = "eager" if job["variant"] == "stock-eager" else "sdpa"
    model = Blip2ForConditionalGeneration.from_pretrained(job["export"], attn_implementation=attn)
    model.vision_model.requires_grad_(False)
    model.language_model.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]  # qformer, query_tokens, language_projection
    opt = torch.optim.AdamW(params, lr=1e-4)
    pixels = load_file(job["pixels"])["pixels"]
    rows, pad = job["stock_rows"], job["pad_id"]

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(rows[i]["input_ids"]) for i in idx)
        fill = lambda key, value: torch.tensor([rows[i][key] + [value] * (width - len(rows[i][key])) for i in idx])  # noqa: E731
        mask = torch.tensor([[1] * len(rows[i]["input_ids"]) + [0] * (width - len(rows[i]["input_ids"])) for i in idx])
        return {"pixel_values": pixels[idx], "input_ids": fill("input_ids", pad), "attention_mask": mask,
                "labels": fill("labels", -100)}

    loader = torch.utils.data.DataLoader(list(range(len(rows))), batch_size=job["batch"], shuffle=True,
                                         drop_last=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))

    def batches():
        while True:
            yield from loader

    stream = batches()
    model.train()
    losses = []
    for _ in range(job["warmup"] + job["steps"]):
        clock.tick()
        loss = model(**next(stream)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    clock.tick()
    batch = next(stream)
    flops = _count_flops(lambda: model(**batch).loss.backward())
    return flops, int(batch["input_ids"].numel()), losses


# --- orchestration ------------------------------------------------------------------------------------
PRELOAD = ["torch", "transformers", "vpgtrans.model", "vpgtrans.train.trainer", "vpgtrans_adapters.llm",
           "vpgtrans_adapters.qformer", "vpgtrans_adapters.vision", "transformers.models.blip_2.modeling_blip_2",
           "transformers.models.opt.modeling_opt"]


def _run(job: dict[str, Any], isolate: bool) -> dict[str, Any]:
    """Run one job in a fresh process forked from a server that already imported the libraries (own peak RSS)."""
    if not isolate:
        return run_job(job)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1) as pool:
        return pool.submit(run_job, job).result()


def plan_jobs(profile: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(variant, batch, queries) to measure: the two sweeps for trainer + stock, ablations at the base point,
    then the base pair again (`repeats` in all, spread over the run: the headline is their median)."""
    base = (profile["batch"], profile["query"])
    points = {(b, base[1]) for b in profile["batches"]} | {(base[0], q) for q in profile["queries"]} | {base}
    jobs = [(v, b, q) for v in SWEEP for b, q in sorted(points)]
    jobs += [(v, *base) for v in ABLATIONS]
    return jobs + [(v, *base) for _ in range(profile.get("repeats", 1) - 1) for v in SWEEP]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write step_speed.json/.png; returns the JSON data."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config, ≤ ~1 minute")
    parser.add_argument("--out", default=str(RESULTS), help="folder for step_speed.json and step_speed.png")
    parser.add_argument("--in-process", action="store_true",
                        help="run every variant in this process (faster start; peak RSS is then shared)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    _quiet()
    name = "quick" if args.quick else "default"
    profile = PROFILES[name]
    size = profile["size"]
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="step-speed-") as tmp:
        root = Path(tmp)
        paths = make_models(root, size)
        n_records = 2 * max(profile["batches"] + [profile["batch"]])
        records = make_records(root, n_records, profile["caption_words"], SIZES[size]["vision"]["image"])
        preps = {}
        for q in sorted(set(profile["queries"]) | {profile["query"]}):
            preps[q] = prepare(root, paths, size, q, records)
        check = equivalence(preps[profile["query"]], records, profile["batch"])
        adamw = optimizer_step_ms(preps[profile["query"]]["model"])
        for prep in preps.values():
            del prep["model"]
        peak = matmul_peak(profile["matmul"])
        for variant, batch, queries in plan_jobs(profile):
            prep = preps[queries]
            attn = "eager" if variant == "trainer-eager" else "sdpa"
            job = {"variant": variant, "batch": batch, "queries": queries, "warmup": profile["warmup"],
                   "steps": profile["steps"], "spec": spec_for(paths, size, queries, attn), "records": records,
                   "cache_dir": str(root / "cache"), **prep}
            row = _run(job, not args.in_process)
            row["fraction_of_peak"] = round(row["achieved_gflops"] / peak["peak_gflops"], 4)
            results.append(row)
            print(f"  {variant:<22} batch {batch:>3} queries {queries:>3}: {row['median_step_s'] * 1000:8.1f} CPU-ms/step "
                  f"({row['median_wall_s'] * 1000:.1f} wall)", flush=True)
    data = summarize(profile, name, results, peak, check, isolated=not args.in_process)
    data["optimizer_step"] = adamw
    data["wall_time_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    write_json(out / "step_speed.json", data)
    if not args.no_plot:
        plot(data, out / "step_speed.png")
    print(table(data))
    return data


def summarize(profile: dict[str, Any], name: str, rows: list[dict[str, Any]], peak: dict[str, Any],
              check: dict[str, float], isolated: bool) -> dict[str, Any]:
    """The JSON document: machine, config, every measurement, the headline ratios and the scaling series."""
    def find(variant: str, batch: int, queries: int) -> dict[str, Any]:
        """One point's figures; a point measured several times gets the median of each (max of RSS)."""
        same = [r for r in rows if (r["variant"], r["batch"], r["queries"]) == (variant, batch, queries)]
        med = {k: statistics.median(r[k] for r in same) for k in ("median_step_s", "median_wall_s", "min_step_s",
                                                                   "fraction_of_peak")}
        return {**same[0], **med, "samples_per_s": round(batch / med["median_step_s"], 2), "runs": len(same),
                "runs_step_ms": [round(r["median_step_s"] * 1000, 1) for r in same],
                **{k: max(r[k] for r in same) for k in ("rss_peak_mb", "rss_growth_mb")}}

    base = (profile["batch"], profile["query"])
    a, b = find("trainer", *base), find("stock", *base)
    headline = {"batch": base[0], "queries": base[1], "ours_cpu_ms": round(a["median_step_s"] * 1000, 2),
                "stock_cpu_ms": round(b["median_step_s"] * 1000, 2), "ours_runs_ms": a["runs_step_ms"],
                "stock_runs_ms": b["runs_step_ms"],
                "step_time_ratio_ours_over_stock": round(a["median_step_s"] / b["median_step_s"], 3),
                "throughput_ratio_ours_over_stock": round(a["samples_per_s"] / b["samples_per_s"], 3),
                "speedup_stock_time_over_ours": round(b["median_step_s"] / a["median_step_s"], 3),
                "wall_step_time_ratio_ours_over_stock": round(a["median_wall_s"] / b["median_wall_s"], 3),
                # Load-independent: the work each step does (the stock side adds the vision forward).
                "flops_ratio_ours_over_stock": round(a["flops_per_step"] / b["flops_per_step"], 3),
                "fraction_of_peak_ours": a["fraction_of_peak"], "fraction_of_peak_stock": b["fraction_of_peak"],
                "rss_peak_mb_ours": a["rss_peak_mb"], "rss_peak_mb_stock": b["rss_peak_mb"],
                "rss_growth_mb_ours": a["rss_growth_mb"], "rss_growth_mb_stock": b["rss_growth_mb"]}
    scaling = {}
    for axis, values, fixed in (("batch", profile["batches"], base[1]), ("queries", profile["queries"], base[0])):
        series = []
        for v in values:
            point = (v, fixed) if axis == "batch" else (fixed, v)
            ra, rb = find("trainer", *point), find("stock", *point)
            series.append({axis: v, "ours_ms": round(ra["median_step_s"] * 1000, 2),
                           "stock_ms": round(rb["median_step_s"] * 1000, 2),
                           "ratio": round(ra["median_step_s"] / rb["median_step_s"], 3),
                           "flops_ratio": round(ra["flops_per_step"] / rb["flops_per_step"], 3),
                           "ours_frac_peak": ra["fraction_of_peak"], "stock_frac_peak": rb["fraction_of_peak"],
                           "ours_rss_mb": ra["rss_peak_mb"], "stock_rss_mb": rb["rss_peak_mb"]})
        scaling[axis] = series
    tried = {v: {"what": d, "median_step_ms": round(find(v, *base)["median_step_s"] * 1000, 2),
                 "min_step_ms": round(find(v, *base)["min_step_s"] * 1000, 2),
                 "vs_trainer": round(find(v, *base)["median_step_s"] / a["median_step_s"], 3)}
             for v, d in ABLATIONS.items()}
    return {"benchmark": "step_speed", "profile": name, "machine": machine_info(),
            "note": "one torch thread per process; step time = median process CPU time per step (wall time kept "
                    "too: the box may be shared with other jobs, see loadavg, which inflates wall but not CPU time)",
            "config": {"sizes": SIZES[profile["size"]], **{k: v for k, v in profile.items() if k != "size"},
                       "size": profile["size"], "max_text_len": MAX_TEXT_LEN},
            "flops": "measured with torch.utils.flop_counter.FlopCounterMode on one forward+backward "
                     "(matmul-like ops; elementwise not counted)",
            "rss": ("ru_maxrss of each variant's own process (forked from a server holding torch + transformers: "
                    "rss_start_mb); rss_growth_mb = peak - start") if isolated
                   else "ru_maxrss of one shared process (cumulative high-water mark)",
            "equivalence": check, "peak": peak, "headline": headline, "scaling": scaling, "tried": tried,
            "variants": {**SWEEP, **ABLATIONS}, "results": rows}


def table(data: dict[str, Any]) -> str:
    """Console table of every measurement plus the headline."""
    lines = [f"{'variant':<22}{'batch':>6}{'query':>6}{'cpu ms':>9}{'min ms':>9}{'wall ms':>9}{'samples/s':>11}{'GFLOP/s':>9}"
             f"{'%peak':>7}{'RSS MiB':>9}"]
    for r in data["results"]:
        lines.append(f"{r['variant']:<22}{r['batch']:>6}{r['queries']:>6}{r['median_step_s'] * 1000:>9.1f}"
                     f"{r['min_step_s'] * 1000:>9.1f}{r['median_wall_s'] * 1000:>9.1f}"
                     f"{r['samples_per_s']:>11.1f}{r['achieved_gflops']:>9.2f}{100 * r['fraction_of_peak']:>7.1f}"
                     f"{r['rss_peak_mb']:>9.0f}")
    h, e = data["headline"], data["equivalence"]
    o = data.get("optimizer_step", {})
    lines.append(f"peak fp32 matmul: {data['peak']['peak_gflops']} GFLOP/s (1 thread); AdamW step over {o.get('params')} "
                 f"params: foreach {o.get('foreach_ms')} ms, make_optimizer {o.get('make_optimizer_ms')} ms")
    lines.append(f"ours/stock at batch {h['batch']}, {h['queries']} queries: step time x{h['step_time_ratio_ours_over_stock']}"
                 f", throughput x{h['throughput_ratio_ours_over_stock']} (stock is {h['speedup_stock_time_over_ours']}x "
                 f"slower); same loss: {e['loss_ours']:.6f} vs {e['loss_stock']:.6f}")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> None:
    """Step time vs batch and vs queries (ours vs stock), and what each tried change gave."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, axis in zip(axes, ("batch", "queries")):
        s = data["scaling"][axis]
        xs = [p[axis] for p in s]
        ax.plot(xs, [p["ours_ms"] for p in s], "o-", label="vpgtrans Trainer (cached features)")
        ax.plot(xs, [p["stock_ms"] for p in s], "s--", label="stock Blip2ForConditionalGeneration loop")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel("median CPU ms / step")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.legend(fontsize=8)
    base, tried = data["headline"], data["tried"]
    names = ["trainer", "stock", *tried]
    values = [base["ours_cpu_ms"], base["stock_cpu_ms"], *(t["median_step_ms"] for t in tried.values())]
    axes[2].barh(names[::-1], values[::-1])
    axes[2].set_xlabel(f"ms / step (batch {base['batch']}, {base['queries']} queries)")
    m = data["machine"]
    fig.suptitle(f"training step speed — {m.get('cpu')}, {m.get('torch_threads')} thread, "
                 f"peak {data['peak']['peak_gflops']} GFLOP/s; loaded shared box", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
