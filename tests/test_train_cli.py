"""`vpgtrans train` end to end on tiny models: plan, errors, outputs, and kill -9 then --resume (bit-exact)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from vpgtrans.cli import main
from vpgtrans.recipes import list_recipes, load_recipe
from vpgtrans.testing import kill_at_first_checkpoint, tiny_spec, write_caption_set
from vpgtrans.train import read_log

CLI = [sys.executable, "-c", "import sys; from vpgtrans.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_paths):
    """A recipe file wiring tiny models to a tiny JSONL dataset."""
    root = tmp_path_factory.mktemp("cli")
    write_caption_set(root, 12, 9, [f"a {c} square on the right" for c in ("red", "blue", "green")])
    recipe = {"name": "tiny_stage2", "model": tiny_spec(tiny_paths, dropout=0.1),
              "data": {"train": str(root / "train.jsonl"), "val": str(root / "train.jsonl"), "max_val_samples": 4},
              "train": {"batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "max_steps": 6, "save_every": 3,
                        "seed": 7, "max_text_len": 16},
              "eval": {"metrics": ["val_loss"], "batch_size": 4}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _invoke(*args: str):
    result = CliRunner().invoke(main, ["train", *args])
    return result.exit_code, result.output  # click >= 8.2: output holds stdout and stderr


def test_builtin_recipes_validate_and_override():
    assert {"blip2_stage2_world", "blip2_stage2_opt2.7b", "blip2_stage2_flant5xl"} <= set(list_recipes())
    r = load_recipe("blip2_stage2_opt2.7b", ["lr=3e-5", "model.vpg.num_query_tokens=16"])
    assert r.train.lr == 3e-5 and r.model.vpg["num_query_tokens"] == 16
    assert (r.train.warmup_steps, r.train.warmup_lr, r.train.min_lr, r.train.weight_decay) == (2000, 1e-6, 1e-5, 0.05)
    assert r.model.llm["path"] == "opt-2.7b" and load_recipe("blip2_stage2_flant5xl").model.llm["path"] == "flant5-xl"
    world = load_recipe("blip2_stage2_world")
    assert world.model.llm["path"] == "world-opt-s" and world.data.train.endswith("data/train.jsonl")
    assert "${world}" not in world.data.train


def test_dry_run_prints_plan(setup):
    code, out = _invoke("--recipe", str(setup / "tiny.yaml"), "--out", str(setup / "dry"), "--dry-run",
                        "train.max_steps=12")
    assert code == 0, out
    assert "12 steps" in out and "12 examples" in out and "cosine" in out and "global batch 2" in out
    assert not (setup / "dry").exists()


@pytest.mark.parametrize("args, expected", [
    (["train.lrr=1"], "unknown key 'lrr'"),
    (["train.lr=fast"], "'lr' should be float"),
    (["nonsense=1"], "not a recipe key"),
    (["data.train=/nope/x.jsonl"], "not found"),
    (["model.vpg.name=no-such-vpg"], "no-such-vpg"),
])
def test_bad_input_is_one_line(setup, args, expected):
    code, out = _invoke("--recipe", str(setup / "tiny.yaml"), "--out", str(setup / "bad"), "--dry-run", *args)
    lines = [line for line in out.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], out


def test_resume_without_a_run_is_one_line(setup, tmp_path):
    code, out = _invoke("--recipe", str(setup / "tiny.yaml"), "--out", str(tmp_path / "empty"), "--resume", "latest")
    assert code != 0 and out.count("\n") == 1 and "nothing to resume" in out


def test_unknown_recipe_suggests_names():
    code, out = _invoke("--recipe", "blip2_stage2_wrld", "--dry-run")
    assert code != 0 and "did you mean blip2_stage2_world" in out


def test_train_writes_outputs_and_refuses_a_different_run(setup):
    out = setup / "run1"
    code, text = _invoke("--recipe", str(setup / "tiny.yaml"), "--out", str(out), "--no-progress", "--max-steps", "4")
    assert code == 0, text
    assert "trainable" in text and "done: 4 steps" in text
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["seed"] == 7 and run["results"]["steps"] == 4
    assert run["data"]["features"]["computed"] == 12 and "torch" in run["versions"]
    assert (out / "model" / "manifest.json").is_file() and (out / "model" / "model.safetensors").is_file()
    rows = read_log(out / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "val_loss" in rows[-1]["metrics"]
    code, text = _invoke("--recipe", str(setup / "tiny.yaml"), "--out", str(out), "train.lr=5e-4")
    assert code != 0 and "already holds a different run" in text and "--resume latest" in text
    code, text = _invoke("--recipe", str(setup / "tiny.yaml"), "--out", str(out), "--no-progress", "--force",
                         "--max-steps", "2")
    assert code == 0, text
    again = json.loads((out / "run.json").read_text())
    assert again["results"]["steps"] == 2 and again["data"]["features"]["computed"] == 0  # all from the cache


def test_sigkill_then_resume_equals_uninterrupted_run_bit_for_bit(setup):
    """The real CLI in a subprocess is SIGKILLed right after a checkpoint, resumed, and compared with a run
    that was never interrupted (that one runs in-process meanwhile, to spare a second torch start-up)."""
    # Same thread count in every process (conftest runs this one on 1): float sums differ between 1 and 2 threads.
    env = {**os.environ, "VPGTRANS_HOME": str(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    common = ["--recipe", str(setup / "tiny.yaml"), "--no-progress", "train.max_steps=24", "train.save_every=3",
              "data.val=null"]
    victim = subprocess.Popen([*CLI, "train", *common, "--out", str(setup / "cut")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = setup / "cut" / "checkpoints" / "latest"
    killer = kill_at_first_checkpoint(victim, setup / "cut")
    code, text = _invoke(*common, "--out", str(setup / "full"))
    killer.join()
    victim.wait()
    assert code == 0, text
    assert victim.returncode == -signal.SIGKILL, victim.stdout.read()
    assert not (setup / "cut" / "model").exists()  # it really died before the end
    killed_at = latest.read_text().strip()
    resumed = subprocess.run([*CLI, "train", *common, "--out", str(setup / "cut"), "--resume", "latest"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {setup / 'cut' / 'checkpoints' / killed_at}" in resumed.stdout
    a = load_file(str(setup / "full" / "model" / "model.safetensors"))
    b = load_file(str(setup / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in read_log(setup / "full" / "log.jsonl")] == \
        [r["loss"] for r in read_log(setup / "cut" / "log.jsonl")]
