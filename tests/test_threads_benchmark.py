"""benchmarks/load_resilience.py: one arm on a tiny world, the JSON it writes, and its one-line refusals."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "load_resilience.py"


def _load():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("load_resilience", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_arm_is_refused_in_one_line() -> None:
    with pytest.raises(SystemExit, match=r"arm '2:SPIN' is not threads:policy — e\.g\. 2:PASSIVE"):
        _load().main(["--arms", "2:SPIN"])


@pytest.mark.slow
def test_one_arm_alone_and_loaded(tmp_path: Path) -> None:
    out = tmp_path / "lr.json"
    data = _load().main(["--steps", "40", "--arms", "1:PASSIVE", "--home", str(tmp_path / "home"), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(data, default=str))
    (arm,) = data["arms"]
    alone, loaded = arm["alone"], arm["loaded"]
    assert arm["arm"] == "1:PASSIVE" and alone["steps"] == loaded["steps"] == 40
    # The extra process starts at half the steps of the loaded run itself (never on the earlier run's log).
    assert alone["extra_process_from_step"] is None and 20 <= loaded["extra_process_from_step"] < 40
    assert 0 < loaded["second_half_s"] < loaded["train_s"] and 0 < alone["second_half_s"] < alone["train_s"]
    assert arm["ratio"] == round(loaded["train_s"] / alone["train_s"], 2)
    assert alone["before"]["loadavg_1min"] is not None
