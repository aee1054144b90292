"""benchmarks/transfer_efficiency.py on the tiny world: JSON structure, and that the rows differ as they should."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["steps=6", "eval_every=2", "val_samples=4", "warmup_steps=2", "source_steps=4", "batch_size=4",
        "max_text_len=16"]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    import transfer_efficiency

    yield transfer_efficiency
    sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from vpgtrans.world import build_world
    from vpgtrans.world.config import WorldConfig

    return build_world(tmp_path_factory.mktemp("bench-world") / "world", config=WorldConfig.preset("tiny"),
                       progress=lambda _: None)


@pytest.fixture(scope="module")
def result(bench, tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    args = ["--world", str(tiny_world), "--work", str(out / "work"), "--results", str(out / "results"),
            "--pairs", "opt-s>llama", "--rows", "inherit,warmup-1x,vpgtrans,conv-lstsq", "--seeds", "1"]
    assert bench.main(args + [a for kv in TINY for a in ("--set", kv)]) == 0
    data = json.loads((out / "results" / "transfer_efficiency.json").read_text())
    return {"data": data, "out": out, "runs": {r["row"]: r for r in data["runs"]}}


def test_json_has_settings_runs_summary_and_paper_comparison(result):
    data = result["data"]
    for key in ("date", "machine", "settings", "pairs", "rows", "seeds", "definition", "paper", "runs", "summary",
                "paper_comparison", "total_s"):
        assert key in data, key
    assert data["settings"]["steps"] == 6 and data["machine"]["cores"] >= 1
    assert set(result["runs"]) == {"scratch", "inherit", "warmup-1x", "vpgtrans", "conv-lstsq"}
    cell = data["summary"]["opt-s>llama"]["vpgtrans"]
    for key in ("speedup_steps", "speedup_samples", "speedup_wall", "reached", "best_val_loss"):
        assert key in cell
    assert data["summary"]["opt-s>llama"]["scratch"]["speedup_steps"]["mean"] == 1.0
    assert all(v["verdict"].startswith(("agrees", "disagrees", "n/a", "same direction"))
               for v in data["paper_comparison"])
    assert any("10.7x" in v["paper"] for v in data["paper_comparison"])
    assert (result["out"] / "results" / "transfer_efficiency.png").stat().st_size > 1000


def test_runs_have_curves_and_stop_within_the_scratch_budget(result):
    scratch = result["runs"]["scratch"]
    assert scratch["steps"] == 6 and [p["step"] for p in scratch["curve"]] == [2, 4, 6]
    best = scratch["vs_scratch"]["scratch_best"]
    assert best == min(p["value"] for p in scratch["curve"])
    for name, run in result["runs"].items():
        assert run["steps"] <= 6, name  # warm-up counts against the same budget
        v = run["vs_scratch"]
        if name != "scratch" and v["vpgtrans"] is not None:  # matched scratch's best: that is where it stopped
            assert run["steps"] == v["vpgtrans"]["step"] and v["vpgtrans"]["value"] <= best
            assert v["speedup"] == pytest.approx(v["scratch"]["step"] / v["vpgtrans"]["step"], abs=1e-3)


def test_inherit_rows_start_from_the_source_vpg(result, bench):
    from _transfer_rows import vpg_fingerprint

    from vpgtrans.transfer.sources import load_source

    source = load_source(result["out"] / "work" / "sources" / "source-opt-s" / "model")
    want = vpg_fingerprint(source.vpg_state())
    runs = result["runs"]
    assert not runs["scratch"]["source_vpg_loaded"] and runs["scratch"]["vpg_init_fingerprint"] != want
    for name in ("inherit", "warmup-1x", "vpgtrans", "conv-lstsq"):
        assert runs[name]["source_vpg_loaded"] and runs[name]["vpg_init_fingerprint"] == want, name


def test_converter_and_warmup_rows_differ(result):
    runs = result["runs"]
    assert "converter_fit" not in runs["inherit"] and runs["inherit"]["warmup_steps"] == 0
    assert runs["vpgtrans"]["converter_fit"]["converter"] == "linear-cosine"
    assert runs["conv-lstsq"]["converter_fit"]["converter"] == "lstsq"
    # Different converters merge into different projectors; the fresh projector is different again.
    norms = {n: runs[n]["projector_norm_init"] for n in ("inherit", "vpgtrans", "conv-lstsq")}
    assert len(set(norms.values())) == 3
    assert runs["vpgtrans"]["warmup_steps"] == runs["warmup-1x"]["warmup_steps"] == 2
    warm = {n: json.loads((result["out"] / "work" / "runs" / "opt-s-to-llama" / f"{n}-s0" / "stage1" / "run.json")
                          .read_text())["recipe"]["train"]["lr"] for n in ("warmup-1x", "vpgtrans")}
    base = result["data"]["settings"]["lr"]
    assert warm == {"warmup-1x": pytest.approx(base), "vpgtrans": pytest.approx(5 * base)}


def test_unknown_pair_is_refused(bench, tiny_world, capsys):
    assert bench.main(["--world", str(tiny_world), "--pairs", "opt-s>gpt9"]) == 2
    assert "unknown pair/row" in capsys.readouterr().err
