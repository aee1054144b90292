"""benchmarks/step_speed.py on the tiny config: the JSON it writes, and that both sides train the same model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "step_speed.py"


def _load():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("step_speed", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_speed_quick_writes_figures_and_both_sides_compute_the_same_loss(tmp_path, monkeypatch):
    bench = _load()
    # Smallest useful plan: base point only on both sides, plus one ablation; one timed step after warm-up.
    monkeypatch.setitem(bench.PROFILES, "quick", dict(bench.PROFILES["quick"], batches=[4], queries=[8], steps=2,
                                                        matmul=[128]))
    monkeypatch.setattr(bench, "ABLATIONS", {"manual": bench.ABLATIONS["manual"]})
    data = bench.main(["--quick", "--in-process", "--out", str(tmp_path)])

    on_disk = json.loads((tmp_path / "step_speed.json").read_text())
    assert on_disk["headline"] == data["headline"]
    assert (tmp_path / "step_speed.png").stat().st_size > 1000
    for key in ("machine", "config", "peak", "equivalence", "headline", "scaling", "tried", "results"):
        assert key in on_disk, key
    for key in ("platform", "cpu", "cores", "torch", "transformers", "torch_threads", "date"):
        assert key in on_disk["machine"], key
    assert on_disk["peak"]["peak_gflops"] > 0
    assert {r["variant"] for r in on_disk["results"]} == {"trainer", "stock", "manual"}
    for row in on_disk["results"]:
        assert row["median_step_s"] > 0 and row["median_wall_s"] > 0 and row["samples_per_s"] > 0
        assert row["flops_per_step"] > 0 and 0 < row["fraction_of_peak"]
        assert row["rss_peak_mb"] > 0 and len(row["cpu_step_s"]) == 2
    h = on_disk["headline"]
    assert h["step_time_ratio_ours_over_stock"] > 0 and h["throughput_ratio_ours_over_stock"] > 0
    assert set(on_disk["scaling"]) == {"batch", "queries"}
    assert on_disk["optimizer_step"]["foreach_ms"] > 0 and on_disk["optimizer_step"]["make_optimizer_ms"] > 0

    # Identical configuration: the exported stock model computes our loss and our projector gradient.
    eq = on_disk["equivalence"]
    assert eq["loss_ours"] > 0
    assert eq["loss_abs_diff"] < 1e-4
    assert eq["projector_grad_max_abs_diff"] < 1e-4
    # The stock side really skips nothing: it counts the vision forward our cached step does not run.
    by = {r["variant"]: r for r in on_disk["results"]}
    assert by["stock"]["flops_per_step"] > by["trainer"]["flops_per_step"]
