"""benchmarks/transfer_efficiency.py --diagnose (issue 29): the regime diagnostic's tables, verdict and bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["batch_size=8", "tfs_epochs=2", "linear_epochs=2", "matrix_epochs=1", "table2_epochs=1", "lr_warmup_steps=2",
        "val_samples=4", "eval_images=4", "stage1_steps=2"]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    import _diagnose
    import transfer_efficiency

    yield transfer_efficiency, _diagnose
    sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from vpgtrans.world import build_world
    from vpgtrans.world.config import WorldConfig

    return build_world(tmp_path_factory.mktemp("diag-world") / "world", config=WorldConfig.preset("tiny"),
                       progress=lambda _: None)


@pytest.mark.slow
def test_diagnose_on_the_tiny_world(bench, tiny_world, tmp_path, capsys):
    te, _ = bench
    args = ["--diagnose", "--world", str(tiny_world), "--work", str(tmp_path / "work"), "--results",
            str(tmp_path / "results"), "--llms", "opt-s,llama"] + [a for kv in TINY for a in ("--set", kv)]
    assert te.main(args + ["--src", "opt-s", "--dst", "llama"]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "results" / "diagnose.json").read_text())
    assert data["steps_per_epoch"] == 48 // 8
    # Fig. 3: TFS one point per epoch (2), only-linear per epoch (2); the TFS best is one of TFS's own points.
    assert [round(p["epoch"]) for p in data["tfs"]["llama"]["curve"]] == [1, 2]
    assert [round(p["epoch"]) for p in data["fig3"]["linear"]["curve"]] == [1, 2]
    assert data["fig3"]["tfs_best"]["cider"]["value"] in [p["cider"] for p in data["tfs"]["llama"]["curve"]]
    for m in ("cider", "attribute_accuracy", "vqa_accuracy", "val_loss"):
        assert m in data["tfs"]["llama"]["curve"][0]
    # Fig. 8: every ordered pair of the two LLMs, the headline cell included.
    assert sorted(data["fig8"]["cells"]) == ["llama>llama", "llama>opt-s", "opt-s>llama", "opt-s>opt-s"]
    # Table 2: the converter arm really started from the merged projector (a fit was made), the other did not.
    assert data["table2"]["with_converter"]["converter_fit"]["n_pairs"] > 0
    assert data["table2"]["without_converter"]["converter_fit"] is None
    assert data["regime"]["line"].startswith("regime: ") and data["regime"]["line"] in out
    assert (tmp_path / "results" / "diagnose.png").stat().st_size > 0
    # Every run is cached by its settings: a rerun trains nothing and prints the same numbers.
    first = data["fig8"]["cells"]
    assert te.main(args + ["--src", "opt-s", "--dst", "llama"]) == 0
    assert json.loads((tmp_path / "results" / "diagnose.json").read_text())["fig8"]["cells"] == first


def _tfs(cider: list[float]) -> dict:
    return {"curve": [{"epoch": i + 1, "cider": c, "val_loss": 2.0 - c} for i, c in enumerate(cider)]}


def _verdict(diag, linear: list[float], tfs: list[float]) -> dict:
    s = diag.DiagSettings(world="w", tfs_epochs=len(tfs), linear_epochs=len(linear))
    lin = {"curve": [{"epoch": i + 1, "cider": c, "val_loss": 2.0 - c} for i, c in enumerate(linear)]}
    return diag.regime(s, {"fig3": diag.fig3_table(s, _tfs(tfs), lin)})


def test_regime_verdict_reads_the_tfs_best_not_its_last_epoch(bench):
    _, diag = bench
    tfs = [0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 0.97]  # best at epoch 9, not the last
    v = _verdict(diag, [0.96, 0.97, 0.98], tfs)
    assert v["per_metric"]["cider"]["tfs_best"] == 1.0 and v["per_metric"]["cider"]["tfs_best_epoch"] == 9
    assert v["per_metric"]["cider"]["linear_share_by_epoch_2"] == pytest.approx(0.97)
    assert v["in_regime"] and v["line"].startswith("regime: IN")


def test_regime_verdict_no_when_linear_is_far_or_tfs_is_early(bench):
    _, diag = bench
    late = [0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0]
    assert not _verdict(diag, [0.5, 0.6, 0.9], late)["in_regime"]  # 0.9 only at epoch 3: too late
    early = [0.9, 1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92]
    v = _verdict(diag, [0.99, 0.99], early)
    assert not v["in_regime"] and "epoch 2 of 10" in v["line"]


def test_share_is_directional(bench):
    _, diag = bench
    assert diag.share_of(0.5, 1.0, "cider") == pytest.approx(0.5)
    assert diag.share_of(2.0, 1.0, "val_loss") == pytest.approx(0.5)  # a loss twice TFS's best is half as good
    assert diag.best([{"val_loss": 1.0}, {"val_loss": 0.5}], "val_loss")["val_loss"] == 0.5
    assert diag.best([{"cider": 1.0}, {"cider": 0.5}], "cider")["cider"] == 1.0


@pytest.mark.parametrize("extra, message", [
    (["--llms", "opt-s,gpt9"], "no world LLM gpt9"),
    (["--set", "tfs_epochs=0"], "must be >= 1"),
    (["--set", "nonsense=1"], "not a diagnose setting"),
    (["--set", "batch_size=64"], "less than one batch"),
    (["--stage1", "/"], "not a stage-1 Q-Former dir"),
    (["--full"], "--diagnose runs alone"),
])
def test_bad_input_one_line_nothing_written(bench, tiny_world, tmp_path, capsys, extra, message):
    te, _ = bench
    rc = te.main(["--diagnose", "--world", str(tiny_world), "--work", str(tmp_path / "w"),
                  "--results", str(tmp_path / "r")] + extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()
