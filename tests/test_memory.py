"""The memory plan: estimate vs a measured real training step, dry-run output, paper sizes from names alone,
and the early refusal driven by the same estimate."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from vpgtrans.errors import TrainingError
from vpgtrans.interfaces import TextSample
from vpgtrans.memory import GIB, PlanError, TensorMemoryTracker, estimate
from vpgtrans.model import build_model
from vpgtrans.testing import tiny_images, tiny_spec
from vpgtrans.train.config import TrainConfig
from vpgtrans.train.optim import make_optimizer, param_groups


def _measured_step_peak(spec: dict, train: TrainConfig) -> int:
    """Peak live tensor bytes of a real second training step (the first creates the AdamW state)."""
    torch.manual_seed(0)
    model = build_model(spec)
    model.set_gradient_checkpointing(train.gradient_checkpointing)
    model.train()
    opt = make_optimizer(param_groups(model, train.weight_decay), train)
    samples = [TextSample(target=" ".join(["a red circle left of the blue square"] * 8))] * train.batch_size
    feats = torch.randn(train.batch_size, model.vision.num_tokens, model.vision.hidden_size)

    def step():
        model(feats, samples, max_text_len=train.max_text_len).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    tracker = TensorMemoryTracker(existing=[*model.parameters(), *model.buffers(), feats, *state])
    with tracker:
        step()
    return tracker.peak


@pytest.mark.parametrize("llm,ckpt,lora", [("opt", False, False), ("opt", True, False), ("llama", True, True),
                                           ("t5", False, False)])
def test_estimate_is_within_25_percent_of_a_measured_training_step(tiny_paths, llm, ckpt, lora):
    spec = tiny_spec(tiny_paths, llm=llm)
    if lora:
        spec["lora"] = {"r": 4}
    train = TrainConfig(batch_size=16, max_text_len=24, gradient_checkpointing=ckpt)
    plan = estimate(spec, train, text_len=24)
    measured = _measured_step_peak(spec, train)
    assert plan.total == pytest.approx(measured, rel=0.25), (plan.parts, measured)
    assert plan.checkpointing == ckpt and plan.activations[True] < plan.activations[False]
    assert (plan.parts["trainable weights"] > plan.parts["gradients"] - 1) and not plan.notes


def test_paper_models_are_planned_from_their_names_alone():
    spec = {"vision": {"name": "blip2-vit", "path": "eva-vit-g", "dtype": "float16"},
            "vpg": {"name": "qformer", "num_query_tokens": 32},
            "llm": {"name": "llama", "path": "llama-7b", "dtype": "float16"}}
    plan = estimate(spec, TrainConfig(batch_size=1, max_text_len=8, trainable=["projector"]))
    # The published parameter counts of LLaMA-7B and BLIP-2's EVA ViT-g (39 layers); the frozen Q-Former as in
    # `vpgtrans components`.
    assert plan.llm_params == 6_738_415_616
    assert plan.parts["frozen weights"] == 6_738_415_616 * 2 + 985_952_256 * 2 + 105_162_240 * 4
    assert any("llama-7b: sizes assumed from the name" in n for n in plan.notes)
    assert "fits" in plan.lines(80 * GIB, "on 80 GB")[-1] and "NOT" in plan.lines(8 * GIB, "on 8 GB")[-1]
    with pytest.raises(PlanError, match="no config.json for LLM 'gpt-99'"):
        estimate({**spec, "llm": {"name": "llama", "path": "gpt-99"}}, TrainConfig(batch_size=1))


@pytest.fixture()
def recipe_file(tmp_path, tiny_paths):
    (tmp_path / "img").mkdir()
    rows = []
    for i, im in enumerate(tiny_images(4, seed=1)):
        im.save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": "a red square"})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"name": "tiny_mem", "model": tiny_spec(tiny_paths), "data": {"train": str(tmp_path / "train.jsonl")},
              "train": {"batch_size": 2, "max_steps": 1, "max_text_len": 16}, "eval": {"metrics": []}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "tiny.yaml"


def test_dry_run_prints_the_memory_plan(recipe_file, tmp_path):
    from vpgtrans.cli import main

    result = CliRunner().invoke(main, ["train", "--recipe", str(recipe_file), "--out", str(tmp_path / "o"),
                                       "--dry-run", "train.gradient_checkpointing=true"])
    assert result.exit_code == 0, result.output
    out = result.output
    for part in ("frozen weights", "trainable weights", "gradients", "optimizer state", "activations",
                 "features (batch)", "checkpointing on"):
        assert part in out, out
    assert "fits in the free memory of this cpu" in out


def test_the_estimate_refuses_a_run_that_does_not_fit(recipe_file, tmp_path, monkeypatch):
    import vpgtrans.memory as memory
    from vpgtrans.recipes import load_recipe
    from vpgtrans.train.runner import run_recipe

    recipe = load_recipe(str(recipe_file), [])
    need = memory.plan_recipe(recipe).total
    monkeypatch.setattr(memory, "available_memory", lambda: ("cuda", need - 1))
    with pytest.raises(TrainingError, match=r"needs ~0\.0 GiB at dtype float32 and the whole run ~0\.0 GiB .* "
                                            r"but the cuda has 0\.0 GiB free") as info:
        run_recipe(recipe, tmp_path / "run", progress=False, echo=lambda _: None)
    assert "train.gradient_checkpointing=true" in str(info.value) and not (tmp_path / "run").exists()
    monkeypatch.setattr(memory, "available_memory", lambda: ("cuda", need))
    memory.check_run_fits(recipe)  # exactly enough: no complaint
