"""One-shot CUDA check: real-size training steps, measured memory vs the estimator, converter fit, generation.

    PYTHONPATH=. python benchmarks/cuda_check.py                   # GPU: OPT-2.7B and LLaMA-7B shapes
    PYTHONPATH=. python benchmarks/cuda_check.py --cpu --tiny      # functional test on CPU (width 64, 2 layers)

Random weights, nothing downloaded: each LLM is a config.json (save_pretrained, beside a tiny tokenizer, as
benchmarks/memory.py's `write_llm` lays it out) whose weights the project's own backend creates directly on the
device (a 7B checkpoint would take minutes to write and read). The vision tower is a small BLIP-2 ViT (EVA ViT-g
width and 224/14 patches, 4 of its 39 layers). Training runs `vpgtrans.train.Trainer` steps (accelerate bf16
autocast, fused AdamW, `lm_loss` on cached features) as stage 2 does. Each check is independent: a failure is
recorded with its traceback in the JSON (rewritten after every check) and the others go on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
# Before torch loads: one thread for the CPU test (the brief's budget), all cores for the CPU work of a GPU run.
os.environ.setdefault("OMP_NUM_THREADS", "1" if "--cpu" in sys.argv else str(os.cpu_count() or 1))
for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "benchmarks")) if p not in sys.path]

import torch  # noqa: E402

from _common import machine_info, write_json  # noqa: E402
from memory import train_config  # noqa: E402  (benchmarks/memory.py: TrainConfig from batch/text/ckpt)

GIB = 2 ** 30
# The papers' LLM shapes (as vpgtrans.memory.KNOWN_LLMS); batch and max_text_len as the stage-2 recipes use.
FULL = {"llms": [dict(name="opt-2.7b-shapes", llm="opt", width=2560, depth=32, heads=32, ffn=10240, vocab=50272,
                      batch=32, text=32),
                 dict(name="llama-7b-shapes", llm="llama", width=4096, depth=32, heads=32, ffn=11008, vocab=32000,
                      batch=16, text=32)],
        "vision": dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=4, num_attention_heads=16,
                       image_size=224, patch_size=14),
        "qformer": dict(num_query_tokens=32, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072), "warmup": 2, "steps": 5}
# Tiny: vocabularies larger than the tokenizers (as at full size); LLaMA wider than OPT (as 2560 -> 4096).
TINY = {"llms": [dict(name="tiny-opt", llm="opt", width=64, depth=2, heads=4, ffn=256, vocab=512, batch=4, text=16),
                 dict(name="tiny-llama", llm="llama", width=96, depth=2, heads=4, ffn=256, vocab=512, batch=4,
                      text=16)],
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8),
        "qformer": dict(num_query_tokens=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128), "warmup": 1, "steps": 2}


def need(ok: bool, what: str) -> None:
    """Fail the current check with `what` unless `ok` (a plain assert vanishes under python -O)."""
    if not ok:
        raise AssertionError(what)


def sync(dev: str) -> None:
    """Wait for queued CUDA work, so that wall-clock times measure it."""
    if dev == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    """Drop what earlier steps or checks left, so that the next peak is its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def use_repo_components() -> str:
    """Import and register the built-in components without `pip install -e .` (repo root on sys.path only)."""
    import importlib.metadata
    import tomllib

    from vpgtrans.registry import register

    if str(ROOT) not in sys.path:  # the built-ins' folder is their import name: the repo root finds them
        sys.path.insert(0, str(ROOT))
    importlib.import_module("vpgtrans_adapters")
    if any(True for _ in importlib.metadata.entry_points(group="vpgtrans.llm")):
        return "entry points of an installed vpgtrans"
    for group, items in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"].items():
        for target in items.values() if group.startswith("vpgtrans.") else ():
            module, attr = target.split(":")
            register(getattr(importlib.import_module(module), attr), provider="vpgtrans")
    return "registered from pyproject.toml (no installed entry points)"


def write_parts(root: Path, cfg: dict[str, Any]) -> dict[str, Path]:
    """Tiny tokenizers, the BLIP-2 ViT (a real weights file) and each LLM's config.json (weights made at load)."""
    from transformers import Blip2VisionConfig, Blip2VisionModel, LlamaConfig, OPTConfig
    from transformers.utils import logging as hf_logging

    from vpgtrans.testing import _preprocessor, make_tiny_models

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would bury the check lines
    tiny = make_tiny_models(root / "tiny")
    paths = {"bert": tiny["bert"], "vision": root / "vision"}
    # Blip2VisionConfig's default initializer_range is 1e-10 (weights are always pretrained): give it a real one.
    Blip2VisionModel(Blip2VisionConfig(initializer_range=0.02, **cfg["vision"])).save_pretrained(paths["vision"])
    _preprocessor(paths["vision"], cfg["vision"]["image_size"])
    for c in cfg["llms"]:
        src, paths[c["name"]] = tiny[c["llm"]], root / c["name"]
        shutil.copytree(src, paths[c["name"]],
                        ignore=shutil.ignore_patterns("*.safetensors", "config.json", "generation_config.json"))
        base = json.loads((src / "config.json").read_text())
        ids = {k: base[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id") if base.get(k) is not None}
        common = dict(vocab_size=c["vocab"], hidden_size=c["width"], num_hidden_layers=c["depth"],
                      num_attention_heads=c["heads"], max_position_embeddings=2048, **ids)
        llm = (OPTConfig(ffn_dim=c["ffn"], word_embed_proj_dim=c["width"], **common) if c["llm"] == "opt" else
               LlamaConfig(intermediate_size=c["ffn"], num_key_value_heads=c["heads"], **common))
        llm.save_pretrained(paths[c["name"]])
    return paths


@contextlib.contextmanager
def llm_made_on(device: str, notes: list[str]):
    """While active, the backend's `from_pretrained` builds the LLM from its config.json directly on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def make(target: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None, **_: Any) -> Any:
        kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
        cfg = AutoConfig.from_pretrained(target)
        try:
            with torch.device(device):
                return AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kw)
        except Exception as exc:  # noqa: BLE001 - fall back to the slow but plain route, and say so
            notes.append(f"init on {device} failed ({type(exc).__name__}: {exc}); built on CPU, then moved")
            return AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kw).to(device)

    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", make):
        yield


def feature_set(n: int, tokens: int, width: int, text: int) -> list[tuple[torch.Tensor, Any, str]]:
    """Cached-feature examples (float16, as data.cache_dtype) with targets longer than max_text_len."""
    from vpgtrans.interfaces import TextSample
    from vpgtrans.testing import WORDS

    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(tokens, width, generator=gen).half(),
             TextSample(target=" ".join(WORDS[(i + k) % len(WORDS)] for k in range(2 * text))), "") for i in range(n)]


def run_steps(module: Any, loss_fn: Any, data: list, tcfg: Any, out: Path, dev: str, warmup: int,
              steps: int) -> dict[str, Any]:
    """Trainer steps (its micro-step, optimizer step and schedule); checks the losses and which weights moved."""
    from vpgtrans.data.dataset import Collate
    from vpgtrans.memory import TensorMemoryTracker
    from vpgtrans.train.trainer import Trainer, make_accelerator

    acc, note = make_accelerator(tcfg.mixed_precision)
    trainer = Trainer(module, loss_fn, data, tcfg, out, collate_fn=Collate("features"), accelerator=acc,
                      progress=False, echo=lambda s: None)
    named = list(trainer.unwrapped.named_parameters())
    trained = [(n, p) for n, p in named if p.requires_grad]
    frozen = [p for n, p in named if not p.requires_grad and n.startswith("llm.")]

    def fingerprint(ps: list) -> torch.Tensor:  # of the (big) frozen weights: sum and norm of each
        return torch.stack([torch.stack([p.detach().sum(dtype=torch.float32),
                                         torch.linalg.vector_norm(p.detach(), dtype=torch.float32)]) for p in ps])

    # Exact copies of the trainable weights, on the CPU so that they do not count in the device's peak.
    before_t, before_f = [p.detach().cpu().clone() for _, p in trained], fingerprint(frozen) if frozen else None
    batches, times, losses, peak = trainer.stream.batches(0), [], [], None
    for step in range(warmup + steps):
        tracker = contextlib.nullcontext()
        if step == warmup:  # the first steps created the optimizer state and warmed the kernels
            free_memory()
            if dev == "cpu":  # the CPU counterpart of max_memory_allocated, as benchmarks/memory.py measures
                state = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
                tracker = TensorMemoryTracker(existing=[*module.parameters(), *module.buffers(), *state])
        batch = next(batches)
        sync(dev)
        started = time.perf_counter()
        with tracker:
            trainer.schedule.apply(trainer.optimizer, step)
            loss = trainer._micro_step(batch, True, step)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        sync(dev)
        times.append(time.perf_counter() - started)
        losses.append(float(loss))
        peak = tracker.peak if isinstance(tracker, TensorMemoryTracker) else peak
    need(all(math.isfinite(v) for v in losses), f"non-finite loss {losses}")
    still = [n for (n, p), b in zip(trained, before_t) if torch.equal(p.detach().cpu(), b)]
    need(not still, f"{len(still)}/{len(trained)} trainable tensors did not change, e.g. {still[:5]}")
    need(before_f is None or bool((fingerprint(frozen) == before_f).all()), "a frozen LLM weight changed")
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else peak
    return {"losses": [round(v, 4) for v in losses], "step_s_median": round(statistics.median(times[warmup:]), 4),
            "step_s_all": [round(t, 4) for t in times], "trainable_tensors_changed": len(trained),
            "frozen_llm_tensors_unchanged": len(frozen), "mixed_precision": acc.mixed_precision,
            "precision_note": note, "device": str(acc.device), "measured_peak_bytes": peak,
            "reserved_peak_gib": round(torch.cuda.max_memory_reserved() / GIB, 3) if dev == "cuda" else None}


def check_llm(results: dict, paths: dict[str, Path], cfg: dict, c: dict, dev: str, root: Path, out: Path,
              keep: dict) -> None:
    """Load, train (the estimator's plan beside the measured peak) and generate with one LLM; three checks."""
    from accelerate.utils import set_seed

    from vpgtrans.interfaces import GenerationConfig
    from vpgtrans.memory import estimate
    from vpgtrans.model import build_model
    from vpgtrans.testing import tiny_images
    from vpgtrans.train.objectives import lm_loss

    name, model = c["name"], None
    spec = {"vision": {"name": "blip2-vit", "path": str(paths["vision"]), "dtype": "float16"},  # as the recipes
            "vpg": {"name": "qformer", **cfg["qformer"], "dropout": 0.1},
            "llm": {"name": c["llm"], "path": str(paths[name]), "dtype": "bfloat16"}}
    tcfg = dataclasses.replace(train_config(c), mixed_precision="bf16", betas=[0.9, 0.98],
                               max_steps=cfg["warmup"] + cfg["steps"])

    def load() -> dict[str, Any]:
        nonlocal model
        notes: list[str] = []
        set_seed(tcfg.seed)
        started = time.perf_counter()
        with llm_made_on(dev, notes):
            model = build_model(spec)
        built = time.perf_counter() - started
        model.to(dev)  # vision, VPG and projector (the LLM is there already)
        sync(dev)
        first = next(model.llm.model.parameters())
        need(first.dtype == torch.bfloat16 and first.device.type == dev, f"LLM is {first.dtype} on {first.device}")
        # On the CPU until the converter check, so that they do not count in the next model's peak.
        keep[name] = {"emb": model.llm.input_embedding_matrix().detach().cpu(),
                      "proj": {k: v.detach().cpu() for k, v in model.projector.state_dict().items()}}
        n = model.parameter_report()
        return {"line": f"built in {built:.1f}s ({time.perf_counter() - started:.1f}s with the move to {dev}), "
                        f"LLM {n['llm']['frozen'] / 1e6:.1f}M params bf16 on {first.device}, trainable "
                        f"{(n['vpg']['trainable'] + n['projector']['trainable']) / 1e6:.1f}M",
                "build_s": round(built, 2), "load_s": round(time.perf_counter() - started, 2), "params": n,
                "notes": notes}

    def train() -> dict[str, Any]:
        need(model is not None, "the model did not build")
        data = feature_set(c["batch"] * 2, model.vision.num_tokens, model.vision.hidden_size, c["text"])
        row = run_steps(model, lm_loss(c["text"]), data, tcfg, root / f"run-{name}", dev, cfg["warmup"],
                        cfg["steps"])
        ckpt = tcfg.gradient_checkpointing  # train_config(c) set it from c["ckpt"]; estimate() reads it from tcfg
        plan = estimate(spec, tcfg, None, text_len=c["text"], modes=(ckpt,))
        peak = row["measured_peak_bytes"]
        row.update(batch=c["batch"], max_text_len=c["text"], gradient_checkpointing=ckpt,
                   samples_per_s=round(c["batch"] / row["step_s_median"], 1),
                   measured_peak_gib=round(peak / GIB, 3),
                   estimate_gib=round(plan.total / GIB, 3), est_over_measured=round(plan.total / peak, 3),
                   estimate_parts_gib={k: round(v / GIB, 3) for k, v in plan.parts.items()})
        row["line"] = (f"batch {c['batch']} x text {c['text']}{' (checkpointing)' if ckpt else ''}: "
                       f"loss {row['losses'][0]:.3f} -> "
                       f"{row['losses'][-1]:.3f}, step {row['step_s_median']:.3f}s (median of {cfg['steps']}), peak "
                       f"{row['measured_peak_gib']} GiB, estimate {row['estimate_gib']} GiB (est/measured "
                       f"{row['est_over_measured']}); all {row['trainable_tensors_changed']} "
                       f"trainable tensors changed, {row['frozen_llm_tensors_unchanged']} frozen LLM tensors did not")
        return row

    def generate() -> dict[str, Any]:
        need(model is not None, "the model did not build")
        images = tiny_images(2, size=cfg["vision"]["image_size"])
        config = GenerationConfig(max_new_tokens=8, min_new_tokens=8)  # 8 tokens whatever the random LLM says
        model.generate(images=images[:1], prompt="a photo of", config=config)  # warm-up
        sync(dev)
        started = time.perf_counter()
        texts = model.generate(images=images, prompt="a photo of", config=config)
        sync(dev)
        took = time.perf_counter() - started
        need(len(texts) == 2 and all(isinstance(t, str) for t in texts), f"unexpected output {texts!r}")
        return {"line": f"2 images x 8 greedy tokens in {took:.2f}s ({took / 8 * 1000:.0f} ms/token) on "
                        f"{model.llm.device}", "seconds": round(took, 3), "texts": texts,
                "device": str(model.llm.device)}

    try:
        for kind, fn in (("load", load), ("train", train), ("generate", generate)):
            record(results, f"{kind}[{name}]", fn, out)
    finally:
        model = None
        free_memory()


def check_converter(keep: dict, names: list[str], dev: str) -> dict[str, Any]:
    """VPGTrans stage 1 on the device: linear-cosine fit between the two LLMs' input embeddings, then the merge."""
    from vpgtrans.transfer.converter import fit_converter
    from vpgtrans.transfer.merge import merge_projector

    need(all(n in keep for n in names), "an LLM did not build")
    src, dst = keep[names[0]]["emb"].to(dev), keep[names[1]]["emb"].to(dev)
    proj = torch.nn.Linear(*reversed(keep[names[0]]["proj"]["weight"].shape), device=dev).requires_grad_(False)
    proj.load_state_dict(keep[names[0]]["proj"])
    pairs = torch.arange(min(src.shape[0], dst.shape[0]))  # random weights: which tokens pair is immaterial
    rng = torch.cuda.get_rng_state() if dev == "cuda" else None
    sync(dev)
    fit = fit_converter("linear-cosine", src, dst, (pairs, pairs), seed=0)
    sync(dev)
    # The fit seeds its own init; the caller's CUDA RNG must come out as it went in (vpgtrans_adapters/converters.py).
    rng_kept = None if rng is None else bool(torch.equal(rng, torch.cuda.get_rng_state()))
    lin = fit.linear
    need(lin.weight.device.type == dev and bool(torch.isfinite(lin.weight).all()), "converter not on device/finite")
    merged = merge_projector(proj, lin)
    with torch.no_grad():
        x = torch.randn(3, merged.in_features, device=dev)
        err = float((merged(x) - lin(proj(x))).abs().max())
        need(err < 1e-3 * max(1.0, float(merged(x).abs().max())), f"merged projector differs by {err}")
    return {"line": f"{src.shape[1]} -> {dst.shape[1]} on {lin.weight.device}: fit {fit.seconds:.2f}s on "
                    f"{fit.n_fit} pairs, train cosine {fit.train_cosine:.3f}, held-out {fit.heldout_cosine:.3f}; "
                    f"merged projector {merged.in_features} -> {merged.out_features} (max err {err:.1e}); "
                    f"caller's CUDA RNG untouched: {rng_kept}", "fit_s": round(fit.seconds, 3), "n_fit": fit.n_fit,
            "train_cosine": fit.train_cosine, "heldout_cosine": fit.heldout_cosine, "device": str(lin.weight.device),
            "merge_max_abs_err": err, "caller_cuda_rng_untouched": rng_kept}


def check_stage1(paths: dict[str, Path], cfg: dict, dev: str, root: Path) -> dict[str, Any]:
    """BLIP-2 stage 1 (the Q-Former alone: ITC + ITM + ITG): Trainer steps in bf16 on the device."""
    from vpgtrans.train.stage1 import Stage1Model

    torch.manual_seed(0)
    vpg = {"name": "qformer", **cfg["qformer"], "dropout": 0.1, "tokenizer": str(paths["bert"]), "vocab_size": 1}
    model = Stage1Model(vpg, vision_width=cfg["vision"]["hidden_size"], max_text_len=32).to(dev)
    tokens = (cfg["vision"]["image_size"] // cfg["vision"]["patch_size"]) ** 2 + 1
    tcfg = dataclasses.replace(train_config(dict(batch=8, text=32)), mixed_precision="bf16", max_steps=3)
    row = run_steps(model, lambda m, b: m(b["features"], [s.target for s in b["samples"]]),
                    feature_set(16, tokens, cfg["vision"]["hidden_size"], 8), tcfg, root / "run-stage1", dev, 1, 2)
    row["line"] = f"batch 8: loss {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}, step {row['step_s_median']:.3f}s"
    return row


def record(results: dict, name: str, fn: Callable[[], dict[str, Any]], out: Path) -> None:
    """Run one check; keep its fields or its error, print one line, rewrite the JSON. Never raises."""
    print(f"... {name}", flush=True)
    started = time.perf_counter()
    try:
        row, ok = fn(), True
    except Exception as exc:  # noqa: BLE001 - one failing check must not lose the others
        row, ok = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=-12)}, False
    row["ok"], row["check_s"] = ok, round(time.perf_counter() - started, 2)
    results["checks"][name] = row
    print(f"{'PASS' if ok else 'FAIL'} {name} ({row['check_s']}s): "
          f"{row.get('line') if ok else row['error'].splitlines()[0][:400]}", flush=True)
    write_json(out, results)


def main() -> int:
    """Command line: --cpu, --tiny, --out; exit status 1 when any check failed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU even where CUDA is available")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (width 64, 2 layers) for a quick test")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cuda_check.json")
    ap.add_argument("--batch", type=int, help="batch of every LLM's training check (default: 32 OPT, 16 LLaMA; "
                                              "the recipes' per-device batch is 95 BLIP-2, 108 VPGTrans)")
    ap.add_argument("--checkpointing", action="store_true", help="activation checkpointing through the LLM")
    args = ap.parse_args()
    if args.batch is not None and args.batch < 1:
        ap.error(f"--batch must be at least 1, got {args.batch}")
    dev = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if dev == "cpu":
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cfg, started = TINY if args.tiny else FULL, time.perf_counter()
    cfg = {**cfg, "llms": [dict(c, batch=args.batch or c["batch"], ckpt=args.checkpointing) for c in cfg["llms"]]}
    results: dict[str, Any] = {"benchmark": "cuda_check", "device": dev, "tiny": args.tiny, "command": sys.argv,
                               "machine": machine_info(), "checks": {}}
    print(f"cuda_check on {dev} ({results['machine'].get('cuda') or 'no GPU'}), "
          f"{'tiny' if args.tiny else 'real-size'} shapes -> {args.out}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vpgtrans-cuda-check-") as tmp:
        root, paths, keep = Path(tmp), {}, {}
        os.environ.setdefault("VPGTRANS_HOME", str(root / "home"))  # nothing of ours lands in ~/.vpgtrans

        def setup() -> dict[str, Any]:
            route = use_repo_components()
            paths.update(write_parts(root, cfg))
            bf16 = torch.cuda.is_bf16_supported() if dev == "cuda" else None
            where = {m: str(list(sys.modules[m].__path__)[0]) for m in ("vpgtrans", "vpgtrans_adapters")}
            return {"line": f"components: {route}; torch {torch.__version__}, CUDA {torch.version.cuda}, bf16 "
                            f"{bf16}; code from {where}", "components": route, "bf16_supported": bf16, "code": where}

        record(results, "setup", setup, args.out)
        if results["checks"]["setup"]["ok"]:
            for c in cfg["llms"]:
                check_llm(results, paths, cfg, c, dev, root, args.out, keep)
            names = [c["name"] for c in cfg["llms"]]
            record(results, "converter[linear-cosine]", lambda: check_converter(keep, names, dev), args.out)
            keep.clear()
            free_memory()
            record(results, "stage1[qformer]", lambda: check_stage1(paths, cfg, dev, root), args.out)
    failed = [k for k, v in results["checks"].items() if not v["ok"]]
    results["total_s"] = round(time.perf_counter() - started, 1)
    # What the run imported beyond the standard library: what the GPU machine must have.
    results["third_party_modules"] = sorted({m.split(".")[0] for m in sys.modules if not m.startswith("_")}
                                            - set(sys.stdlib_module_names) - {"vpgtrans", "vpgtrans_adapters",
                                                                               "memory"})
    write_json(args.out, results)
    print(f"{len(results['checks']) - len(failed)}/{len(results['checks'])} checks passed in {results['total_s']}s"
          + (f"; FAILED: {', '.join(failed)}" if failed else "") + f"; wrote {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
