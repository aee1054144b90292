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
    # By default one race per kind of transfer the paper measures: size (a larger OPT), then type (FlanT5).
    assert list(summary["transfers"]) == ["world-opt-m", "world-flant5"]
    assert first.output.index("-- world-opt-s → world-opt-m") < first.output.index("-- world-opt-s → world-flant5")
    assert set(summary["captions"]["scores"]) == {"source (world-opt-s)", "VPGTrans (world-opt-m)",
                                                  "scratch (world-opt-m)", "VPGTrans (world-flant5)",
                                                  "scratch (world-flant5)"}
    sample = summary["captions"]["samples"][0]
    assert sample["true"] and "VPGTrans (world-flant5)" in sample
    for dst, race in summary["transfers"].items():
        where = out / "transfer" / dst
        assert race["speedup"]["metric"] == "val_loss" and race["speedup"]["scratch"]["step"] > 0
        assert (where / "curves.png").stat().st_size > 0
        # The paper's protocol: scratch on all 48 scenes, VPGTrans on 70% of them with a one-epoch warm-up,
        # stopping at scratch's best (the best before scratch's plateau, when it plateaued).
        runs = {n: json.loads((where / n / "run.json").read_text()) for n in ("scratch", "warmup")}
        assert runs["scratch"]["data"]["train_examples"] == 48 and runs["warmup"]["data"]["train_examples"] == 34
        assert race["stages"]["warmup"]["steps"] <= 1 and runs["warmup"]["results"]["until"]["target"] == \
            f"val_loss<={race['scratch']['best']:g}" == f"val_loss<={race['speedup']['scratch_best']:g}"
        assert f"scratch ({dst}, 100% of the data) reached its best at step" in first.output
        # The transferred model really sits on the destination LLM, with the source's VPG architecture.
        manifest = json.loads((where / "model" / "manifest.json").read_text())
        assert manifest["spec"]["llm"]["path"] == dst

    again = CliRunner().invoke(main, ["demo", "--out", str(out), *ARGS])
    assert again.exit_code == 0, again.output
    assert "using the world at" in again.output and "source model already trained" in again.output
    assert again.output.count("warm-up: done earlier, skipped") == 2
    assert again.output.count("scratch: done earlier, skipped") == 2


def test_demo_runs_the_one_destination_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--dst", "world-llama", *ARGS])
    assert result.exit_code == 0, result.output
    assert list(json.loads((out / "demo.json").read_text())["transfers"]) == ["world-llama"]
    assert sorted(p.name for p in (out / "transfer").iterdir()) == ["world-llama"]


def test_demo_refuses_same_src_and_dst(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--src", "world-llama",
                                       "--dst", "world-llama", *ARGS])
    assert result.exit_code != 0 and "same LLM" in result.output and not (tmp_path / "d").exists()


def test_demo_refuses_a_destination_given_twice(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--dst", "world-llama",
                                       "--dst", "world-llama", *ARGS])
    assert result.exit_code != 0 and "twice" in result.output and not (tmp_path / "d").exists()
    assert len(result.output.strip().splitlines()) == 1
