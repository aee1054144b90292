"""Tests that fail when a transfer is measured or run wrongly: accounting, plateau, embeddings, eval mode, warm-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vpgtrans.checkpoint import load_model, save_model
from vpgtrans.model import build_model
from vpgtrans.recipes import load_recipe
from vpgtrans.testing import tiny_spec, write_caption_set
from vpgtrans.train import read_log
from vpgtrans.transfer import race
from vpgtrans.transfer.options import TransferOptions
from vpgtrans.transfer.plan import plan_transfer
from vpgtrans.transfer import report as rep

FAST = ["train.batch_size=2", "train.max_steps=3", "train.eval_every=0", "train.save_every=0",
        "train.max_text_len=12", "eval.metrics=[val_loss]", "data.max_val_samples=4"]


def _log(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(step: int, wall: float, value: float | None = None, batch: int = 32) -> dict:
    row = {"step": step, "samples": step * batch, "wall_time": wall, "loss": 1.0, "lr": 1e-4}
    if value is not None:
        row["metrics"] = {"val_loss": value}
    return row


def test_warmup_steps_and_converter_fit_count_against_vpgtrans(tmp_path):
    # Warm-up: 4 steps (10 s); fine-tuning matches scratch's best at its own step 4 (8 s in). Converter fit 3 s.
    stage1 = _log(tmp_path / "stage1", [_row(2, 5.0, 3.0), _row(4, 10.0, 2.5)])
    stage2 = _log(tmp_path / "stage2", [_row(2, 4.0, 2.0), _row(4, 8.0, 1.0), _row(6, 12.0, 0.9)])
    scratch = _log(tmp_path / "scratch", [_row(10, 20.0, 1.5), _row(20, 42.0, 1.0), _row(30, 63.0, 1.0)])
    ours = rep.transfer_curve([stage1, stage2], "val_loss", fit_seconds=3.0)
    assert [p["step"] for p in ours] == [2, 4, 6, 8, 10]  # stage 2 continues the warm-up's axis
    sp = rep.speedup(ours, rep.transfer_curve([scratch], "val_loss"), "val_loss")
    assert sp["scratch"]["step"] == 20 and sp["vpgtrans"]["step"] == 8
    assert sp["speedup"] == pytest.approx(20 / 8)  # 20 / 4 if the warm-up were free
    assert sp["speedup_samples"] == pytest.approx(640 / 256)
    assert sp["vpgtrans"]["wall_time"] == pytest.approx(3.0 + 10.0 + 8.0)
    assert sp["speedup_wall_time"] == pytest.approx(42.0 / 21.0, abs=1e-3)


def test_catch_up_reads_the_whole_race_warmup_included(tmp_path):
    # VPGTrans leads early (scratch's 1.5 reached at its step 4) and never reaches scratch's final 0.5.
    stage1 = _log(tmp_path / "stage1", [_row(2, 5.0, 3.0)])
    stage2 = _log(tmp_path / "stage2", [_row(2, 4.0, 1.4), _row(4, 8.0, 0.9)])
    scratch = _log(tmp_path / "scratch", [_row(10, 20.0, 1.5), _row(20, 42.0, 1.0), _row(30, 63.0, 0.5)])
    ours = rep.transfer_curve([stage1, stage2], "val_loss")
    race = rep.catch_up(ours, rep.transfer_curve([scratch], "val_loss"), "val_loss")
    assert [(r["scratch_step"], r["vpgtrans_step"]) for r in race] == [(10, 4), (20, 6), (30, None)]
    assert race[0]["ratio_samples"] == pytest.approx(10 / 4) and race[2]["ratio_samples"] is None
    lines = rep.catch_up_lines(race, "val_loss")
    assert lines[1].split()[-3:] == ["10", "20", "30"] and lines[3].split()[-3:] == ["4", "6", "-"]


def test_plateau_rule_stops_when_the_last_quarter_gains_under_one_percent():
    improving = [{"step": s, "samples": s, "wall_time": s, "value": 2.0 - 0.1 * i}
                 for i, s in enumerate(range(10, 110, 10))]
    assert rep.plateau(improving, "val_loss") is None  # 5% per step: never flat
    flat = improving[:5] + [{"step": s, "samples": s, "wall_time": s, "value": 1.6 - 0.001 * i}
                            for i, s in enumerate(range(60, 260, 10), 1)]
    stop = rep.plateau(flat, "val_loss")
    # Flat from step 60 on, but the last quarter must hold 4 evaluations: first checked at step 130
    # (steps 100-130), where the best 1.592 beats the best up to step 90 (1.596) by 0.25% < 1%.
    assert stop is not None and stop["step"] == 130
    kept, at = rep.until_plateau(flat, "val_loss")
    assert at == stop and [p["step"] for p in kept] == list(range(10, 140, 10))
    higher = [{**p, "value": -p["value"]} for p in flat]  # accuracy-like metrics: larger is better
    assert rep.plateau(higher, "cider")["step"] == 130
    # A slow start (two flat evaluations, then learning) is not a plateau.
    slow = [{"step": s, "samples": s, "wall_time": s, "value": v}
            for s, v in zip(range(20, 220, 20), [1.46, 1.42, 1.37, 1.362, 1.33, 1.31, 1.28, 1.27, 1.2, 1.1])]
    assert rep.plateau(slow, "val_loss") is None


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_paths):
    """8 captioned images and sources on OPT (tied embeddings) and LLaMA (untied), one with a dropout-heavy VPG."""
    root = tmp_path_factory.mktemp("protocol")
    write_caption_set(root, 8, 5, ["a red square at the top", "a blue square at the top"])
    sources = {}
    for name, llm, dropout in (("opt", "opt", 0.0), ("llama", "llama", 0.0), ("opt-dropout", "opt", 0.5)):
        torch.manual_seed(0)
        model = build_model(tiny_spec(tiny_paths, llm, dropout=dropout))
        with torch.no_grad():
            for p in model.vpg.parameters():
                p.add_(0.01 * torch.randn_like(p))
        sources[name] = save_model(model, root / f"src-{name}")
    return {"root": root, "data": str(root / "train.jsonl"), "src": sources, "paths": tiny_paths,
            "overrides": FAST + [f"data.val={root / 'train.jsonl'}"]}


def _transfer(world, out, src="opt", dst="llama", **kw):
    options = TransferOptions(src=str(world["src"][src]), dst=str(world["paths"][dst]), data=world["data"], out=out,
                              recipe="vpgtrans_world", overrides=world["overrides"] + kw.pop("extra", []), **kw)
    return race.transfer(options, echo=lambda _: None).to_json()


@pytest.mark.parametrize("src, dst", [("opt", "llama"), ("llama", "opt")])
def test_converter_is_fitted_on_input_embeddings(world, src, dst):
    from transformers import AutoModelForCausalLM

    from vpgtrans.transfer.converter import fit_converter

    plan = plan_transfer(TransferOptions(src=str(world["src"][src]), dst=str(world["paths"][dst]), data=world["data"],
                                         out=world["root"] / "unused", overrides=world["overrides"],
                                         converter="lstsq", recipe="vpgtrans_world"))
    prepared = race.prepare(plan, echo=lambda _: None)
    hf = {k: AutoModelForCausalLM.from_pretrained(world["paths"][k]) for k in (src, dst)}
    llama = hf["llama"]
    # The premise: the LLaMA test model's input and output embeddings differ (untied).
    assert not torch.allclose(llama.get_input_embeddings().weight, llama.get_output_embeddings().weight)

    def fit(kind: str):
        mats = [getattr(hf[k], f"get_{kind}_embeddings")().weight.detach() for k in (src, dst)]
        return fit_converter("lstsq", *mats, prepared.pairs, seed=0).linear.weight

    got = prepared.fit.linear.weight
    assert torch.allclose(got, fit("input"), atol=1e-4)
    assert not torch.allclose(got, fit("output"), atol=1e-2)


def test_merged_projector_is_what_the_warmup_starts_from(world, tmp_path):
    # A warm-up LR of ~0 leaves the projector where the warm-up found it: it must be W_c·W_src, not a fresh one.
    _transfer(world, tmp_path / "t", converter="lstsq", warmup_lr_scale=1e-9, warmup_epochs=0.5)
    conv = load_file(str(tmp_path / "t" / "converter" / "converter.safetensors"))
    src = load_file(str(world["src"]["opt"] / "model.safetensors"))
    warm = load_file(str(tmp_path / "t" / "warmup" / "model" / "model.safetensors"))
    w = conv["weight"].double() @ src["projector.weight"].double()
    b = conv["weight"].double() @ src["projector.bias"].double() + conv["bias"].double()
    assert torch.allclose(warm["projector.weight"].double(), w, atol=1e-5)
    assert torch.allclose(warm["projector.bias"].double(), b, atol=1e-5)


def test_warmup_is_projector_only_at_the_recipes_constant_lr_then_eval_mode_validation(world, tmp_path):
    out = tmp_path / "t"
    _transfer(world, out, src="opt-dropout", converter="lstsq", warmup_epochs=1.0)
    src = load_file(str(world["src"]["opt-dropout"] / "model.safetensors"))
    warm = load_file(str(out / "warmup" / "model" / "model.safetensors"))
    final = load_file(str(out / "model" / "model.safetensors"))
    vpg = [k for k in src if k.startswith("vpg.")]
    assert vpg and all(torch.equal(warm[k], src[k]) for k in vpg)  # the warm-up leaves the VPG alone
    assert any(not torch.equal(final[k], src[k]) for k in vpg)  # fine-tuning trains it
    stage1 = read_log(out / "warmup" / "log.jsonl")
    base = json.loads((out / "finetune" / "run.json").read_text())["recipe"]["train"]["lr"]
    scale = load_recipe("vpgtrans_world").transfer.warmup_lr_scale  # the world's recipe sets it (paper: 5)
    assert len(stage1) == 4 and [r["lr"] for r in stage1] == [pytest.approx(scale * base)] * 4

    # The logged validation loss is the model's loss in eval mode (dropout 0.5 in the VPG is off).
    from vpgtrans.data import build_dataset, load_records
    from vpgtrans.recipes import build_recipe
    from vpgtrans.train.objectives import EvalContext, val_loss

    run = json.loads((out / "finetune" / "run.json").read_text())
    logged = run["results"]["metrics"]["val_loss"]
    recipe = build_recipe(run["recipe"], name="check")
    model = load_model(out / "finetune" / "model")
    records = load_records(recipe.data, "val")
    dataset, _ = build_dataset(records, model, recipe.data, seed=0, progress=False)
    ctx = EvalContext(records, dataset, recipe.eval, max_text_len=recipe.train.max_text_len)
    with torch.no_grad():
        assert val_loss(model.eval(), ctx)["val_loss"] == pytest.approx(logged, rel=1e-6)
        torch.manual_seed(0)  # with dropout on, the same weights give another loss (6e-4 apart here)
        assert val_loss(model.train(), ctx)["val_loss"] != pytest.approx(logged, rel=1e-4)


def test_compare_scratch_follows_the_paper_order(world, tmp_path):
    out = tmp_path / "t"
    report = _transfer(world, out, converter="lstsq", compare_scratch=True,
                       extra=["data.fraction=0.5", "train.eval_every=1"])
    scratch = json.loads((out / "scratch" / "run.json").read_text())
    stage1 = json.loads((out / "warmup" / "run.json").read_text())
    # Scratch sees all 8 examples; VPGTrans 4 of them: its one warm-up epoch is 2 steps at batch 2.
    assert scratch["recipe"]["data"]["fraction"] == 1.0 and scratch["data"]["train_examples"] == 8
    assert stage1["data"]["train_examples"] == 4 and report["stages"]["warmup"]["steps"] <= 2
    # Scratch ran first; both VPGTrans stages stop at the first evaluation reaching its best (up to its plateau).
    best = report["scratch"]["best"]
    curve = rep.transfer_curve([out / "scratch"], "val_loss")
    kept, stop = rep.until_plateau(curve, "val_loss")
    assert best == min(p["value"] for p in kept) and report["scratch"]["plateau_step"] == (stop and stop["step"])
    targets = {json.loads((out / n / "run.json").read_text())["results"]["until"]["target"]
               for n in ("warmup", "finetune") if (out / n / "run.json").exists()}  # none if the warm-up matched
    assert targets == {f"val_loss<={best:g}"}
    sp = report["speedup"]
    assert sp["scratch_best"] == best
    ours = rep.transfer_curve([out / "warmup", out / "finetune"], "val_loss", report["converter"]["seconds"])
    assert sp["vpgtrans"] == rep.first_reaching(ours, best, lower=True)
    if sp["vpgtrans"] is not None:  # matched: training stopped right there
        assert ours[-1] == sp["vpgtrans"]
    else:  # never matched: the whole budget ran
        assert report["stages"]["finetune"]["steps"] == 3
