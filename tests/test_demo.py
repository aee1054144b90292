"""`vpgtrans demo` end to end on a tiny world: every stage runs, reports, and a rerun continues instead of redoing."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from vpgtrans.cli import main

# 70% of the tiny world's 48 training scenes is one batch of 32: VPGTrans's warm-up epoch is 1 step.
ARGS = ["--world-size", "tiny", "--source-steps", "6", "--steps", "6", "--eval-every", "2", "--data-fraction", "0.7",
        "--no-progress"]


def test_demo_runs_every_stage_then_continues(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = CliRunner().invoke(main, ["demo", "--out", str(out), *ARGS])
    assert first.exit_code == 0, first.output
    for k, what in enumerate(("synthetic world", "train a Q-Former VPG", "the paper's protocol", "captions"), 1):
        assert f"[{k}/4] {what}" in first.output
    assert "building it" in first.output and "== summary" in first.output
    summary = json.loads((out / "demo.json").read_text())
    assert summary["speedup"]["metric"] == "val_loss" and summary["speedup"]["scratch"]["step"] > 0
    assert (out / "transfer" / "curves.png").stat().st_size > 0
    assert set(summary["captions"]["scores"]) == {"source (world-opt-s)", "VPGTrans (world-opt-m)",
                                                  "scratch (world-opt-m)"}
    sample = summary["captions"]["samples"][0]
    assert sample["true"] and "VPGTrans (world-opt-m)" in sample
    # The paper's protocol: scratch on all 48 scenes, VPGTrans on 70% of them with a one-epoch warm-up,
    # stopping at scratch's best (the best before scratch's plateau, when it plateaued).
    runs = {n: json.loads((out / "transfer" / n / "run.json").read_text()) for n in ("scratch", "stage1")}
    assert runs["scratch"]["data"]["train_examples"] == 48 and runs["stage1"]["data"]["train_examples"] == 34
    assert summary["stages"]["stage1"]["steps"] <= 1 and runs["stage1"]["results"]["until"]["target"] == \
        f"val_loss<={summary['scratch']['best']:g}" == f"val_loss<={summary['speedup']['scratch_best']:g}"
    assert "scratch (world-opt-m, 100% of the data) reached its best at step" in first.output
    # The transferred model really sits on the destination LLM, with the source's VPG architecture.
    manifest = json.loads((out / "transfer" / "model" / "manifest.json").read_text())
    assert manifest["spec"]["llm"]["path"] == "world-opt-m"

    again = CliRunner().invoke(main, ["demo", "--out", str(out), *ARGS])
    assert again.exit_code == 0, again.output
    assert "using the world at" in again.output and "source model already trained" in again.output
    assert "stage1: done earlier, skipped" in again.output and "scratch: done earlier, skipped" in again.output


def test_demo_refuses_same_src_and_dst(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--src", "world-llama",
                                       "--dst", "world-llama", *ARGS])
    assert result.exit_code != 0 and "same LLM" in result.output and not (tmp_path / "d").exists()
