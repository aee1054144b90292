"""The memory estimator (`vpgtrans.memory`, what `--dry-run` prints) against measured peak memory of real runs.

    python benchmarks/memory.py            # 10 configurations (~5 min on 2 cores)
    python benchmarks/memory.py --quick    # 3 small ones (~1 min)

Each configuration builds a real model (transformers OPT / LLaMA / T5 checkpoints written to a temp dir,
BLIP-2 ViT, Q-Former VPG, optional LoRA), runs two real training steps on CPU (forward, backward, AdamW)
in its own process, and measures (a) the peak bytes of live tensors during the second step (every tensor
storage created, minus those freed: the CPU counterpart of `torch.cuda.max_memory_allocated`) and (b) the
growth of peak RSS over the RSS after loading the model. The estimate is `vpgtrans.memory.estimate` for the
same spec, batch and text length (all targets at max_text_len, as the estimate assumes). Writes
results/memory.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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
MIB = 2 ** 20

# name: llm family, width, depth, batch, max_text_len, queries, Q-Former width/depth, lora, checkpointing
CONFIGS: list[dict[str, Any]] = [
    dict(name="tiny-opt", llm="opt", width=64, depth=2, batch=4, text=16, queries=4, q_width=64, q_depth=2),
    dict(name="opt-256x6", llm="opt", width=256, depth=6, batch=8, text=32, queries=16, q_width=128, q_depth=2),
    dict(name="opt-256x6-ckpt", llm="opt", width=256, depth=6, batch=8, text=32, queries=16, q_width=128, q_depth=2,
         ckpt=True),
    dict(name="opt-256x6-lora", llm="opt", width=256, depth=6, batch=8, text=32, queries=16, q_width=128,
         q_depth=2, lora=True),
    dict(name="opt-256x6-b32-q32", llm="opt", width=256, depth=6, batch=32, text=32, queries=32, q_width=128,
         q_depth=2),
    dict(name="llama-256x6", llm="llama", width=256, depth=6, batch=8, text=32, queries=16, q_width=128, q_depth=2),
    dict(name="llama-256x6-ckpt-lora", llm="llama", width=256, depth=6, batch=8, text=32, queries=16, q_width=128,
         q_depth=2, ckpt=True, lora=True),
    dict(name="t5-256x4", llm="t5", width=256, depth=4, batch=8, text=32, queries=16, q_width=128, q_depth=2),
    dict(name="opt-512x12", llm="opt", width=512, depth=12, batch=16, text=48, queries=32, q_width=256, q_depth=4),
    dict(name="opt-512x12-ckpt", llm="opt", width=512, depth=12, batch=16, text=48, queries=32, q_width=256,
         q_depth=4, ckpt=True),
]
QUICK = ["tiny-opt", "opt-256x6", "opt-256x6-ckpt"]


def write_llm(root: Path, family: str, width: int, depth: int) -> Path:
    """A randomly initialised transformers LLM of the given size with a tokenizer, saved with save_pretrained."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, T5Config, \
        T5ForConditionalGeneration

    from vpgtrans.testing import make_tiny_models

    tiny = make_tiny_models(root / "tiny")
    out = root / f"{family}-{width}x{depth}"
    if (out / "config.json").exists():
        return out
    src = tiny["t5" if family == "t5" else family]
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json", "generation_config.json"))
    base = json.loads((src / "config.json").read_text())
    heads = max(width // 64, 4)
    if family == "opt":
        cfg = OPTConfig(vocab_size=base["vocab_size"], hidden_size=width, ffn_dim=4 * width, num_hidden_layers=depth,
                        num_attention_heads=heads, word_embed_proj_dim=width, max_position_embeddings=512,
                        pad_token_id=base["pad_token_id"], bos_token_id=base["bos_token_id"],
                        eos_token_id=base["eos_token_id"])
        model = OPTForCausalLM(cfg)
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=base["vocab_size"], hidden_size=width, intermediate_size=4 * width,
                          num_hidden_layers=depth, num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=512, bos_token_id=base["bos_token_id"],
                          eos_token_id=base["eos_token_id"])
        model = LlamaForCausalLM(cfg)
    else:
        cfg = T5Config(vocab_size=base["vocab_size"], d_model=width, d_ff=4 * width, d_kv=64, num_layers=depth,
                       num_heads=heads, feed_forward_proj="gated-gelu", pad_token_id=base["pad_token_id"],
                       eos_token_id=base["eos_token_id"], decoder_start_token_id=base["pad_token_id"])
        model = T5ForConditionalGeneration(cfg)
    model.save_pretrained(out)
    return out


def spec_of(cfg: dict[str, Any], root: Path) -> dict[str, Any]:
    """The ModelSpec dict of a configuration (tiny BLIP-2 ViT, a Q-Former, the LLM written under `root`)."""
    from vpgtrans.testing import make_tiny_models

    tiny = make_tiny_models(root / "tiny")
    llm = write_llm(root, cfg["llm"], cfg["width"], cfg["depth"])
    spec = {"vision": {"name": "blip2-vit", "path": str(tiny["blip2-vit"])},
            "vpg": {"name": "qformer", "num_query_tokens": cfg["queries"], "hidden_size": cfg["q_width"],
                    "num_hidden_layers": cfg["q_depth"], "num_attention_heads": 4,
                    "intermediate_size": 4 * cfg["q_width"], "dropout": 0.1},
            "llm": {"name": {"opt": "opt", "llama": "llama", "t5": "flant5"}[cfg["llm"]], "path": str(llm)}}
    if cfg.get("lora"):
        spec["lora"] = {"r": 8}
    return spec


def train_config(cfg: dict[str, Any]) -> Any:
    """The TrainConfig of a configuration."""
    from vpgtrans.train.config import TrainConfig

    return TrainConfig(batch_size=cfg["batch"], max_text_len=cfg["text"], lr=1e-4,
                       gradient_checkpointing=bool(cfg.get("ckpt")))


def measure(cfg: dict[str, Any], root: Path) -> dict[str, Any]:
    """Two real training steps; peak live tensor bytes of the second and peak RSS growth (run in a fresh process)."""
    import torch

    from vpgtrans.interfaces import TextSample
    from vpgtrans.memory import TensorMemoryTracker
    from vpgtrans.model import build_model
    from vpgtrans.train.optim import make_optimizer, param_groups

    torch.manual_seed(0)
    model = build_model(spec_of(cfg, root))
    t = train_config(cfg)
    model.set_gradient_checkpointing(t.gradient_checkpointing)
    model.train()
    optimizer = make_optimizer(param_groups(model, t.weight_decay), t)
    words = "a red circle on the left of a large blue square above two small green stars".split()
    samples = [TextSample(target=" ".join(words[(i + k) % len(words)] for k in range(4 * cfg["text"])))
               for i in range(cfg["batch"])]  # longer than max_text_len: every target is cut to it
    feats = torch.randn(cfg["batch"], model.vision.num_tokens, model.vision.hidden_size)
    rss_loaded = peak_rss_mb()

    def step() -> None:
        loss = model(feats, samples, max_text_len=cfg["text"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the first step creates the optimizer state
    tracker = TensorMemoryTracker(existing=[*model.parameters(), *model.buffers(), feats,
                                            *[v for s in optimizer.state.values() for v in s.values()
                                              if torch.is_tensor(v)]])
    started = time.perf_counter()
    with tracker:
        step()
    return {"measured_peak_mib": tracker.peak / MIB, "measured_resident_mib": tracker.baseline / MIB,
            "rss_growth_mib": peak_rss_mb() - rss_loaded, "step_s": round(time.perf_counter() - started, 2)}


def estimated(cfg: dict[str, Any], root: Path) -> dict[str, Any]:
    """The estimator's plan for the same configuration."""
    from vpgtrans.memory import estimate

    started = time.perf_counter()
    plan = estimate(spec_of(cfg, root), train_config(cfg), None, text_len=cfg["text"])
    return {"estimate_mib": plan.total / MIB, "parts_mib": {k: round(v / MIB, 2) for k, v in plan.parts.items()},
            "estimate_s": round(time.perf_counter() - started, 2)}


def _child(name: str, root: str) -> None:
    import torch

    torch.set_num_threads(1)
    cfg = next(c for c in CONFIGS if c["name"] == name)
    out = {**estimated(cfg, Path(root)), **measure(cfg, Path(root))}
    print("RESULT " + json.dumps(out))


def run(names: list[str], out_dir: Path) -> dict[str, Any]:
    """Measure and estimate each named configuration, each in its own process; write memory.json."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="vpgtrans-memory-") as root:
        env = {**os.environ, "VPGTRANS_HOME": str(Path(root) / "home")}
        for name in names:
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--root", root], env=env,
                                  capture_output=True, text=True, timeout=900)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(f"error: configuration {name} failed — {proc.stderr.strip().splitlines()[-1:]}")
            row = {**next(c for c in CONFIGS if c["name"] == name), **json.loads(line[0][7:])}
            row["ratio"] = round(row["estimate_mib"] / row["measured_peak_mib"], 3)
            rows.append(row)
            print(_row(row), flush=True)
    within = sum(abs(r["ratio"] - 1) <= 0.25 for r in rows)
    result = {"benchmark": "memory", "machine": machine_info(), "date": time.strftime("%Y-%m-%d"),
              "rows": rows, "within_25_percent": f"{within}/{len(rows)}"}
    write_json(out_dir / "memory.json", result)
    print(f"estimate within ±25% of the measured peak: {within}/{len(rows)}")
    return result


# The papers' configurations: (label, how to get the recipe of the run's biggest stage).
PAPER = [
    ("BLIP-2 stage 2, OPT-2.7B", ("train", "blip2_stage2_opt2.7b")),
    ("VPGTrans OPT-2.7B → OPT-6.7B (stage 2)", ("transfer", "opt-2.7b", "opt-6.7b", "vpgtrans_opt2.7b_to_6.7b")),
    ("VPGTrans OPT-6.7B → LLaMA-7B (stage 2)", ("transfer", "opt-6.7b", "llama-7b", None)),
    ("MiniGPT-4 stage 2, Vicuna-7B", ("train", "minigpt4_stage2")),
]
GPUS_GIB = (24, 40, 80)
CUDA_CONTEXT_GIB = 1.0


def _paper_recipe(how: tuple) -> Any:
    if how[0] == "train":
        from vpgtrans.recipes import load_recipe

        return load_recipe(how[1], [])
    from vpgtrans.transfer.options import TransferOptions
    from vpgtrans.transfer.plan import plan_transfer

    # A dry run's plan: the weights need not be present. Fine-tuning trains the most: the run's peak.
    return plan_transfer(TransferOptions(src=how[1], dst=how[2], recipe=how[3], dry_run=True)).finetune


def paper_plans(out_dir: Path) -> dict[str, Any]:
    """Estimated peak per device of the papers' configurations on 24/40/80 GB GPUs (weights need not be present)."""
    import dataclasses

    from vpgtrans.memory import GIB, estimate

    rows = []
    for label, how in PAPER:
        recipe = _paper_recipe(how)
        variants = [(recipe.model, "as the recipe loads it")]
        if recipe.model.llm.get("dtype", "float32") == "float32":
            half = dataclasses.replace(recipe.model, llm={**recipe.model.llm, "dtype": "float16"})
            variants.append((half, "LLM at float16"))
        for spec, how_loaded in variants:
            plan = estimate(spec, recipe.train, recipe.data)
            t = recipe.train
            row = {"config": label, "recipe": recipe.name, "llm_dtype": spec.llm.get("dtype", "float32"),
                   "loaded": how_loaded, "batch_per_device": t.batch_size, "max_text_len": t.max_text_len,
                   "mixed_precision": t.mixed_precision, "trainable": list(t.trainable),
                   "notes": plan.notes, "parts_gib": {k: round(v / GIB, 2) for k, v in plan.parts.items()},
                   "peak_gib": {"off": round(plan.total_with(False) / GIB, 1),
                                "on": round(plan.total_with(True) / GIB, 1)}}
            row["fits"] = {f"{g}GB": {m: row["peak_gib"][m] + CUDA_CONTEXT_GIB <= g for m in ("off", "on")}
                           for g in GPUS_GIB}
            rows.append(row)
            print(_paper_row(row), flush=True)
    result = {"benchmark": "memory-paper-plans", "estimate_only": True, "date": time.strftime("%Y-%m-%d"),
              "cuda_context_gib": CUDA_CONTEXT_GIB, "rows": rows}
    write_json(out_dir / "memory_paper.json", result)
    return result


def _paper_row(r: dict[str, Any]) -> str:
    fits = " | ".join(" / ".join("yes" if r["fits"][f"{g}GB"][m] else "no" for m in ("off", "on")) for g in GPUS_GIB)
    return (f"| {r['config']} | {r['llm_dtype']}, {r['mixed_precision']} | {r['batch_per_device']} | "
            f"{r['peak_gib']['off']} / {r['peak_gib']['on']} | {fits} |")


HEADER = (f"{'config':<24}{'batch':>6}{'text':>5}{'q':>4}{'ckpt':>5}{'lora':>5}{'estimate MiB':>14}"
          f"{'measured MiB':>14}{'est/meas':>9}{'RSS growth MiB':>16}")


def _row(r: dict[str, Any]) -> str:
    return (f"{r['name']:<24}{r['batch']:>6}{r['text']:>5}{r['queries']:>4}{'on' if r.get('ckpt') else 'off':>5}"
            f"{'on' if r.get('lora') else 'off':>5}{r['estimate_mib']:>14.1f}{r['measured_peak_mib']:>14.1f}"
            f"{r['ratio']:>9.2f}{r['rss_growth_mib']:>16.1f}")


def main() -> None:
    """Command line: --quick, --only NAME, --out DIR."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three small configurations")
    ap.add_argument("--only", nargs="*", help="configurations by name")
    ap.add_argument("--paper", action="store_true", help="only print the plans of the papers' configurations")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.root)
        return
    if args.paper:
        print("| configuration | LLM dtype, mixed precision | batch/device | peak GiB ckpt off / on | "
              + " | ".join(f"{g} GB off / on" for g in GPUS_GIB) + " |")
        paper_plans(args.out)
        return
    names = args.only or (QUICK if args.quick else [c["name"] for c in CONFIGS])
    print(HEADER)
    run(names, args.out)


if __name__ == "__main__":
    main()
