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
    qformer-stage1/            stage1.json + stage1.safetensors: the Q-Former after BLIP-2 stage 1 (ITC, ITM, ITG)
                               on the world's images; every demo and benchmark arm starts from it, as in the paper

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

FORMAT_VERSION = 3  # 3: the stage-1 Q-Former is part of the world
MANIFEST = "world.json"
SPLITS = ("train", "val", "test")
LM_MAX_LEN = 256
TOKENIZER_VOCAB = {"opt": 1000, "llama": 800, "t5": 600}
# Room per word a richer world adds (more colours and shapes): a BPE vocabulary must keep every world word whole.
VOCAB_PER_EXTRA_WORD = 5
# 3 folds, not 5: the report ran 126 s of the build's critical path once the stage-1 Q-Former joined it (39 s now).
CONVERTER_FOLDS = 3
_LM_SECONDS = {"llama": 146, "flant5": 140, "opt-m": 122, "opt-s": 94}  # one idle thread, for the job order


# Knobs added after worlds were already built and shared: left out of the identity at their default, so a world
# built before a knob existed is still the same world (and its benchmark caches stay valid).
_LATER_KNOBS = ("concept_tail",)


def tokenizer_vocab(cfg: WorldConfig) -> dict[str, int]:
    """Each tokenizer family's vocabulary size for this world (the default world's sizes plus room for new words)."""
    extra = len(all_words(cfg) - all_words(WorldConfig()))
    return {family: size + VOCAB_PER_EXTRA_WORD * extra for family, size in TOKENIZER_VOCAB.items()}


def _config_identity(cfg: WorldConfig) -> dict[str, Any]:
    default = WorldConfig()
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in _LATER_KNOBS or v != getattr(default, k)}


def _identity(cfg: WorldConfig, seed: int) -> dict[str, Any]:
    from .lms import lm_specs
    from .stage1 import stage1_recipe_identity

    # The LM recipes live in code, not in the config: without them here, a world built before a change to
    # the LM sizes/steps would still count as current and silently be reused.
    lms = {"specs": [dataclasses.asdict(s) for s in lm_specs(cfg)], "vocab": tokenizer_vocab(cfg),
           "max_len": LM_MAX_LEN}
    return {"format": FORMAT_VERSION, "seed": seed, "config": _config_identity(cfg), "lms": lms,
            "stage1_recipe": stage1_recipe_identity()}


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
    identity = _identity(cfg, seed)
    if not manifest or {k: manifest.get(k) for k in identity} != identity:
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
    # One thread for every part (ViT, LMs, stage-1 Q-Former), each in its own process when there are cores: the
    # float sums then run in one order on every machine, so a seeded world is the same everywhere (with 2 threads
    # the ViT, hence every VPG trained on it, differed), and a busy machine does not slow a part down with threads
    # waiting for cores (measured 6x on the ViT phase).
    torch.set_num_threads(1)
    timings: dict[str, float] = {}
    try:
        t = time.time()
        arrays = _write_data(root / "data", cfg, seed, progress)
        timings["data"] = round(time.time() - t, 1)
        tokenizers = _write_tokenizers(root, cfg, seed)
        t = time.time()
        with _Lanes(_lanes(cfg), progress) as pool:
            report = _train_parts(pool, root, cfg, seed, arrays, tokenizers, timings)
        timings["parts"] = round(time.time() - t, 1)
    finally:
        torch.set_num_threads(threads)
    sizes = {f"n_{s}": getattr(cfg, f"n_{s}") for s in SPLITS}
    lm_report = report["lms"]
    converters = lm_report.pop("converters")
    return {"sizes": {**sizes, **lm_report.pop("sizes")}, "timings": timings, "vit_probe": report["vit"],
            "stage1": report["stage1"], "lm_context_check": lm_report, "converter_cosines": converters}


def _lanes(cfg: WorldConfig) -> int:
    """Worker lanes for the world's parts: one per core, none for a tiny world (starting them costs more)."""
    if cfg.lm_scale == "tiny":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(len(_lm_specs(cfg)) + 1, cores))


def _lm_specs(cfg: WorldConfig) -> list[Any]:
    """The world's LMs (imported late: torch loads only when building)."""
    from .lms import lm_specs

    return lm_specs(cfg)


def _train_parts(pool: _Lanes, root: Path, cfg: WorldConfig, seed: int, arrays: dict[str, Any],
                 tokenizers: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """The ViT, the LMs, the stage-1 Q-Former (after the ViT) and the converter report (after the LMs).

    Lane 0 trains the ViT, then the stage-1 Q-Former (it needs the ViT); the LMs go round the other lanes,
    longest first; the converter report runs in this process once every LM is done, while the stage-1 Q-Former
    may still train. Measured on 2 idle cores: ViT 144 s then stage 1 312 s on one lane, the LMs 152 + 126 + 111 +
    78 s on the other, the report 39 s: 545 s in all (the order before, with opt-s ahead of stage 1, took 607 s).
    """
    from .stage1 import train_stage1

    specs = _lm_specs(cfg)
    longest_first = sorted(range(len(specs)), key=lambda k: -_LM_SECONDS.get(specs[k].name, 0.0))
    pool.relay(f"[world] the ViT, the LMs ({', '.join(s.name for s in specs)}) and the stage-1 Q-Former in "
               f"{pool.lanes} worker process(es), one thread each")
    vit = pool.submit(0, _train_vit, str(root), cfg, seed, arrays)
    others = max(1, pool.lanes - 1)
    lms = {k: pool.submit(1 + i % others, _train_lm, str(root), cfg, seed, k) for i, k in enumerate(longest_first)}
    vit_report = pool.result(vit)
    timings["vit"] = vit_report.pop("seconds")
    stage1 = pool.submit(0, train_stage1, str(root), cfg, seed)
    results = [pool.result(lms[k]) for k in range(len(specs))]
    lm_report = _lm_report(root, cfg, specs, tokenizers, results, timings, pool.relay)
    stage1_report = pool.result(stage1)
    timings["stage1"] = stage1_report["seconds"]
    timings["stage1_cpu"] = stage1_report["cpu_seconds"]
    return {"vit": vit_report, "lms": lm_report, "stage1": stage1_report}


def _train_vit(root: str, cfg: WorldConfig, seed: int, arrays: dict[str, Any],
               log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    t = time.time()
    probe = _build_vit(Path(root) / "vit", cfg, seed, arrays, log)
    return {**probe, "seconds": round(time.time() - t, 1)}


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


def _write_tokenizers(root: Path, cfg: WorldConfig, seed: int) -> dict[str, Any]:
    """Train one tokenizer per LM family and save it into every LM's directory; {family: tokenizer}."""
    from .lms import lm_specs, text_samples
    from .tokenizers import check_whole_words, llama_tokenizer, opt_tokenizer, t5_tokenizer, training_corpus

    makers = {"opt": opt_tokenizer, "llama": llama_tokenizer, "t5": t5_tokenizer}
    words, vocab = all_words(cfg), tokenizer_vocab(cfg)
    tokenizers: dict[str, Any] = {}
    for spec in lm_specs(cfg):
        if spec.family not in tokenizers:
            steps = max(1, int(round(cfg.lm_steps * spec.step_share)))
            samples = text_samples(cfg, seed, min(steps * cfg.lm_batch, 5000), spec.family)
            segments = (x for s in samples for x in (s.before, s.ctx, s.after, s.target))
            tok = makers[spec.family](training_corpus(segments, words), vocab[spec.family], LM_MAX_LEN)
            check_whole_words(tok, words, spec.name)
            tokenizers[spec.family] = tok
        tokenizers[spec.family].save_pretrained(root / spec.name)
    return tokenizers


def _lm_report(root: Path, cfg: WorldConfig, specs: list[Any], tokenizers: dict[str, Any],
               results: list[dict[str, Any]], timings: dict[str, float],
               progress: Callable[[str], None]) -> dict[str, Any]:
    """Context checks and sizes of the trained LMs, then the converter report over every ordered pair."""
    from collections import Counter

    from .fidelity import pair_report, report_lines, token_counts

    report: dict[str, Any] = {"sizes": {}}
    spaces: dict[str, dict[str, Any]] = {}
    caps = [c for line in (root / "data" / "train.jsonl").read_text().splitlines() for c in json.loads(line)["captions"]]
    for spec, res in zip(specs, results):
        report[spec.name] = res["check"]
        report["sizes"][spec.name] = {"params": res["params"], "vocab": res["vocab"]}
        tok = tokenizers[spec.family]
        spaces[spec.name] = {"tok": tok, "emb": res["emb"], "seen": Counter(res["seen"]),
                             "captions": token_counts(tok, caps)}
        timings[spec.name] = res["seconds"]
        timings[f"{spec.name}_cpu"] = res["cpu_seconds"]  # one thread: its wall time on an idle core
    t = time.time()
    progress(f"[world] converters: held-out cosine for every ordered pair of LMs ({CONVERTER_FOLDS}-fold over the "
             "seen token pairs)")
    # The tiny world only has to show that the report is there: fewer SGD steps.
    quick = {"configs": {"linear-cosine": {"min_steps": 50}}} if cfg.lm_scale == "tiny" else {}
    # Each pair's line as soon as it is scored (the same report as fidelity.converter_report): the phase takes
    # minutes (466 s on a busy 2-core machine) and printed nothing until all twelve pairs were done.
    pairs = [(a, b) for a in spaces for b in spaces if a != b]
    report["converters"] = {}
    for i, (a, b) in enumerate(pairs, 1):
        row = report["converters"][f"{a}>{b}"] = pair_report(spaces[a], spaces[b], folds=CONVERTER_FOLDS, **quick)
        progress(f"    [{i}/{len(pairs)}, {time.time() - t:.0f}s] {report_lines({f'{a}>{b}': row})[0]}")
    timings["converters"] = round(time.time() - t, 1)
    return report


class _Lanes:
    """Jobs in spawned one-thread worker processes, one FIFO lane each, their progress lines relayed.

    With one lane every job runs in this process, at once. Lanes (not a shared pool) fix which jobs share a
    core, so the build can place the ViT → stage-1 chain beside the LMs by plan instead of by arrival order.
    """

    def __init__(self, lanes: int, progress: Callable[[str], None]):
        self.lanes, self.progress = lanes, progress
        self._stack: Any = None

    def __enter__(self) -> "_Lanes":
        if self.lanes > 1:
            import contextlib
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")
            self._stack = contextlib.ExitStack()
            manager = self._stack.enter_context(ctx.Manager())
            self._pools = [self._stack.enter_context(ProcessPoolExecutor(1, mp_context=ctx))
                           for _ in range(self.lanes)]
            self._queue = manager.Queue()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            if exc[0] is not None:  # a failed part fails the build now, not after the others finish
                for pool in self._pools:
                    pool.shutdown(wait=False, cancel_futures=True)
            self._stack.close()

    def submit(self, lane: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Queue `fn(*args, log=...)` on `lane` (modulo the lanes there are); with one lane it runs now."""
        from concurrent.futures import Future

        if self.lanes > 1:
            return self._pools[lane % self.lanes].submit(fn, *args, log=self._queue.put)
        done: Future = Future()
        done.set_result(fn(*args, log=self.progress))
        return done

    def relay(self, line: str | None = None) -> None:
        """Print the workers' lines that have come in, then `line`."""
        if self.lanes > 1:
            while not self._queue.empty():
                self.progress(self._queue.get())
        if line is not None:
            self.progress(line)

    def result(self, future: Any) -> Any:
        """Wait for one job, relaying progress; a job's error is raised here."""
        from concurrent.futures import wait

        while not future.done():
            wait([future], timeout=1.0)
            self.relay()
        self.relay()
        return future.result()


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
