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


def test_regime_verdict_refined_reads_fig3s_shape_and_keeps_the_strict_one(bench):
    _, diag = bench
    late = [0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0]
    v = _verdict(diag, [0.76, 0.8, 0.9], late)  # 80% within 2 epochs, ahead of TFS at epochs 1-2
    assert v["in_regime"] and not v["in_regime_strict"] and "strict 95% reading: no" in v["line"]
    assert not _verdict(diag, [0.7, 0.74, 0.9], late)["in_regime"]  # 74%: short of three quarters
    behind = [0.2, 0.85, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0]  # TFS ahead at epoch 2
    assert not _verdict(diag, [0.76, 0.8], behind)["in_regime"]


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
    (["--set", "linear_batch_size=x"], "linear_batch_size takes an int"),
    (["--set", "linear_batch_size=0"], "must be >= 1"),
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


# --- --protocol paper: the paper's protocol in epochs (issue 29 item 3) -------------------------------------------
def _pts(values: list[float], metric: str = "cider", per_epoch_samples: int = 100) -> list[dict]:
    return [{"epoch": e + 1, "samples": (e + 1) * per_epoch_samples, metric: v} for e, v in enumerate(values)]


def test_table3_speedup_is_tfs_best_epoch_over_first_epoch_reaching_it(bench):
    import _paper_protocol as paper  # `bench` puts benchmarks/ on sys.path

    tfs = _pts([0.2, 0.5, 0.7, 0.9, 0.95, 1.0, 0.99, 0.98, 0.97, 0.96])  # best 1.0 at epoch 6 (not the last)
    ours = _pts([0.6, 1.0, 1.1])  # warm-up is epoch 1; reaches 1.0 at epoch 2
    got = paper.table3_speedups(tfs, ours, ["cider"])["cider"]
    assert got["tfs_epoch"] == 6 and got["vpgtrans_epoch"] == 2 and got["speedup_epochs"] == 3.0
    never = paper.table3_speedups(tfs, _pts([0.5, 0.9, 0.99]), ["cider"])["cider"]
    assert never["vpgtrans_epoch"] is None and never["speedup_epochs"] is None  # the paper's "-"
    loss = paper.table3_speedups(_pts([3.0, 2.0, 1.5], "val_loss"), _pts([1.6, 1.5], "val_loss"),
                                 ["val_loss"])["val_loss"]
    assert loss["speedup_epochs"] == 1.5  # lower is better for a loss


def test_table3_targets_need_every_seed(bench):
    import _paper_protocol as paper

    runs = [{"pair": "opt-s>opt-m", "row": "vpgtrans", "seed": seed,
             "speedups": {"cider": {"speedup_epochs": v, "speedup_samples": v}}} for seed, v in enumerate([2.0, 1.5])]
    rows = paper.against_paper(paper.epoch_rows_summary(runs))
    cider = next(r for r in rows if r["metric"] == "cider")
    assert cider["paper_row"] == "OPT125M→350M" and cider["paper"] == 1.7
    assert not cider["target_met"]  # 1.5 < 1.7 on seed 1, though the mean (1.75) is above
    runs[1]["speedups"]["cider"] = {"speedup_epochs": None, "speedup_samples": None}
    summary = paper.epoch_rows_summary(runs)
    assert summary["opt-s>opt-m"]["vpgtrans"]["cider"]["epochs_reached"] == "1/2"
    assert not paper.against_paper(summary)[0]["target_met"]


def test_gain_by_gap_reads_fine_tuning_gains_against_tfs_at_the_same_distance(bench):
    import _paper_protocol as paper

    def pts(values):
        return [{"epoch": e + 1, "val_loss": v} for e, v in enumerate(values)]

    tfs = pts([1.50, 1.21, 1.13, 1.07, 1.00])  # best 1.00
    runs = [{"pair": "a>b", "row": row, "seed": 0, "fraction": 1.0, "tfs_curve": tfs, "curve": pts(curve)}
            for row, curve in (("vpgtrans", [1.08, 1.04, 1.01, 0.97]), ("recipe-control", [1.12, 1.09]))]
    runs.append({"pair": "a>b", "row": "vpgtrans-10.7%", "seed": 0, "fraction": 0.107, "tfs_curve": tfs,
                 "curve": pts([1.3, 1.2])})  # a data share: left out
    got = paper.gain_by_gap(runs)["a>b"]
    assert got["warmup_gap"] == {"vpgtrans": [0.08], "recipe-control": [0.12]}
    ours, base = got["gains"]["vpgtrans"], got["gains"]["tfs"]
    # The warm-up epoch (1.08) starts no gain; 1.04 → 1.01 starts 0.04 above TFS's best, 1.01 → 0.97 at 0.01.
    assert ours["0.02-0.05"] == {"mean": 0.03, "n": 1} and ours["0.00-0.02"] == {"mean": 0.04, "n": 1}
    assert ours["0.10-"]["n"] == 0 and ours["<0"]["n"] == 0
    # TFS counted once per seed although two rows carry it: 1.50 → 1.21 → 1.13 → 1.07 (≥ 0.10 above), 1.07 → 1.00.
    assert base["0.10-"] == {"mean": 0.1433, "n": 3} and base["0.05-0.10"] == {"mean": 0.07, "n": 1}
    # The control has one fine-tuning epoch after its warm-up: no gain to read yet.
    assert all(c["n"] == 0 for c in got["gains"]["recipe-control"].values())
    lines = paper.gain_lines(paper.gain_by_gap(runs))
    assert any("vpgtrans" in line and "+0.080" in line for line in lines)


@pytest.mark.slow
def test_paper_protocol_on_the_tiny_world(bench, tiny_world, tmp_path, capsys):
    te, _ = bench
    sets = TINY + ["small_fraction=0.5"]
    args = ["--protocol", "paper", "--world", str(tiny_world), "--work", str(tmp_path / "work"), "--results",
            str(tmp_path / "results"), "--pairs", "opt-s>llama", "--seeds", "1"]
    assert te.main(args + [a for kv in sets for a in ("--set", kv)]) == 0
    data = json.loads((tmp_path / "results" / "diagnose_paper.json").read_text())
    runs = {r["row"]: r for r in data["runs"]}
    assert set(runs) == {"vpgtrans", "vpgtrans-50.0%", "recipe-control"}
    # The control runs beside VPGTrans on the same TFS, and Table 3 prints its ratios next to VPGTrans's.
    assert runs["recipe-control"]["tfs_curve"] == runs["vpgtrans"]["tfs_curve"]
    caption = next(e for e in data["table3"] if e["metric"] == "cider")
    assert caption["control_by_seed"] == data["summary"]["opt-s>llama"]["recipe-control"]["cider"]["epochs"]
    full, half = runs["vpgtrans"], runs["vpgtrans-50.0%"]
    # The warm-up is VPGTrans's epoch 1 (one epoch of its own data); both rows get TFS's epochs' worth of samples.
    assert full["warmup_steps"] == 48 // 8 and half["warmup_steps"] == 24 // 8
    assert [p["epoch"] for p in full["curve"]] == [1.0, 2.0]
    assert half["curve"][0]["epoch"] == 0.5 and half["curve"][-1]["samples"] == full["curve"][-1]["samples"]
    assert [round(p["epoch"]) for p in full["tfs_curve"]] == [1, 2]
    out = capsys.readouterr().out
    assert "cider" in full["speedups"] and "Table 3 in miniature" in out and "no VPG inherited" in out
    # --no-control: the same protocol without it (every other run comes from the cache).
    assert te.main(args + ["--no-control"] + [a for kv in sets for a in ("--set", kv)]) == 0
    data = json.loads((tmp_path / "results" / "diagnose_paper.json").read_text())
    assert {r["row"] for r in data["runs"]} == {"vpgtrans", "vpgtrans-50.0%"}
    assert "no VPG inherited" not in capsys.readouterr().out


@pytest.mark.slow
def test_seeded_runs_repeat_to_the_digit(bench, tiny_world, tmp_path):
    _, diag = bench
    s = diag.settings_from(str(tiny_world), False, **{k: type(getattr(diag.DiagSettings(world=""), k))(v) for k, v in
                                                      (kv.split("=") for kv in TINY)})
    diag._register_vqa(s)
    stage1 = diag.stage1_qformer(s, tmp_path / "a")["path"]
    # Two fresh work dirs (no cache to reuse), the same stage-1 start: TFS and only-linear log the same numbers.
    first, second = (diag.tfs(s, "opt-s", stage1, tmp_path / w) for w in ("a", "b"))
    assert first["curve"] and [{k: v for k, v in p.items() if k != "wall_time"} for p in first["curve"]] == \
        [{k: v for k, v in p.items() if k != "wall_time"} for p in second["curve"]]
    lin = [diag.linear(s, "opt-s", "llama", first["model"], 1, 5.0, False, tmp_path / w, "x")["curve"] for w in "cd"]
    assert [{k: v for k, v in p.items() if k != "wall_time"} for p in lin[0]] == \
        [{k: v for k, v in p.items() if k != "wall_time"} for p in lin[1]]


@pytest.mark.slow
def test_a_cached_tfs_whose_model_was_deleted_says_it_retrains(bench, tiny_world, tmp_path, capsys):
    import shutil

    _, diag = bench
    s = diag.settings_from(str(tiny_world), False, **{k: type(getattr(diag.DiagSettings(world=""), k))(v) for k, v in
                                                      (kv.split("=") for kv in TINY)})
    diag._register_vqa(s)
    stage1 = diag.stage1_qformer(s, tmp_path)["path"]
    first = diag.tfs(s, "opt-s", stage1, tmp_path)
    assert diag.tfs(s, "opt-s", stage1, tmp_path) == first and "warning" not in capsys.readouterr().err
    shutil.rmtree(first["model"])
    again = diag.tfs(s, "opt-s", stage1, tmp_path)
    err = capsys.readouterr().err
    assert "model dir" in err and "is gone" in err and "retraining TFS on opt-s" in err
    assert (Path(again["model"]) / "manifest.json").exists()


@pytest.mark.slow
def test_a_world_without_its_stage1_gets_one_trained_once(bench, tiny_world, tmp_path):
    _, diag = bench
    bare = tmp_path / "bare"
    bare.mkdir()
    for part in Path(tiny_world).iterdir():  # the same world, minus the Q-Former it ships
        if part.name != "qformer-stage1":
            (bare / part.name).symlink_to(part)
    s = diag.settings_from(str(bare), False, **{k: type(getattr(diag.DiagSettings(world=""), k))(v) for k, v in
                                                (kv.split("=") for kv in TINY)})
    info = diag.stage1_qformer(s, tmp_path / "w")
    assert info["origin"].startswith("trained here (2 steps")
    stage1 = json.loads((Path(info["path"]) / "stage1.json").read_text())
    assert stage1 and (Path(info["path"]) / "tokenizer").is_dir()
    logged = [json.loads(line) for line in (Path(info["path"]).parent / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in logged if "step" in r) == 2  # the benchmark's steps, not the world's
    assert diag.stage1_qformer(s, tmp_path / "w") == info  # cached under the world's id: not trained again
    assert diag.stage1_qformer(s, tmp_path / "w")["path"] != str(Path(tiny_world) / "qformer-stage1")


@pytest.mark.slow
def test_recipe_control_starts_from_the_stage1_qformer_with_the_transfer_recipe(bench, tiny_world, tmp_path, capsys):
    """benchmarks/recipe_control.py: VPGTrans's recipe from a source whose VPG is the untrained stage-1 Q-Former."""
    import torch

    import recipe_control
    from vpgtrans.checkpoint import load_model
    from vpgtrans.model import build_model
    from vpgtrans.train.runner import init_weights

    _, diag = bench
    sets = [a for kv in TINY for a in ("--set", kv)]
    out = tmp_path / "rc.json"
    assert recipe_control.main(["--world", str(tiny_world), "--work", str(tmp_path / "w"), "--pairs", "opt-s>llama",
                                "--seed-list", "0", "--results", str(out), *sets]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["pair"] == "opt-s>llama" and {"cider", "val_loss", "warmup_share"} <= set(row["control"])
    assert "control captions" in capsys.readouterr().out
    # The control's source: exactly the stage-1 Q-Former's weights in its VPG, nothing trained on an LLM.
    source = load_model(tmp_path / "w" / "stage1-source" / "opt-s-s0")
    fresh = build_model(source.spec)
    init_weights(fresh, str(Path(tiny_world) / "qformer-stage1"))
    assert all(torch.equal(v, fresh.vpg.state_dict()[k]) for k, v in source.vpg.state_dict().items())
    assert recipe_control.main(["--world", str(tmp_path / "nowhere"), "--results", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
