"""Streamed shards end to end: `vpgtrans train` SIGKILLed mid-epoch and resumed ends bit-identical to an
uninterrupted run; under 2-process gloo the ranks read disjoint shards and no sample comes twice in an epoch."""

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

from test_headline import TINY, _run, cache, standins  # noqa: F401 - the stand-in hub's fixtures
from test_stream import write_shards
from vpgtrans.cli import main
from vpgtrans.testing import kill_at_first_checkpoint, tiny_spec

CLI = [sys.executable, "-c", "import sys; from vpgtrans.cli import main; sys.exit(main())"]


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, tiny_paths):
    shards = write_shards(tmp_path / "shards", [9, 7, 8])
    recipe = {"name": "tiny_streamed", "model": tiny_spec(tiny_paths, dropout=0.1),
              "data": {"train": str(shards), "feature_cache": False, "augment": True, "shuffle_buffer": 5},
              "train": {"batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "max_steps": 24, "save_every": 5,
                        "seed": 7, "max_text_len": 16},
              "eval": {"metrics": []}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    common = ["--recipe", str(tmp_path / "tiny.yaml"), "--no-progress"]
    victim = subprocess.Popen([*CLI, "train", *common, "--out", str(tmp_path / "cut")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = tmp_path / "cut" / "checkpoints" / "latest"
    killer = kill_at_first_checkpoint(victim, tmp_path / "cut")
    full = CliRunner().invoke(main, ["train", *common, "--out", str(tmp_path / "full")])
    killer.join()
    victim.wait()
    assert full.exit_code == 0, full.output
    assert victim.returncode == -signal.SIGKILL, victim.stdout.read()
    assert not (tmp_path / "cut" / "model").exists()
    plan = json.loads((tmp_path / "full" / "run.json").read_text())["plan"]
    killed_at = latest.read_text().strip()
    assert int(killed_at.split("-")[1]) < plan["micro_batches_per_epoch"]  # mid-epoch: the stream's own state
    resumed = subprocess.run([*CLI, "train", *common, "--out", str(tmp_path / "cut"), "--resume", "latest"],
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {tmp_path / 'cut' / 'checkpoints' / killed_at}" in resumed.stdout
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


RANK_SCRIPT = r'''
import json, sys
import torch, torch.distributed as dist
from vpgtrans.data import DataConfig, build_dataset, load_records
from vpgtrans.model import Template
from vpgtrans.train.stream import BatchStream

class Vision:
    input_hw = (8, 8)
    def preprocess(self, images):
        return torch.stack([torch.tensor(im.getpixel((0, 0)), dtype=torch.float32) for im in images])

class Model:
    vision, template = Vision(), Template()
    llm = type("LLM", (), {"is_encoder_decoder": False})()

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
shards, workers, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
config = DataConfig(train=shards, feature_cache=False, augment=True, shuffle_buffer=6)
dataset, _ = build_dataset(load_records(config), Model(), config, seed=5)
stream = BatchStream(dataset, 3, seed=5, rank=rank, world_size=world, num_workers=workers)
it = stream.batches(0)
batches = [[s.target for s in next(it)["samples"]] for _ in range(stream.per_epoch + 2)]
again = stream.batches(4)
resumed = [[s.target for s in next(again)["samples"]] for _ in range(len(batches) - 4)]
gathered = [None] * world
dist.all_gather_object(gathered, {"batches": batches, "resumed": resumed, "per_epoch": stream.per_epoch,
                                  "len": len(dataset)})
if rank == 0:
    open(out, "w").write(json.dumps(gathered))
dist.destroy_process_group()
'''


def test_two_gloo_processes_see_each_sample_at_most_once_per_epoch(tmp_path):
    shards = write_shards(tmp_path / "shards", [10, 9, 11, 8, 12, 10, 9, 11])
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    for workers in (0, 2):
        out = tmp_path / f"seen{workers}.json"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(script), str(shards), str(workers), str(out)], env=env, capture_output=True,
                              text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        ranks = json.loads(out.read_text())
        per_epoch = ranks[0]["per_epoch"]
        assert ranks[1]["per_epoch"] == per_epoch >= 3  # both ranks take the same number of steps
        epoch = [c for r in ranks for batch in r["batches"][:per_epoch] for c in batch]
        assert len(epoch) == len(set(epoch)) == ranks[0]["len"] == per_epoch * 3 * 2
        assert len(epoch) >= 80 - 12 * 2 * max(1, workers)  # at most a shard per reader left over in a pass
        for r in ranks:
            assert r["resumed"] == r["batches"][4:]  # each rank resumes its own stream exactly


@pytest.mark.slow
def test_vpgtrans_train_streams_under_two_gloo_processes(tmp_path, tiny_paths):
    """The real trainer on streamed shards under `accelerate launch` with 2 CPU processes: both ranks take every
    step (equal shares per epoch), and the run finishes with its model."""
    import shutil

    shards = write_shards(tmp_path / "shards", [6, 5, 7, 6])
    recipe = {"name": "tiny_streamed_ddp", "model": tiny_spec(tiny_paths),
              "data": {"train": str(shards), "feature_cache": False, "augment": True, "shuffle_buffer": 4},
              "train": {"batch_size": 2, "lr": 1e-3, "max_steps": 7, "seed": 3, "max_text_len": 16},
              "eval": {"metrics": []}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_DISABLE_RICH": "1", "MASTER_ADDR": "127.0.0.1"}
    cli = shutil.which("vpgtrans", path=os.path.dirname(sys.executable)) or shutil.which("vpgtrans")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", "2", "--multi_gpu",
                           "--main_process_port", "0", cli, "train", "--recipe", str(tmp_path / "tiny.yaml"),
                           "--out", str(tmp_path / "run"), "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "finished" and run["plan"]["processes"] == 2 and run["results"]["steps"] == 7
    # 4 shards over 2 readers: every reader emits the smallest share in whole batches, an epoch spans both ranks.
    assert run["plan"]["micro_batches_per_epoch"] * 2 * 2 == run["data"]["train_examples"] <= 24
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_the_headline_transfer_streams_webdataset_shards(cache, tmp_path):
    """`vpgtrans transfer --src opt-2.7b --dst llama-7b --data SHARDS`: the default recipe streams the shards (the
    cache off, the train transform on), fits its token pairs on their captions, and runs both stages."""
    shards = write_shards(tmp_path / "shards", [5, 4, 5])
    out = tmp_path / "o"
    dry = _run("--data", str(shards), "--out", str(out), f"data.val={cache['data']}", "--dry-run", *TINY)
    assert dry.exit_code == 0, dry.output
    assert "data    streamed from webdataset shards (shuffle buffer 1000)" in dry.output
    assert "the official train transform (random resized crop 0.5-1, bicubic, flip)" in dry.output
    result = _run("--data", str(shards), "--out", str(out), "--no-progress", "--converter", "lstsq",
                  f"data.val={cache['data']}", *TINY)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["warmup"]["trainable"] == ["projector"] and report["stages"]["finetune"]["steps"] == 2
    run = json.loads((out / "finetune" / "run.json").read_text())
    assert run["recipe"]["data"]["feature_cache"] is False and run["data"]["features"] is None
