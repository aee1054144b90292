"""The suite never writes outside its temporary directories: no VPGTRANS_HOME, HF cache or ~/.cache leaks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Files whose fixtures train, cache vision features, plot and call the CLI: what used to leak.
SAMPLE = ["tests/test_plot.py", "tests/test_headline_fraction.py", "tests/test_train_cli.py"]


@pytest.mark.slow
def test_a_test_run_leaves_home_untouched(tmp_path):
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("VPGTRANS_HOME", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME", "MPLCONFIGDIR")}
    env.update(HOME=str(home), TMPDIR=str(tmp))
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          f"--basetemp={tmp / 'basetemp'}", *SAMPLE], cwd=root, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert written == [], f"tests wrote into $HOME: {written[:10]}"
    left = sorted(p.name for p in tmp.iterdir() if p.name.startswith("vpgtrans-tests-"))
    assert left == [], f"the session's cache root was not removed: {left}"
