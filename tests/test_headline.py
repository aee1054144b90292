"""The headline command `vpgtrans transfer --src opt-2.7b --dst llama-7b` on tiny real-architecture stand-ins.

The stand-ins sit in a private Hugging Face cache under the hub ids the names resolve to
(Salesforce/blip2-opt-2.7b, facebook/opt-2.7b, huggyllama/llama-7b), so they are found exactly as a user's
7B weights would be: by name, offline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from vpgtrans.cli import main
from vpgtrans.recipes import load_recipe
from vpgtrans.testing import tiny_images
from vpgtrans.transfer.choose import choose_recipe

TINY = ["train.batch_size=2", "train.grad_accum=1", "train.max_steps=2", "train.eval_every=0",
        "train.save_every=0", "train.max_text_len=12", "train.mixed_precision=\"no\"", "train.num_workers=0",
        "eval.metrics=[val_loss]", "eval.max_samples=4", "data.max_val_samples=4", "data.feature_batch_size=4",
        "data.cache_dtype=float32"]


def _cache_put(hub: Path, repo: str, folder: Path) -> None:
    """Lay `folder` out as the cached snapshot of `repo` (what `hf download` leaves behind)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hub / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)


def _tiny_blip2(opt_dir: Path, out: Path) -> None:
    """A Blip2ForConditionalGeneration whose language model is the tiny OPT (as BLIP-2 OPT-2.7B holds OPT-2.7B)."""
    from transformers import (AutoConfig, Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig,
                              Blip2VisionConfig, OPTForCausalLM)

    text = AutoConfig.from_pretrained(opt_dir).to_dict()
    text["_name_or_path"] = "facebook/opt-2.7b"
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, image_size=32, patch_size=8,
                                        initializer_range=0.02).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, encoder_hidden_size=32, vocab_size=60).to_dict(),
        text_config=text, num_query_tokens=4)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    model.language_model.load_state_dict(OPTForCausalLM.from_pretrained(opt_dir).state_dict(), strict=False)
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32},
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}))


@pytest.fixture(scope="module")
def standins(tmp_path_factory, tiny_paths):
    """A private HF cache holding BLIP-2 OPT-2.7B, OPT-2.7B and LLaMA-7B stand-ins, and 8 captioned images."""
    root = tmp_path_factory.mktemp("headline")
    tiny = tiny_paths
    _tiny_blip2(tiny["opt"], root / "blip2")
    hub = root / "hf" / "hub"
    _cache_put(hub, "Salesforce/blip2-opt-2.7b", root / "blip2")
    _cache_put(hub, "facebook/opt-2.7b", tiny["opt"])
    _cache_put(hub, "huggyllama/llama-7b", tiny["llama"])
    _cache_put(hub, "lmsys/vicuna-7b-v1.1", tiny["llama"])  # a LLaMA-architecture stand-in, as Vicuna is
    (root / "img").mkdir()
    rows = []
    for i, im in enumerate(tiny_images(8, seed=5)):
        im.save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": f"a {['red', 'blue'][i % 2]} square on the left"})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from vpgtrans.data.cc_sbu_export import export_cc_sbu

    export_cc_sbu(root / "train.jsonl", root / "cc_sbu_align")
    return {"root": root, "hub": hub, "data": str(root / "train.jsonl"), "cc_sbu": str(root / "cc_sbu_align")}


@pytest.fixture
def cache(standins, monkeypatch):
    """Point huggingface_hub (and so transformers) at the stand-in cache for this test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(standins["hub"]))
    return standins


def _run(*args: str):
    return CliRunner().invoke(main, ["transfer", "--src", "opt-2.7b", "--dst", "llama-7b", *args])


def test_the_default_recipe_follows_the_models():
    assert choose_recipe("opt-2.7b", "llama-7b").recipe == "vpgtrans_vl_llama"
    assert choose_recipe("opt-2.7b", "opt-6.7b").recipe == "vpgtrans_opt2.7b_to_6.7b"
    assert choose_recipe("flant5-xl", "flant5-xxl").kind == "size"
    vicuna = choose_recipe("opt-6.7b", "vicuna-7b")
    assert vicuna.recipe == "vpgtrans_vl_llama" and vicuna.followup == "vl_vicuna"
    assert choose_recipe("world-opt-s", "world-llama").recipe == "vpgtrans_world"
    # The paper's VL-LLaMA values (official scripts): 5e-4 warm-up (5 × 1e-4), 1e-4 cosine → 5e-5, batch 1728.
    r = load_recipe("vpgtrans_vl_llama")
    assert (r.train.lr, r.train.min_lr, r.train.warmup_steps, r.train.schedule) == (1e-4, 5e-5, 0, "cosine")
    assert r.train.batch_size * r.train.grad_accum == 1728 and r.train.max_steps == 50000
    assert r.train.weight_decay == 0.05 and r.model.vision["path"] == "eva-vit-g"
    v = load_recipe("vl_vicuna")
    assert v.train.batch_size * v.train.grad_accum == 120 and (v.train.lr, v.train.max_steps) == (1e-5, 800)


def test_without_data_it_refuses_in_one_line_naming_the_layouts(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's default data/coco/... path does not exist here
    result = _run("--out", str(tmp_path / "o"))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1, result.output
    line = lines[0]
    assert line.startswith("error:") and "--data" in line and "vpgtrans_vl_llama" in line
    for layout in ("COCO Karpathy JSON", "LAVIS annotation JSON", "JSONL", "webdataset", "cc_sbu_align", "e.g."):
        assert layout in line
    assert not (tmp_path / "o").exists()


def test_dry_run_plans_the_paper_recipe_with_the_stand_ins(cache, tmp_path):
    result = _run("--data", cache["data"], "--data-fraction", "0.5", "--dry-run", "--out", str(tmp_path / "o"),
                  f"data.val={cache['data']}")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "recipe  vpgtrans_vl_llama: opt → llama" in out and "type transfer" in out and "--recipe overrides" in out
    assert "hf-blip2 source" in out and "facebook/opt-2.7b" in out and "llama-7b (llama)" in out
    assert "4 examples (data.fraction 0.5, seed 0)" in out  # half of the 8 training rows
    assert "constant 0.0005" in out and "cosine 0.0001 → 5e-05" in out and "batch 108 × 16" in out
    assert "50000 steps" in out and "MISSING" not in out
    print(out)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # the dry run's memory plan of a 7B model sized from its name
def test_dry_run_lists_every_missing_weight_and_still_plans(cache, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    result = _run("--data", cache["data"], "--dry-run", "--out", str(tmp_path / "o"), f"data.val={cache['data']}")
    assert result.exit_code != 0
    out = result.output
    assert "recipe  vpgtrans_vl_llama" in out and "stage 1 (warm-up)" in out and "stage 2 (fine-tune)" in out
    assert "source  opt-2.7b: MISSING" in out and "source LLM opt-2.7b (opt)" in out
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "4 missing weights" in error[0]
    for repo in ("Salesforce/blip2-opt-2.7b", "huggyllama/llama-7b", "facebook/opt-2.7b"):
        assert f"hf download {repo}" in error[0]


def test_the_headline_command_runs_end_to_end(cache, tmp_path):
    out = tmp_path / "o"
    result = _run("--data", cache["data"], "--out", str(out), "--no-progress", "--converter", "lstsq",
                  f"data.val={cache['data']}", *TINY)
    assert result.exit_code == 0, result.output
    assert "recipe vpgtrans_vl_llama" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["warmup"]["lr"] == 5e-4 and report["stages"]["warmup"]["trainable"] == ["projector"]
    assert report["stages"]["finetune"]["steps"] == 2 and report["stages"]["finetune"]["lr"] == 1e-4
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    assert manifest["spec"]["llm"]["path"] == "llama-7b" and manifest["spec"]["vision"]["path"] == "eva-vit-g"
    assert manifest["spec"]["llm"]["dtype"] == "float16"  # the recipe's LLM dtype, as the paper ran its 7B LLMs


def test_into_vicuna_runs_vl_vicuna_then_its_minigpt4_style_stage(cache, tmp_path):
    out = tmp_path / "v"
    then = ["--then", "train.batch_size=2", "--then", "train.grad_accum=1", "--then", "train.max_steps=1",
            "--then", "train.warmup_steps=0", "--then", "train.max_text_len=12", "--then", 'train.mixed_precision="no"',
            "--then", "train.save_every=0"]
    result = CliRunner().invoke(main, ["transfer", "--src", "opt-2.7b", "--dst", "vicuna-7b", "--data", cache["data"],
                                       "--out", str(out), "--no-progress", "--converter", "lstsq",
                                       f"data.val={cache['data']}", *TINY, "--then-data", cache["cc_sbu"], *then])
    assert result.exit_code == 0, result.output
    assert "recipe vpgtrans_vl_llama: opt → vicuna" in result.output and "== vl_vicuna" in result.output
    run = json.loads((out / "vl_vicuna" / "run.json").read_text())
    r = run["recipe"]
    assert r["name"] == "vl_vicuna" and r["train"]["init_from"] == str(out / "model")
    assert r["model"]["template"]["text"].startswith("###Human: <Img><ImageHere></Img>")
    assert r["model"]["llm"]["path"] == "vicuna-7b" and r["train"]["trainable"] == ["vpg", "projector"]
    assert (out / "vl_vicuna" / "model" / "model.safetensors").exists()
    refused = _run("--data", cache["data"], "--then-data", cache["cc_sbu"], "--dry-run")
    assert refused.exit_code != 0 and "into Vicuna" in refused.output.strip().splitlines()[-1]


def test_a_local_model_is_known_by_what_it_says_not_by_its_folder_name(tmp_path):
    from vpgtrans.transfer.choose import family

    model = tmp_path / "src-llama"  # a folder name that suggests LLaMA ...
    model.mkdir()
    (model / "manifest.json").write_text(json.dumps({"spec": {"llm": {"path": "world-opt-s"}}}))
    assert family(str(model)) == "world"  # ... holding a model trained on the world's OPT
    hf = tmp_path / "my-checkpoint"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "opt"}))
    assert family(str(hf)) == "opt" and choose_recipe(str(hf), "llama-7b").kind == "type"
