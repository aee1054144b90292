"""VPGTrans pipeline on tiny models: merge, the recipe's warm-up LR, what trains, cross-type transfer, sources, report."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from vpgtrans.checkpoint import save_model
from vpgtrans.cli import main
from vpgtrans.errors import ConfigError
from vpgtrans.model import build_model
from vpgtrans.testing import tiny_spec, write_caption_set
from vpgtrans.train import read_log
from vpgtrans.train.config import count_steps
from vpgtrans.transfer import race
from vpgtrans.transfer.merge import merged_equals
from vpgtrans.transfer.options import TransferOptions
from vpgtrans.transfer.plan import plan_transfer

# Tiny OPT/LLaMA dirs would get the paper's real-scale recipe by default (transfer chooses it from the models).
RECIPE = ["--recipe", "vpgtrans_world"]
FAST = ["train.batch_size=2", "train.max_steps=3", "train.eval_every=0", "train.save_every=0",
        "train.max_text_len=12", "eval.metrics=[val_loss]", "data.max_val_samples=4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_paths):
    """Tiny data (8 captioned images) and saved source models trained (well, initialised) on OPT and LLaMA."""
    root = tmp_path_factory.mktemp("transfer")
    write_caption_set(root, 8, 3, ["a red circle on the left", "a blue circle on the left"])
    sources = {}
    for llm in ("opt", "llama"):
        torch.manual_seed(0)
        model = build_model(tiny_spec(tiny_paths, llm))
        with torch.no_grad():
            for p in model.vpg.parameters():
                p.add_(0.01 * torch.randn_like(p))
        sources[llm] = save_model(model, root / f"src-{llm}")
    overrides = FAST + [f"data.val={root / 'train.jsonl'}"]
    return {"root": root, "data": str(root / "train.jsonl"), "src": sources, "overrides": overrides,
            "paths": tiny_paths}


def _plan(world, dst="opt", src="opt", **kw):
    return plan_transfer(TransferOptions(src=str(world["src"][src]), dst=str(world["paths"][dst]), data=world["data"],
                                         out=kw.pop("out", world["root"] / "unused"),
                                         overrides=kw.pop("overrides", world["overrides"]),
                                         converter=kw.pop("converter", "lstsq"), recipe="vpgtrans_world", **kw))


def test_merged_projector_is_converter_times_source(world):
    prepared = race.prepare(_plan(world, dst="llama"), echo=lambda _: None)
    conv, src = prepared.fit.linear, prepared.source_projector
    proj = prepared.model.projector
    assert torch.allclose(proj.weight, conv.weight @ src.weight, atol=1e-5)
    assert torch.allclose(proj.bias, conv.weight @ src.bias + conv.bias, atol=1e-5)
    assert merged_equals(proj, src, conv)
    assert proj.out_features == prepared.model.llm.embed_dim != 0 and prepared.pairs.n_pairs > 10
    # The VPG is the source's, tensor for tensor.
    saved = load_file(str(world["src"]["opt"] / "model.safetensors"))
    for k, v in prepared.model.vpg.state_dict().items():
        assert torch.equal(v, saved[f"vpg.{k}"])


def test_warmup_trains_only_the_projector_at_the_recipes_scale(world, tmp_path):
    plan = _plan(world, dst="opt-m", out=tmp_path / "t")
    prepared = race.prepare(plan, echo=lambda _: None)
    model = prepared.model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    race.run_stage(plan, "warmup", model, echo=lambda _: None)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"projector.weight", "projector.bias"}
    rows = read_log(tmp_path / "t" / "warmup" / "log.jsonl")
    assert len(rows) == 4  # one epoch of 8 examples at batch 2
    # Exactly the world recipe's transfer.warmup_lr_scale (25) x its base LR, constant, no warm-up.
    assert all(r["lr"] == pytest.approx(25.0 * 1e-4) for r in rows)
    assert plan.finetune.train.lr == 1e-4 and plan.finetune.train.trainable == ["vpg", "projector"]


@pytest.mark.parametrize("src, dst", [("opt", "llama"), ("opt", "t5"), ("llama", "opt"), ("opt", "opt-m")])
def test_transfer_across_model_types(world, tmp_path, src, dst):
    report = race.transfer(TransferOptions(src=str(world["src"][src]), dst=str(world["paths"][dst]),
                                           data=world["data"], out=tmp_path / "o", converter="lstsq",
                                           warmup_epochs=0.5, overrides=world["overrides"], recipe="vpgtrans_world"),
                           echo=lambda _: None)
    out = tmp_path / "o"
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    assert manifest["spec"]["llm"]["path"] == str(world["paths"][dst])
    assert report.stages["warmup"].steps == 2 and report.stages["finetune"].steps == 3
    assert (out / "converter" / "converter.safetensors").exists()
    assert json.loads((out / "report.json").read_text())["converter"]["heldout_cosine"] is not None


def test_cli_transfer_compare_scratch_and_resume(world, tmp_path):
    out = tmp_path / "cli"
    args = ["transfer", "--src", str(world["src"]["opt"]), "--dst", str(world["paths"]["llama"]), "--data",
            world["data"], "--out", str(out), "--converter", "lstsq", "--warmup-epochs", "0.5", "--compare-scratch",
            "--no-progress", *RECIPE, *world["overrides"], "train.eval_every=1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    sp = report["speedup"]
    assert sp["metric"] == "val_loss" and report["scratch"]["steps"] == 5  # 2 warm-up + 3 fine-tuning steps
    assert {"speedup", "speedup_samples", "speedup_wall_time", "scratch", "vpgtrans", "scratch_best"} <= set(sp)
    assert sp["scratch"]["step"] >= 1 and "ratio" in result.output
    # Running again without --resume is refused; with it, every finished stage is skipped.
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "--resume" in again.output
    resumed = CliRunner().invoke(main, args + ["--resume"])
    assert resumed.exit_code == 0 and "warm-up: done earlier" in resumed.output, resumed.output


def test_dry_run_trains_nothing(world, tmp_path):
    out = tmp_path / "dry"
    result = CliRunner().invoke(main, ["transfer", "--src", str(world["src"]["opt"]), "--dst",
                                       str(world["paths"]["t5"]), "--data", world["data"], "--out", str(out),
                                       "--dry-run", *RECIPE, *world["overrides"]])
    assert result.exit_code == 0, result.output
    assert "constant 0.0025" in result.output and "token pairs" in result.output and "8 examples" in result.output
    assert "warm-up LR 25x the recipe's (its transfer.warmup_lr_scale)" in result.output
    assert "train projector" in result.output and "train vpg + projector" in result.output
    assert not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["--src", "/nope/model"], "neither a file"),
    (["--converter", "no-such"], "no-such"),
    (["--until", "cider>>1"], "METRIC>=VALUE"),
    (["--warmup-lr-scale", "0"], "warmup-lr-scale"),
])
def test_bad_input_is_one_line(world, tmp_path, args, expected):
    base = {"--src": str(world["src"]["opt"]), "--dst": str(world["paths"]["llama"])}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    flat = [x for kv in base.items() for x in kv]
    result = CliRunner().invoke(main, ["transfer", *flat, "--data", world["data"], "--out", str(tmp_path / "b"),
                                       "--dry-run", *RECIPE, *world["overrides"]])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], \
        result.output


def test_lavis_pth_source_needs_trust_pickle(world, tmp_path):
    state = load_file(str(world["src"]["opt"] / "model.safetensors"))
    lavis = {"query_tokens": state["vpg.query_tokens"], "opt_proj.weight": state["projector.weight"],
             "opt_proj.bias": state["projector.bias"], "opt_model.model.decoder.embed_tokens.weight": torch.randn(5, 4)}
    for k, v in state.items():
        if k.startswith("vpg.qformer.encoder.layer."):
            rest = k[len("vpg.qformer.encoder.layer."):]
            rest = rest.replace("attention.attention.", "attention.self.")
            lavis[f"Qformer.bert.encoder.layer.{rest}"] = v
        elif k.startswith("vpg.qformer.layernorm."):
            lavis["Qformer.bert.embeddings.LayerNorm." + k.rsplit(".", 1)[1]] = v
    pth = tmp_path / "blip2_opt.pth"
    torch.save({"model": lavis}, pth)
    vit = world["paths"]["blip2-vit"]
    base = ["transfer", "--src", str(pth), "--dst", str(world["paths"]["llama"]), "--src-llm",
            str(world["paths"]["opt"]), "--data", world["data"], "--out", str(tmp_path / "l"), "--converter",
            "lstsq", "--warmup-epochs", "0.25", "--no-progress", *RECIPE, *world["overrides"],
            f"model.vision={{name: blip2-vit, path: {vit}}}", "train.max_steps=1"]
    refused = CliRunner().invoke(main, base)
    assert refused.exit_code != 0 and "--trust-pickle" in refused.output
    ok = CliRunner().invoke(main, base + ["--trust-pickle"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "l" / "report.json").read_text())["stages"]["finetune"]["steps"] == 1


def test_lora_trains_in_finetuning_only(world, tmp_path):
    race.transfer(TransferOptions(src=str(world["src"]["opt"]), dst=str(world["paths"]["llama"]), data=world["data"],
                                  out=tmp_path / "lora", converter="lstsq", warmup_epochs=0.5, lora=True,
                                  overrides=world["overrides"], recipe="vpgtrans_world"), echo=lambda _: None)
    warm = load_file(str(tmp_path / "lora" / "warmup" / "model" / "model.safetensors"))
    final = load_file(str(tmp_path / "lora" / "model" / "model.safetensors"))
    lora_keys = [k for k in final if "lora_B" in k]
    assert lora_keys and all(not warm[k].any() for k in lora_keys)  # LoRA B starts at zero, frozen in the warm-up
    assert any(final[k].any() for k in lora_keys)


def test_the_ablation_options_are_honoured_by_the_python_api(world, tmp_path):
    """A fresh VPG (not the source's) and a step budget, run through the same transfer as the CLI's."""
    out = tmp_path / "fresh"
    options = TransferOptions(src=str(world["src"]["opt"]), dst=str(world["paths"]["llama"]), data=world["data"],
                              out=out, converter="lstsq", inherit_vpg=False, warmup_epochs=0.5, budget_steps=3,
                              overrides=world["overrides"], recipe="vpgtrans_world")
    result = race.transfer(options, echo=lambda _: None)
    # The warm-up trains the projector alone: an inherited VPG would still be the source's after it.
    saved = load_file(str(world["src"]["opt"] / "model.safetensors"))
    warm = load_file(str(out / "warmup" / "model" / "model.safetensors"))
    assert all(not torch.equal(warm[k], saved[k]) for k in saved if k.startswith("vpg.") and saved[k].numel() > 1)
    assert not (out / "converter").exists() and result.converter == {"converter": None}
    assert result.stages["warmup"].steps == 2 and result.stages["finetune"].steps == 1  # 3 steps in all


def test_the_warmup_batch_covers_one_training_epoch_and_counts_in_the_budget(world, tmp_path):
    """A warm-up at its own batch (a recipe's transfer.warmup_batch_size, or the option): one warm-up epoch sees one
    training epoch's samples, is evaluated once at its end, and spends its samples' worth of a step budget counted
    in training batches."""
    own = [*world["overrides"], "transfer.warmup_batch_size=8"]
    plan = _plan(world, dst="opt-m", out=tmp_path / "t", overrides=[*own, "train.eval_every=4"], budget_steps=6)
    w = plan.warmup.train
    assert w.batch_size == 8 and plan.warmup_steps == 1  # 8 examples: 4 training batches of 2, one warm-up batch
    assert w.eval_every == 1 and plan.finetune.train.batch_size == 2
    assert plan.finetune.train.max_steps == 6 - 4  # the warm-up's 8 samples are 4 of the budget's batches of 2
    given = _plan(world, dst="opt-m", out=tmp_path / "g", overrides=own, warmup_batch_size=3)
    assert given.warmup.train.batch_size == 3
    assert count_steps(given.warmup.train, 8)[0] == 2  # 8 samples of training epoch: 2 batches of 3 (floored)
    race.transfer(TransferOptions(src=str(world["src"]["opt"]), dst=str(world["paths"]["opt-m"]), data=world["data"],
                                  out=tmp_path / "r", overrides=(*own, "train.eval_every=4"), converter="lstsq",
                                  recipe="vpgtrans_world", warmup_batch_size=4), echo=lambda _: None)
    rows = read_log(tmp_path / "r" / "warmup" / "log.jsonl")
    assert [r["step"] for r in rows if "val_loss" in (r.get("metrics") or {})] == [2]  # 8 samples, one evaluation
    from vpgtrans.transfer.epochs import epoch_curve

    curve = epoch_curve([tmp_path / "r" / "warmup", tmp_path / "r" / "finetune"], per_epoch=4, batch_size=2)
    assert curve[0]["epoch"] == 1.0 and curve[0]["samples"] == 8  # by samples: the warm-up is epoch 1
    # Pinned steps are optimizer steps, also when each takes several micro-batches.
    accum = _plan(world, out=tmp_path / "a", overrides=[*world["overrides"], "train.grad_accum=2"], warmup_steps=2,
                  budget_steps=3)
    assert accum.warmup_steps == 2 and count_steps(accum.warmup.train, 8)[0] == 2
    with pytest.raises(ConfigError, match="--warmup-batch-size must be at least 1"):
        _plan(world, out=tmp_path / "z", warmup_batch_size=0)
    with pytest.raises(ConfigError, match="'warmup_batch_size' must be >= 1"):
        _plan(world, out=tmp_path / "z", overrides=[*own, "transfer.warmup_batch_size=0"])
