"""benchmarks/cuda_check.py in its CPU/tiny mode: every check of the one-shot GPU script passes, so it does not rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_check.py"


def test_cuda_check_tiny_on_cpu_passes_every_check(tmp_path):
    out = tmp_path / "cuda_check.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--cpu", "--tiny", "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    checks = result["checks"]
    assert {"setup", "load[tiny-opt]", "train[tiny-llama]", "generate[tiny-llama]", "converter[linear-cosine]",
            "stage1[qformer]"} <= set(checks)
    assert all(c["ok"] for c in checks.values()), {k: c.get("error") for k, c in checks.items()}
    train = checks["train[tiny-opt]"]
    # Trainable parts moved, the frozen LLM did not, and the estimate sits near the measured peak.
    assert train["trainable_tensors_changed"] > 0 and train["frozen_llm_tensors_unchanged"] > 0
    assert 0.5 < train["est_over_measured"] < 2.0


def test_cuda_check_batch_and_checkpointing_reach_the_training_check(tmp_path):
    out = tmp_path / "cuda_check.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--cpu", "--tiny", "--batch", "3", "--checkpointing",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = json.loads(out.read_text())["checks"]["train[tiny-llama]"]
    assert train["batch"] == 3 and train["gradient_checkpointing"] is True
    assert train["samples_per_s"] == round(3 / train["step_s_median"], 1)
    bad = subprocess.run([sys.executable, str(BENCH), "--cpu", "--tiny", "--batch", "0"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "--batch must be at least 1" in bad.stderr
