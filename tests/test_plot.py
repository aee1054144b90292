"""`vpgtrans plot`: a run's log.jsonl rendered to a PNG of loss / lr / metric curves."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from vpgtrans.cli import main
from vpgtrans.errors import ConfigError, DataError
from vpgtrans.plot import curves, plot_runs, read_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(run_dir, steps=40, scale=1.0):
    """A log like the trainer writes: every step, metrics every 10, a NaN and a torn last line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        row = {"step": step, "epoch": step / 20, "loss": scale * 3.0 / step ** 0.5, "lr": 1e-4 * min(1, step / 5),
               "samples": step * 8, "wall_time": step * 0.5, "grad_norm": 1.0 + 1 / step}
        if step % 10 == 0:
            row["metrics"] = {"cider": step / 40, "attr_acc": 0.5 + step / 100}
        if step == 7:
            row["loss"] = "nan"  # how the run log writes non-finite values
        lines.append(json.dumps(row))
    (run_dir / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 41, "lo')
    return run_dir


def test_curves_read_the_trainer_log_format(tmp_path):
    rows = read_rows(_fake_run(tmp_path / "run"))
    assert len(rows) == 40  # the half-written last line is skipped
    got = curves(rows)
    assert list(got)[:2] == ["loss", "lr"]
    assert {"grad_norm", "cider", "attr_acc"} <= set(got) and not {"epoch", "samples", "wall_time"} & set(got)
    assert len(got["loss"][0]) == 39 and 7 not in got["loss"][0]  # the NaN point is left out
    assert got["cider"] == ([10.0, 20.0, 30.0, 40.0], [0.25, 0.5, 0.75, 1.0])
    assert curves(rows, x="samples")["lr"][0][:2] == [8.0, 16.0]
    # Joined transfer logs tag each row with its stage: a bookkeeping field, not a curve.
    assert "stage" not in curves([{**r, "stage": 1} for r in rows])


def test_plot_writes_a_png_into_the_run(tmp_path):
    pytest.importorskip("matplotlib")
    run = _fake_run(tmp_path / "run")
    out = plot_runs([run])
    assert out == run / "curves.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 800 and height >= 300  # a grid of panels: loss, lr, grad_norm, cider, attr_acc


def test_plot_overlays_runs_and_cli(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = _fake_run(tmp_path / "transfer"), _fake_run(tmp_path / "scratch", steps=30, scale=2.0)
    res = CliRunner().invoke(main, ["plot", str(a), str(b), "--out", str(tmp_path / "cmp.png"), "--x", "samples",
                                    "--label", "VPGTrans", "--label", "scratch", "--title", "OPT→LLaMA"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cmp.png").read_bytes().startswith(PNG_MAGIC)
    res = CliRunner().invoke(main, ["plot", str(a)])
    assert res.exit_code == 0 and (a / "curves.png").exists()
    with pytest.raises(ConfigError, match="labels"):
        plot_runs([a, b], tmp_path / "x.png", labels=["only one"])


def test_plot_errors_are_one_line(tmp_path, monkeypatch):
    res = CliRunner().invoke(main, ["plot", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and res.output.startswith("error: no training log") and res.output.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "log.jsonl").write_text("")
    pytest.importorskip("matplotlib")
    with pytest.raises(DataError, match="no numeric values"):
        plot_runs([empty])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    res = CliRunner().invoke(main, ["plot", str(_fake_run(tmp_path / "run"))])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "pip install vpgtrans[plot]" in res.output


def _transfer_dir(root):
    """What `vpgtrans transfer --compare-scratch` leaves: stage1/, stage2/, scratch/ logs and report.json."""
    _fake_run(root / "stage1", steps=10)
    _fake_run(root / "stage2", steps=20)
    _fake_run(root / "scratch", steps=30, scale=2.0)
    (root / "report.json").write_text(json.dumps({"speedup": {"metric": "cider", "scratch_best": 0.75}}))
    return root


def test_every_directory_the_tool_writes_is_accepted(tmp_path):
    from vpgtrans.plot import expand

    transfer = _transfer_dir(tmp_path / "demo" / "transfer")
    _fake_run(tmp_path / "demo" / "source", steps=12)
    ours, scratch = expand(transfer)
    assert (ours.label, scratch.label) == ("VPGTrans", "scratch") and ours.warmup_rows == 10
    assert [r["step"] for r in ours.rows][9:11] == [10, 11]  # stage 2 continues the step axis after the warm-up
    assert ours.threshold == {"metric": "cider", "value": 0.75}
    demo = expand(tmp_path / "demo")  # the demo folder: its source run and its transfer
    assert [s.label for s in demo] == ["source", "transfer VPGTrans", "transfer scratch"]
    bench = expand(tmp_path)  # a benchmark work folder: every run inside, labelled by where it sits
    assert len(bench) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no training log under"):
        expand(tmp_path / "empty")


def test_panels_are_labelled_warmup_shaded_threshold_drawn_constants_dropped(tmp_path):
    pytest.importorskip("matplotlib")
    from vpgtrans.plot import expand, render

    transfer = _transfer_dir(tmp_path / "t")
    rows = read_rows(transfer / "scratch")
    for r in rows:
        r.setdefault("metrics", {})["attribute_accuracy_refs"] = 0.88  # a constant ceiling: not worth a panel
    (transfer / "scratch" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = render(expand(transfer))
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert "attribute_accuracy_refs" not in axes and {"loss", "lr", "cider"} <= set(axes)
    assert axes["loss"].get_ylabel() == "training loss" and axes["cider"].get_ylabel() == "CIDEr (0-10)"
    assert axes["loss"].get_xlabel() == "optimiser steps (all stages)"
    assert axes["loss"].patches  # the warm-up span
    dashed = [ln for ln in axes["cider"].get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == 0.75
    res = CliRunner().invoke(main, ["plot", str(transfer)])
    assert res.exit_code == 0, res.output
    assert (transfer / "curves.png").read_bytes().startswith(PNG_MAGIC)
