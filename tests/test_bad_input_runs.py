"""bad_input, issue 15: runs are always recoverable — nothing in --out before inputs validate, plain reruns restart
runs that never checkpointed, no checkpoint of non-finite weights, disk-full lines, leftovers cleaned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from test_bad_input import _one_line_error, _recipe, _train, data  # noqa: F401 - `data` is a fixture


def _status(out):
    return json.loads((out / "run.json").read_text())["status"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_bad_input_failed_validation_writes_nothing_and_rerun_works(data, tiny_paths):  # noqa: F811
    root, rows = data
    broken = root / "img" / "later-fixed.png"
    broken.write_bytes(b"not an image")
    recipe = _recipe(root, tiny_paths, rows + [{"image": "img/later-fixed.png", "caption": "x"}], "fixed")
    out = root / "run-fixed"
    code, text = _train(recipe, out)
    _one_line_error(code, text, "corrupt")
    assert not out.exists()  # no run.json that would block the rerun
    broken.write_bytes((root / "img" / "0.png").read_bytes())
    code, text = _train(recipe, out)
    assert code == 0, text
    assert _status(out) == "finished"


@pytest.mark.parametrize("resume", [False, True])
def test_bad_input_killed_before_first_checkpoint_restarts(data, tiny_paths, resume):  # noqa: F811
    root, rows = data
    out = root / f"run-killed-{resume}"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"format": "vpgtrans-run", "status": "running", "pid": _dead_pid(),
                                              "host": os.uname().nodename, "fingerprint": "x"}))
    (out / "log.jsonl").write_text('{"step": 1}\n')
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / ".step-000001.tmp-abc").mkdir()  # a checkpoint the kill interrupted
    code, text = _train(_recipe(root, tiny_paths, rows, f"killed{resume}"), out,
                        *(["--resume", "latest"] if resume else []))
    assert code == 0, text
    assert "stopped before its first checkpoint" in text and "starting over" in text
    assert _status(out) == "finished" and not (out / "checkpoints" / ".step-000001.tmp-abc").exists()


def test_bad_input_run_in_progress_is_not_clobbered(data, tiny_paths):  # noqa: F811
    root, rows = data
    out = root / "run-live"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "run.json").write_text(json.dumps({"status": "running", "pid": live.pid, "host": os.uname().nodename}))
        code, text = _train(_recipe(root, tiny_paths, rows, "live"), out)
        _one_line_error(code, text, f"run in progress (pid {live.pid})")
    finally:
        live.kill()
        live.wait()


def test_bad_input_training_failure_before_checkpoint_allows_plain_rerun(data, tiny_paths, monkeypatch):  # noqa: F811
    from vpgtrans_adapters.llm import CausalLMBackend

    root, rows = data
    out = root / "run-nan-rerun"
    recipe = _recipe(root, tiny_paths, rows, "nanrerun")
    real = CausalLMBackend.loss
    monkeypatch.setattr(CausalLMBackend, "loss", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
    code, text = _train(recipe, out)
    _one_line_error(code, text, "loss is nan at step 1")
    assert _status(out) == "failed"
    monkeypatch.setattr(CausalLMBackend, "loss", real)
    code, text = _train(recipe, out)
    assert code == 0 and "starting over" in text, text


def test_bad_input_non_finite_weights_are_never_checkpointed(data, tiny_paths, monkeypatch):  # noqa: F811
    root, rows = data
    out = root / "run-inf"
    real_step = torch.optim.AdamW.step

    def poisoned(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    code, text = _train(_recipe(root, tiny_paths, rows, "inf", save_every=1), out)
    _one_line_error(code, text, "trainable weights are not finite after step 1")
    assert not list((out / "checkpoints").glob("step-*")) and _status(out) == "failed"


def _safetensors_enospc(monkeypatch, only):
    """save_file fails as safetensors reports a full disk (its own exception type, not OSError)."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def full(tensors, filename, *args, **kwargs):
        if only in str(filename):
            raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at '
                                  f'path "{filename}"')
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full)


@pytest.mark.parametrize("where, expected", [
    ("checkpoints", "could not write checkpoint step-000002 (No space left on device)"),
    ("features", "could not write cached features"),
    (".model.tmp-", "could not write the final model"),
])
def test_bad_input_disk_full_safetensors_error(data, tiny_paths, monkeypatch, where, expected):  # noqa: F811
    root, rows = data
    out = root / f"run-full-{where.strip('.-')}"
    _safetensors_enospc(monkeypatch, f"/{where}/" if where != ".model.tmp-" else where)
    code, text = _train(_recipe(root, tiny_paths, rows, f"full{where.strip('.-')}"), out)
    _one_line_error(code, text, expected)
    assert "No space left on device" in text
    if where == "features":  # before any input is validated: nothing in --out, no temp files in the cache
        assert not out.exists() and not list((root / f"cache-full{where}").rglob("*.tmp"))
    else:  # the run is marked failed; no half-written checkpoint or model
        assert _status(out) == "failed" and not (out / "model").exists()
        assert not any(p.name.startswith(".") for p in [*out.iterdir(), *(out / "checkpoints").iterdir()])


def test_bad_input_leftovers_of_killed_runs_are_removed(data, tiny_paths):  # noqa: F811
    root, rows = data
    out = root / "run-leftovers"
    recipe = _recipe(root, tiny_paths, rows, "leftovers", save_every=1)
    code, text = _train(recipe, out)
    assert code == 0, text
    junk = [out / ".model.tmp-123", out / "checkpoints" / ".latest.abc", out / "checkpoints" / ".step-000009.tmp-x",
            out / ".run.json.xyz"]
    for path in junk:
        path.mkdir() if "tmp-" in path.name else path.write_text("partial")
    feature_dir = next((root / "cache-leftovers" / "features").iterdir())
    stale = next(feature_dir.iterdir()) / ".deadbeef.123.tmp"
    stale.write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    code, text = _train(recipe, out, "--resume", "latest", "train.max_steps=3")
    assert code == 0, text
    assert not any(p.exists() for p in junk) and not stale.exists()


def test_bad_input_damaged_state_json(data, tiny_paths):  # noqa: F811
    root, rows = data
    out = root / "run-state"
    recipe = _recipe(root, tiny_paths, rows, "state", save_every=1)
    code, text = _train(recipe, out)
    assert code == 0, text
    state = out / "checkpoints" / "step-000002" / "state.json"
    good = state.read_text()
    for damage in ('["not", "an", "object"]', '{"step": "two"}', "{", json.dumps({"step": 2, "rng": 5})):
        state.write_text(damage)
        code, text = _train(recipe, out, "--resume", "latest", "train.max_steps=3")
        _one_line_error(code, text, "is unreadable")
    state.write_text(good)
    weights = state.parent / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    code, text = _train(recipe, out, "--resume", "latest", "train.max_steps=3")
    _one_line_error(code, text, "is unreadable")
