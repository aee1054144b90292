"""benchmarks/data_path.py on tiny sets: the JSON it writes, a flat peak RSS for the stream, and the feed table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "data_path.py"


def _load():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("data_path", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # three fresh processes that import torch: ~1-2 min on the shared 2-core machine
def test_data_path_writes_its_figures(tmp_path):
    bench = _load()
    out = tmp_path / "data_path.json"
    data = bench.main(["--sizes", "300,3000", "--shard-size", "100", "--rate-samples", "60", "--photo-size", "0",
                       "--dir", str(tmp_path / "shards"), "--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk["feed"] == data["feed"] and on_disk["sizes"] == [300, 3000]
    small, large = on_disk["memory"]["stream_300"], on_disk["memory"]["stream_3000"]
    assert small["samples_in_set"] == 300 and large["samples_in_set"] == 3000
    assert large["epoch_samples_read"] == 3000 - 3000 % 96  # one reader: whole batches of 96, nothing else left
    # Ten times the samples, the same memory: nothing proportional to the set is held (imports aside).
    assert large["peak_rss_mb"] - large["rss_before_mb"] < 40
    assert on_disk["memory"]["indexed_3000"]["records"] == 3000
    rate = on_disk["loader_one_worker"]["tiny_train_transform"]
    assert rate["samples"] == 60 and rate["images_per_s_cpu"] > 0
    for name, gpu in on_disk["gpu"].items():
        feed = on_disk["feed"][name]["tiny_train_transform"]
        assert feed["workers_needed"] >= 1 and gpu["samples_per_s"] > 0
    assert (tmp_path / "shards" / "tiny32-3000" / "complete.json").exists()
