"""`vpgtrans demo` end to end on a tiny world: every stage runs, reports, and a rerun continues instead of redoing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vpgtrans.cli import main

# The tiny world's 48 training scenes at batch 32: one step per epoch, so every epoch is evaluated.
ARGS = ["--world-size", "tiny", "--epochs", "3", "--epoch-fraction", "1", "--eval-images", "4", "--no-progress"]


def test_demo_runs_every_stage_then_continues(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = CliRunner().invoke(main, ["demo", "--out", str(out), *ARGS])
    assert first.exit_code == 0, first.output
    for k, what in enumerate(("synthetic world", "train a Q-Former VPG", "the paper's protocol", "captions"), 1):
        assert f"[{k}/4] {what}" in first.output
    assert "building it" in first.output and "== summary" in first.output
    summary = json.loads((out / "demo.json").read_text())
    # By default the paper's headline kind of transfer: a larger OPT.
    assert list(summary["transfers"]) == ["world-opt-m"]
    assert set(summary["captions"]["scores"]) == {"source (world-opt-s)", "VPGTrans (world-opt-m)", "TFS (world-opt-m)"}
    assert summary["captions"]["samples"][0]["true"]
    c = summary["transfers"]["world-opt-m"]
    where = out / "transfer" / "world-opt-m"
    # TFS: stage 2 from the world's stage-1 Q-Former (as the source), every epoch on all 48 scenes, evaluated
    # after each of its 3 epochs.
    tfs_run = json.loads((where / "tfs" / "run.json").read_text())
    assert tfs_run["data"]["train_examples"] == 48 and [p["epoch"] for p in c["tfs"]["curve"]] == [1, 2, 3]
    for arm in (where / "tfs", out / "source"):
        init = json.loads((arm / "run.json").read_text())["recipe"]["train"]["init_from"]
        assert Path(init).name == "qformer-stage1" and (Path(init) / "stage1.safetensors").is_file()
    # VPGTrans: its warm-up is its epoch 1 (one step, the projector alone at the world recipe's 25x LR); it stops
    # at TFS's best caption CIDEr, and the speed-up is Table 3's: TFS's epoch of its best ÷ VPGTrans's reaching it.
    warm = json.loads((where / "vpgtrans" / "warmup" / "run.json").read_text())
    assert c["vpgtrans"]["warmup_steps"] == 1 and c["vpgtrans"]["curve"][0]["epoch"] == 1
    assert c["vpgtrans"]["warmup_lr"] == pytest.approx(25 * 1e-4) and warm["data"]["train_examples"] == 48
    best = max(p["cider"] for p in c["tfs"]["curve"])
    fine = json.loads((where / "vpgtrans" / "finetune" / "run.json").read_text())
    assert fine["results"]["until"]["target"] == f"cider>={best:g}"
    s = c["speedup"]["cider"]
    assert s["tfs_best"] == best and s["speedup_epochs"] == pytest.approx(s["tfs_epoch"] / s["vpgtrans_epoch"], 1e-3)
    assert "regime (the paper's Fig. 3): in its warm-up epoch the projector alone" in first.output
    assert "speed-up (Table 3" in first.output and "the paper's OPT125M→350M: 1.7x" in first.output
    # The transferred model really sits on the destination LLM, with the source's VPG architecture.
    manifest = json.loads((where / "vpgtrans" / "model" / "manifest.json").read_text())
    assert manifest["spec"]["llm"]["path"] == "world-opt-m"

    again = CliRunner().invoke(main, ["demo", "--out", str(out), *ARGS])
    assert again.exit_code == 0, again.output
    assert "using the world at" in again.output and again.output.count("trained earlier, reused") == 2
    assert again.output.count("warm-up: done earlier, skipped") == 1
    assert json.loads((out / "demo.json").read_text())["transfers"]["world-opt-m"]["speedup"] == c["speedup"]
    # Other settings are not silently continued from models trained with these: one line, nothing touched.
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    other = CliRunner().invoke(main, ["demo", "--out", str(out), *ARGS[:2], "--epochs", "2", *ARGS[4:]])
    assert other.exit_code != 0 and "holds a model trained with other settings" in other.output
    assert "--force" in other.output and sorted(p.relative_to(out) for p in out.rglob("*")) == before


def _pts(values: list[float]) -> list[dict]:
    return [{"epoch": float(i), "samples": 100 * i, "cider": v} for i, v in enumerate(values, 1)]


def test_demo_reads_the_regime_and_table3_off_the_epoch_curves() -> None:
    from vpgtrans.demo import epoch_table, regime_line, speedup_line
    from vpgtrans.transfer.epochs import table3_speedups

    tfs = _pts([0.2, 0.5, 0.7, 0.9, 1.0, 0.95])  # best 1.0 at epoch 5
    ours = _pts([0.6, 1.05])  # warm-up (epoch 1) at 0.6; past TFS's best at epoch 2
    c = {"tfs": {"curve": tfs}, "vpgtrans": {"curve": ours}, "speedup": table3_speedups(tfs, ours, ["cider"])}
    line = regime_line(c)
    assert "cider 0.60 = TFS's level after 3 epoch(s), 60% of TFS's best (1.00, epoch 5)" in line
    assert "2.50x" in speedup_line(c, "world-opt-m") and "VPGTrans at epoch 2" in speedup_line(c, "world-opt-m")
    table = epoch_table(c)
    assert table[1].split()[:3] == ["1", "0.200", "0.600"] and "warm-up" in table[1] and len(table) == 7
    assert "below TFS's first epoch (0.20)" in regime_line({**c, "vpgtrans": {"curve": _pts([0.1, 1.05])}})
    never = {**c, "speedup": table3_speedups(tfs, _pts([0.6, 0.8]), ["cider"])}
    assert "speed-up (Table 3" in speedup_line(never, "world-llama") and ": - (VPGTrans never reached" in \
        speedup_line(never, "world-llama")


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


def test_demo_refuses_an_epoch_smaller_than_a_batch_before_training(tmp_path: Path) -> None:
    # A quarter of the tiny world's 48 scenes is 12 images: not one batch of 32.
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--world-size", "tiny",
                                       "--epoch-fraction", "0.25", "--no-progress"])
    assert result.exit_code != 0 and "fewer than one batch of 32" in result.output
    assert "--epoch-fraction" in result.output and not (tmp_path / "d" / "source").exists()


def test_demo_refuses_a_world_built_before_the_stage1_qformer(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / "world").mkdir(parents=True)
    (home / "world" / "world.json").write_text(json.dumps({"format": 2, "seed": 0, "files": {}}))
    monkeypatch.setenv("VPGTRANS_HOME", str(home))
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), *ARGS])
    assert result.exit_code != 0 and "predates the stage-1 Q-Former" in result.output
    assert "vpgtrans world build --force" in result.output and not (tmp_path / "d" / "source").exists()
