"""Trainer: schedules, param groups, optimizer state files, exact resume, NaN, --until, no vision forwards."""

from __future__ import annotations

import json
import math
from unittest import mock

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from vpgtrans.data import DataConfig, build_dataset, load_records
from vpgtrans.errors import TrainingError
from vpgtrans.model import build_model
from vpgtrans.testing import tiny_spec, write_caption_set
from vpgtrans.train import (Schedule, TrainConfig, Trainer, lm_loss, make_optimizer, param_groups, parse_until,
                            read_log)
from vpgtrans.train.state import _optimizer_from_files, _optimizer_to_files, find_checkpoint



@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer-data")
    return write_caption_set(root, 8, 5, ["a red circle on the left", "a blue circle on the left"])


# --- schedule and optimiser ----------------------------------------------------------------------------

def test_linear_warmup_cosine_and_constant():
    cfg = TrainConfig(lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10, schedule="cosine")
    s = Schedule(cfg, total_steps=110)
    assert s.lr_at(0) == pytest.approx(1e-6) and s.lr_at(5) == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert s.lr_at(10) == pytest.approx(1e-4)
    assert s.lr_at(60) == pytest.approx(1e-5 + 0.5 * (1e-4 - 1e-5))
    assert s.lr_at(110) == pytest.approx(1e-5) and s.lr_at(500) == pytest.approx(1e-5)
    lrs = [s.lr_at(i) for i in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    const = Schedule(TrainConfig(lr=5e-4, schedule="constant", warmup_steps=0), total_steps=50)
    assert {const.lr_at(i) for i in range(50)} == {5e-4}


def test_no_weight_decay_on_bias_norm_and_query_tokens(tiny_paths):
    model = build_model(tiny_spec(tiny_paths))
    groups = param_groups(model, 0.05)
    decay = dict(zip(groups[0]["names"], groups[0]["params"]))
    skip = set(groups[1]["names"])
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert "vpg.query_tokens" in skip and "projector.bias" in skip
    assert any("LayerNorm.weight" in n for n in skip) and not any("LayerNorm" in n or n.endswith("bias") for n in decay)
    assert "projector.weight" in decay and all(p.ndim >= 2 for p in decay.values())
    assert not any(n.startswith(("vision.", "llm.")) for n in list(decay) + list(skip))  # frozen parts excluded


def test_optimizer_state_roundtrip_through_safetensors_layout():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    cfg = TrainConfig(betas=[0.9, 0.98])
    opt = make_optimizer(param_groups(net, 0.05), cfg)
    for _ in range(3):
        net(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    tensors, meta = _optimizer_to_files(opt)
    json.dumps(meta)  # the non-tensor part really is JSON
    fresh = make_optimizer(param_groups(net, 0.05), cfg)
    fresh.load_state_dict(_optimizer_from_files(tensors, json.loads(json.dumps(meta))))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for key, value in a["state"][pid].items():
            assert torch.equal(value, b["state"][pid][key])


def test_parse_until():
    u = parse_until("val_loss<=2.5")
    assert (u.metric, u.op, u.value) == ("val_loss", "<=", 2.5)
    assert u.reached({"val_loss": 2.4}) and not u.reached({"val_loss": 2.6}) and not u.reached({})
    assert parse_until("cider >= 1e-1").value == 0.1


# --- the loop ------------------------------------------------------------------------------------------

def _generic(tmp_path, **cfg):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(40, 3)
    data = TensorDataset(x, x.sum(1, keepdim=True))
    config = TrainConfig(**{"batch_size": 4, "lr": 0.05, "min_lr": 0.0, "warmup_steps": 3, "max_steps": 12, **cfg})

    def loss_fn(module, batch):
        return {"loss": nn.functional.mse_loss(module(batch[0]), batch[1])}

    return net, Trainer(net, loss_fn, data, config, tmp_path, progress=False, echo=lambda s: None)


def test_generic_module_logs_the_lr_it_used(tmp_path):
    net, trainer = _generic(tmp_path, grad_accum=2)
    seen = []
    original = trainer.optimizer.step

    def spy(*a, **k):
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        return original(*a, **k)

    trainer.optimizer.step = spy
    result = trainer.train()
    rows = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13)) and result.steps == 12
    assert [r["lr"] for r in rows] == seen and seen[0] == pytest.approx(1e-6)
    assert rows[-1]["samples"] == 12 * 8 and rows[-1]["epoch"] == pytest.approx(12 * 2 / 10)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000012"


def test_nan_loss_stops_with_one_line_and_keeps_last_checkpoint(tmp_path):
    net, trainer = _generic(tmp_path, save_every=2)
    inner = trainer.loss_fn
    calls = [0]

    def poisoned(module, batch):
        calls[0] += 1
        out = inner(module, batch)["loss"]
        return out * float("nan") if calls[0] == 5 else out

    trainer.loss_fn = poisoned
    with pytest.raises(TrainingError) as err:
        trainer.train()
    msg = str(err.value)
    assert "\n" not in msg and "step 5" in msg and "lower train.lr" in msg
    assert find_checkpoint(tmp_path, "latest").name == "step-000004"


def test_until_stops_and_records_when(tmp_path):
    _, trainer = _generic(tmp_path, until="loss<=1e9", max_steps=50)
    result = trainer.train()
    assert result.steps == 1 and result.until["reached"] and result.until["step"] == 1
    assert result.until["samples"] == 4 and result.until["wall_time"] >= 0
    assert read_log(tmp_path / "log.jsonl")[-1]["until"]["target"] == "loss<=1e+09"


def _stage2(tiny_paths, data_file, out, cache, **cfg):
    torch.manual_seed(0)
    model = build_model(tiny_spec(tiny_paths, dropout=0.1))
    data_cfg = DataConfig(train=str(data_file), cache_dir=str(cache))
    dataset, report = build_dataset(load_records(data_cfg), model, data_cfg, seed=3, progress=False)
    config = TrainConfig(**{"batch_size": 2, "lr": 1e-3, "warmup_steps": 2, "seed": 3, "max_text_len": 16, **cfg})
    trainer = Trainer(model, lm_loss(16), dataset, config, out, collate_fn=dataset.collate, progress=False,
                      echo=lambda s: None)
    return model, trainer, report


def test_two_epochs_and_a_second_run_do_no_vision_forward(tiny_paths, data_file, tmp_path):
    model, trainer, report = _stage2(tiny_paths, data_file, tmp_path / "a", tmp_path / "cache", epochs=2.0)
    assert report.computed == 8
    with mock.patch.object(model.vision, "forward", wraps=model.vision.forward) as forward:
        result = trainer.train()
    assert result.steps == 8 and result.epochs == 2.0 and forward.call_count == 0
    model2, trainer2, report2 = _stage2(tiny_paths, data_file, tmp_path / "b", tmp_path / "cache", epochs=1.0)
    assert report2.computed == 0 and report2.cached == 8  # the second run found every feature on disk


def test_resume_in_process_is_bit_exact(tiny_paths, data_file, tmp_path):
    cache = tmp_path / "cache"
    full, trainer, _ = _stage2(tiny_paths, data_file, tmp_path / "full", cache, max_steps=7)
    trainer.train()
    cut, trainer, _ = _stage2(tiny_paths, data_file, tmp_path / "cut", cache, max_steps=7, save_every=3)
    inner, calls = trainer.loss_fn, [0]

    def crash_at_step_5(module, batch):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return inner(module, batch)

    trainer.loss_fn = crash_at_step_5
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    resumed, trainer, _ = _stage2(tiny_paths, data_file, tmp_path / "cut", cache, max_steps=7, save_every=3)
    result = trainer.train(resume="latest")
    assert result.resumed_from.endswith("step-000003") and result.steps == 7
    a, b = full.trainable_state_dict(), resumed.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_full = [r["loss"] for r in read_log(tmp_path / "full" / "log.jsonl")]
    log_cut = [r["loss"] for r in read_log(tmp_path / "cut" / "log.jsonl")]
    assert log_full == log_cut and not any(math.isnan(v) for v in log_full)
