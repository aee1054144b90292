"""A seeded run prints the same figures whatever the thread settings and the CPU's vector units (issue 32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vpgtrans.threads import NUMERIC_ENV, WAIT_ENV, has_avx2

# The tiny demo of tests/test_demo.py: world build, source VPG, TFS and VPGTrans per epoch on OPT-m, captions.
ARGS = ["--world-size", "tiny", "--epochs", "3", "--epoch-fraction", "1", "--eval-images", "4", "--no-progress"]
# Differ between runs by nature: clocks, and paths under each run's own directory.
TIMING = ("seconds", "time", "wall", "timings")


def _demo(root: Path, extra_env: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in NUMERIC_ENV and k not in WAIT_ENV}
    env.update(VPGTRANS_HOME=str(root / "home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra_env)
    done = subprocess.run([sys.executable, "-c", "from vpgtrans.cli import main; main()", "demo", "--out",
                           str(root / "demo"), *ARGS],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def _figures(root: Path) -> dict[str, Any]:
    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if not any(t in k.lower() for t in TIMING)}
        return [clean(v) for v in x] if isinstance(x, list) else x

    def read(path: Path) -> Any:
        return clean(json.loads(path.read_text().replace(str(root), "<root>")))

    world = read(root / "home" / "world" / "world.json")
    world.pop("versions")
    reports = {p.parent.parent.name: read(p) for p in sorted((root / "demo" / "transfer").glob("*/*/report.json"))}
    return {"world": world, "demo": read(root / "demo" / "demo.json"), "reports": reports}


@pytest.mark.slow
def test_world_and_demo_figures_do_not_depend_on_threads_or_vector_units(tmp_path: Path) -> None:
    one = _demo(tmp_path / "a", {"OMP_NUM_THREADS": "1"})
    # Two threads asked for by the environment, and MKL limited to AVX2 as on a CPU without AVX-512.
    two = _demo(tmp_path / "b", {"OMP_NUM_THREADS": "2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"})
    a, b = _figures(tmp_path / "a"), _figures(tmp_path / "b")
    assert list(a["reports"]) == ["world-opt-m"]  # the transfer's own report is compared too
    # Every world file (weights included: world.json lists their sha256), the world's figures, and every figure
    # the demo prints and saves.
    assert a["world"]["files"] == b["world"]["files"]
    assert a == b
    for out in (one, two):
        assert "threads 1 (the default: the same figures on every machine and under any load" in out
        assert ("CPU kernels AVX2" in out) == has_avx2()
        # The converter phase says how far it is, one line per ordered pair of the four LMs.
        assert "    [1/12, " in out and "    [12/12, " in out
    assert "OMP_NUM_THREADS=2 is not used" in two
