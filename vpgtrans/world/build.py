"""Build the whole synthetic world into one directory, deterministically and atomically.

Layout of ``<out>``::

    world.json                 manifest: seed, config, sizes, versions, timings, checks, files (sha256),
                               converter_cosines (per ordered LM pair: token-pair coverage, held-out
                               converter cosine uniform and caption-weighted, for every built-in converter)
    data/{train,val,test}.jsonl
    data/images/<split>/<n>.png
    vit/                       Blip2VisionModel + preprocessor_config.json
    opt-s/ opt-m/              OPTForCausalLM (one shared tokenizer, like real OPT sizes)
    llama/                     LlamaForCausalLM + its own tokenizer
    flant5/                    T5ForConditionalGeneration + its own tokenizer

Each JSONL line is one image::

    {"id": "train-00000", "image": "images/train/00000.png", "caption": str, "captions": [str, ...],
     "question": str, "answer": str, "qa": [[question, answer], ...], "attributes": {...}}

``caption`` is the first of ``captions`` (several templates, for CIDEr references); ``question`` /
``answer`` is one pair drawn from ``qa`` (all pairs of the image). Image paths are relative to the
JSONL file's directory. ``attributes`` = ``{"count", "objects": [{"shape", "color", "size",
"position", "row", "col"}], "relation": null | {"subject", "object", "relation"}}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import VpgtransError
from ..paths import world_dir
from .config import WorldConfig
from .scene import all_words, describe, rng_for, sample_scene

FORMAT_VERSION = 2
MANIFEST = "world.json"
SPLITS = ("train", "val", "test")
LM_MAX_LEN = 256
TOKENIZER_VOCAB = {"opt": 1000, "llama": 800, "t5": 600}


def _identity(cfg: WorldConfig, seed: int) -> dict[str, Any]:
    from .lms import lm_specs

    # The LM recipes live in code, not in the config: without them here, a world built before a change to
    # the LM sizes/steps would still count as current and silently be reused.
    lms = {"specs": [dataclasses.asdict(s) for s in lm_specs(cfg)], "vocab": TOKENIZER_VOCAB, "max_len": LM_MAX_LEN}
    return {"format": FORMAT_VERSION, "seed": seed, "config": dataclasses.asdict(cfg), "lms": lms}


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The world's manifest, or None when absent or unreadable."""
    try:
        return json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_complete(out: Path, manifest: dict[str, Any] | None) -> bool:
    """True when `manifest` is a world manifest and every file it lists is present under `out`."""
    return bool(manifest) and all((Path(out) / f).is_file() for f in manifest.get("files", {}))


def is_current(out: Path, cfg: WorldConfig, seed: int) -> bool:
    """True when `out` holds a complete world built from this config and seed."""
    manifest = read_manifest(out)
    if not manifest or {k: manifest.get(k) for k in ("format", "seed", "config", "lms")} != _identity(cfg, seed):
        return False
    return is_complete(out, manifest)


def build_world(out: str | Path | None = None, seed: int = 0, progress: Callable[[str], None] = print,
                config: WorldConfig | None = None, force: bool = False) -> Path:
    """Build the world into `out` (default `world_dir()`); skipped when already built alike, unless `force`."""
    out = Path(out).expanduser() if out is not None else world_dir()
    cfg = config or WorldConfig()
    if not force and is_current(out, cfg, seed):
        progress(f"world at {out} is up to date (seed {seed}); use --force to rebuild")
        return out
    if out.exists() and (not out.is_dir() or (read_manifest(out) is None and any(out.iterdir()) and not force)):
        raise VpgtransError(f"{out} exists and is not a vpgtrans world",
                            "choose another --out, empty it, or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    try:
        report = _build_into(tmp, cfg, seed, progress)
        manifest = {**_identity(cfg, seed), "build_seconds": round(time.time() - t0, 1), "versions": _versions(),
                    **report, "files": _file_list(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _swap(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"world built at {out} in {time.time() - t0:.0f}s")
    return out


def _remove_stale(out: Path) -> None:
    """Delete leftovers of builds that were killed (their process is gone)."""
    for path in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = path.name[len(out.name) + 2:].partition("-")
        if kind in ("building", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with renames only, so no reader ever sees half a world."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _build_into(root: Path, cfg: WorldConfig, seed: int, progress: Callable[[str], None]) -> dict[str, Any]:
    import torch

    threads = torch.get_num_threads()
    # One thread for the ViT, as for every LM: the float sums then run in one order on every machine, so a
    # seeded world is the same everywhere (with 2 threads the ViT, hence every VPG trained on it, differed),
    # and a busy machine does not slow it down with threads waiting for cores (measured 6x on the ViT phase).
    torch.set_num_threads(1)
    timings: dict[str, float] = {}
    try:
        t = time.time()
        arrays = _write_data(root / "data", cfg, seed, progress)
        timings["data"] = round(time.time() - t, 1)
        t = time.time()
        vit_report = _build_vit(root / "vit", cfg, seed, arrays, progress)
        timings["vit"] = round(time.time() - t, 1)
        t = time.time()
        lm_report = _build_lms(root, cfg, seed, progress, timings)
        timings["lms"] = round(time.time() - t, 1)
    finally:
        torch.set_num_threads(threads)
    sizes = {f"n_{s}": getattr(cfg, f"n_{s}") for s in SPLITS}
    converters = lm_report.pop("converters")
    return {"sizes": {**sizes, **lm_report.pop("sizes")}, "timings": timings, "vit_probe": vit_report,
            "lm_context_check": lm_report, "converter_cosines": converters}


def _write_data(data: Path, cfg: WorldConfig, seed: int, progress: Callable[[str], None]) -> dict[str, Any]:
    from PIL import Image

    from .render import render

    keep: dict[str, Any] = {}
    for split in SPLITS:
        n = getattr(cfg, f"n_{split}")
        t = time.time()
        img_dir = data / "images" / split
        img_dir.mkdir(parents=True)
        images, masks, scenes = [], [], []
        with open(data / f"{split}.jsonl", "w") as f:
            for i in range(n):
                rng = rng_for(seed, split, i)
                scene = sample_scene(rng, cfg)
                pixels, mask = render(scene, rng, cfg.image_size, cfg.jitter)
                rel = f"images/{split}/{i:05d}.png"
                Image.fromarray(pixels).save(data / rel)
                record = {"id": f"{split}-{i:05d}", "image": rel, **describe(scene, rng, cfg), "attributes": scene}
                f.write(json.dumps(record) + "\n")
                if split != "test":
                    images.append(pixels)
                    masks.append(mask)
                    scenes.append(scene)
        if split != "test":
            keep[split] = (np.stack(images), np.stack(masks), scenes)
        progress(f"[world] data: {n} {split} images ({time.time() - t:.1f}s)")
    return keep


def _build_vit(out: Path, cfg: WorldConfig, seed: int, arrays: dict[str, Any],
               progress: Callable[[str], None]) -> dict[str, float]:
    from .vit import labels_for, pretrain_vit, probe_accuracy, save_vit

    progress(f"[world] vit: pretraining Blip2VisionModel ({cfg.vit_layers} layers, hidden {cfg.vit_hidden}, "
             f"{cfg.vit_steps} steps)")
    train_images, train_masks, train_scenes = arrays["train"]
    val_images, val_masks, val_scenes = arrays["val"]
    vit, heads = pretrain_vit(cfg, seed, train_images, labels_for(train_scenes, train_masks, cfg), progress)
    probe = probe_accuracy(vit, heads, val_images, labels_for(val_scenes, val_masks, cfg))
    progress(f"[world] vit: held-out head accuracy {probe}")
    save_vit(vit, cfg, out)
    return probe


def _build_lms(root: Path, cfg: WorldConfig, seed: int, progress: Callable[[str], None],
               timings: dict[str, float]) -> dict[str, Any]:
    """Tokenizers here, then the four LMs in parallel worker processes, then the converter report."""
    from collections import Counter

    from .fidelity import pair_report, report_lines
    from .lms import lm_specs, text_samples
    from .tokenizers import check_whole_words, llama_tokenizer, opt_tokenizer, t5_tokenizer, training_corpus

    makers = {"opt": opt_tokenizer, "llama": llama_tokenizer, "t5": t5_tokenizer}
    words = all_words(cfg)
    tokenizers: dict[str, Any] = {}
    specs = lm_specs(cfg)
    for spec in specs:
        if spec.family not in tokenizers:
            steps = max(1, int(round(cfg.lm_steps * spec.step_share)))
            samples = text_samples(cfg, seed, min(steps * cfg.lm_batch, 5000), spec.family)
            segments = (x for s in samples for x in (s.before, s.ctx, s.after, s.target))
            tok = makers[spec.family](training_corpus(segments, words), TOKENIZER_VOCAB[spec.family], LM_MAX_LEN)
            check_whole_words(tok, words, spec.name)
            tokenizers[spec.family] = tok
        tokenizers[spec.family].save_pretrained(root / spec.name)
    # Each LM trains on one thread, in its own process when there are cores for it: tiny models gain
    # nothing from a second thread, and one thread per LM keeps the weights the same on every machine.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # A tiny world (tests) trains in seconds: starting worker processes would cost more than it saves.
    workers = 1 if cfg.lm_scale == "tiny" else max(1, min(len(specs), cores))
    jobs = [(str(root), cfg, seed, k) for k in range(len(specs))]
    progress(f"[world] LMs: {', '.join(s.name for s in specs)} in {workers} worker process(es), one thread each")
    if workers == 1:
        results = [_train_lm(*job, log=progress) for job in jobs]
    else:
        results = _in_workers(jobs, workers, progress)
    report: dict[str, Any] = {"sizes": {}}
    spaces: dict[str, dict[str, Any]] = {}
    caps = [c for line in (root / "data" / "train.jsonl").read_text().splitlines() for c in json.loads(line)["captions"]]
    from .fidelity import token_counts

    for spec, res in zip(specs, results):
        report[spec.name] = res["check"]
        report["sizes"][spec.name] = {"params": res["params"], "vocab": res["vocab"]}
        tok = tokenizers[spec.family]
        spaces[spec.name] = {"tok": tok, "emb": res["emb"], "seen": Counter(res["seen"]),
                             "captions": token_counts(tok, caps)}
        timings[spec.name] = res["seconds"]
        timings[f"{spec.name}_cpu"] = res["cpu_seconds"]  # one thread: its wall time on an idle core
    t = time.time()
    progress("[world] converters: held-out cosine for every ordered pair of LMs (5-fold over the seen token pairs)")
    # The tiny world only has to show that the report is there: fewer folds and SGD steps.
    quick = {"folds": 3, "configs": {"linear-cosine": {"min_steps": 50}}} if cfg.lm_scale == "tiny" else {}
    # Each pair's line as soon as it is scored (the same report as fidelity.converter_report): the phase takes
    # minutes (466 s on a busy 2-core machine) and printed nothing until all twelve pairs were done.
    pairs = [(a, b) for a in spaces for b in spaces if a != b]
    report["converters"] = {}
    for i, (a, b) in enumerate(pairs, 1):
        row = report["converters"][f"{a}>{b}"] = pair_report(spaces[a], spaces[b], **quick)
        progress(f"    [{i}/{len(pairs)}, {time.time() - t:.0f}s] {report_lines({f'{a}>{b}': row})[0]}")
    timings["converters"] = round(time.time() - t, 1)
    return report


def _in_workers(jobs: list[tuple], workers: int, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """`_train_lm` over `jobs` in spawned processes, their progress lines relayed as they come."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        queue = manager.Queue()
        futures = [pool.submit(_train_lm, *job, log=queue.put) for job in jobs]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_EXCEPTION)
            while not queue.empty():
                progress(queue.get())
            for f in done:
                f.result()  # a failed LM fails the build now, not after the others finish
        return [f.result() for f in futures]


def _train_lm(root: str, cfg: WorldConfig, seed: int, k: int, log: Callable[[str], None] = print, *,
              spec: Any = None, init_seed: int | None = None, steps_mult: float = 1.0) -> dict[str, Any]:
    """Pretrain LM number `k` of `lm_specs(cfg)` into root/<name> (its tokenizer is already there).

    `spec`, `init_seed` and `steps_mult` train another LM on the same text instead (benchmarks/_world_variant.py):
    its own architecture/name, init and batch-order seed (default seed x 1000 + k), and multiple of the steps."""
    import torch
    from transformers import AutoTokenizer

    from .fidelity import token_counts
    from .lms import Encoder, context_check, eval_samples, lm_specs, make_model, pretrain, text_samples

    torch.set_num_threads(1)
    t, cpu = time.time(), time.process_time()
    spec = spec or lm_specs(cfg)[k]
    init = seed * 1000 + k if init_seed is None else init_seed
    out = Path(root) / spec.name
    tok = AutoTokenizer.from_pretrained(out)
    steps = max(1, int(round(cfg.lm_steps * spec.step_share * steps_mult)))
    samples = text_samples(cfg, seed, steps * cfg.lm_batch, spec.family)
    torch.manual_seed(init)
    model = make_model(spec, tok, LM_MAX_LEN)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[world] {spec.name}: {type(model).__name__}, {n_params / 1e6:.2f}M params, vocab {len(tok)}, {steps} steps")
    enc = Encoder(tok, spec.family)
    pretrain(model, enc, samples, cfg, steps, init, lambda line: log(f"  {spec.name}{line}"),
             lr=cfg.lm_lr * spec.lr_share)
    check = context_check(model, enc, eval_samples(cfg, seed))
    log(f"[world] {spec.name}: caption loss with true context {check['true_context']:.3f}, shuffled "
        f"{check['shuffled_context']:.3f}, none {check['no_context']:.3f} ({time.time() - t:.0f}s)")
    model.save_pretrained(out)
    return {"check": check, "params": n_params, "vocab": len(tok), "seconds": round(time.time() - t, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1),
            "emb": model.get_input_embeddings().weight.detach().clone(),
            "seen": dict(token_counts(tok, [x for s in samples for x in (s.before, s.ctx, s.after, s.target)]))}


def _file_list(root: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        files[path.relative_to(root).as_posix()] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return files


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("vpgtrans", "torch", "transformers", "tokenizers", "numpy", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out
