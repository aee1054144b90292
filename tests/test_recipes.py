"""Recipes: every YAML validates; MiniGPT-4 stage 2 runs end to end on a cc_sbu_align export; LoRA adapters reload."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from vpgtrans.cli import main
from vpgtrans.cli.world import world
from vpgtrans.data import build_dataset, load_records
from vpgtrans.data.cc_sbu_export import export_cc_sbu
from vpgtrans.data.readers import read_cc_sbu_align
from vpgtrans.errors import DataError
from vpgtrans.recipes import find_recipe, list_recipes, load_recipe
from vpgtrans.testing import tiny_images, tiny_spec
from vpgtrans.train import read_log

MINIGPT4 = "###Human: <Img><ImageHere></Img> {instruction} ###Assistant: "
NEW = {"minigpt4_stage2", "vl_vicuna", "llava_pretrain", "minigpt4_lora"}


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_validates(name):
    r = load_recipe(name)
    assert r.name == name and r.description and r.data.train and "${" not in r.data.train


def test_paper_recipes_have_their_settings():
    assert NEW | {f"{n}_world" for n in NEW} <= set(list_recipes())
    for name in ("minigpt4_stage2", "minigpt4_stage2_world", "minigpt4_lora", "vl_vicuna"):
        r = load_recipe(name)
        assert r.model.template == {"text": MINIGPT4, "end": "###"} and len(set(r.data.instructions)) == 4
        assert r.data.format == "cc_sbu_align" and r.train.schedule == "cosine"
    m = load_recipe("minigpt4_stage2")
    assert m.train.trainable == ["projector"] and m.model.llm["path"] == "vicuna-7b"
    assert m.model.vision["path"] == "eva-vit-g" and m.data.train.endswith("cc_sbu_align")
    assert (m.train.lr, m.train.warmup_lr, m.train.min_lr, m.train.weight_decay) == (3e-5, 1e-6, 1e-5, 0.05)
    assert (m.train.max_steps, m.train.batch_size, m.train.max_text_len) == (1000, 12, 160)
    v = load_recipe("vl_vicuna")
    assert v.train.trainable == ["vpg", "projector"] and (v.train.lr, v.train.max_steps) == (1e-5, 800)
    llava = load_recipe("llava_pretrain")
    assert llava.model.vision["layer"] == -2 and llava.model.vision["drop_cls"] is True
    assert llava.model.vpg["name"] in ("mlp", "linear") and llava.model.vision["path"].startswith("clip-vit-l")
    assert load_recipe("minigpt4_lora").model.lora["r"] == 8
    for name in NEW:
        world = load_recipe(f"{name}_world")
        assert world.model.llm["path"].startswith("world-") and world.model.vision["path"] == "world-vit"


@pytest.fixture(scope="module")
def cc_sbu(tmp_path_factory):
    """A world-like JSONL of 12 tiny PNGs exported to cc_sbu_align."""
    root = tmp_path_factory.mktemp("ccsbu")
    (root / "data" / "images").mkdir(parents=True)
    rows = []
    for i, im in enumerate(tiny_images(12, seed=4)):
        im.save(root / "data" / "images" / f"{i}.png")
        rows.append({"id": f"train-{i:05d}", "image": f"images/{i}.png",
                     "caption": f"a {['red', 'blue', 'green'][i % 3]} circle on the left",
                     "captions": ["x", "y"], "attributes": {"count": 1}})
    (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = export_cc_sbu(root / "data" / "train.jsonl", root / "cc_sbu_align")
    assert summary["images"] == 12
    return root


def test_export_is_read_back_by_the_cc_sbu_align_reader(cc_sbu):
    ann = json.loads((cc_sbu / "cc_sbu_align" / "filter_cap.json").read_text())["annotations"]
    assert ann[0] == {"image_id": "train-00000", "caption": "a red circle on the left"}
    records = read_cc_sbu_align(cc_sbu / "cc_sbu_align")
    assert [r["caption"] for r in records] == [a["caption"] for a in ann]
    with Image.open(records[3]["image"]) as im:
        assert im.format == "JPEG" and im.size == (40, 40)
    assert not [p for p in (cc_sbu).iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_world_export_command_and_errors(cc_sbu, tmp_path):
    out = tmp_path / "exp"
    result = CliRunner().invoke(world, ["export-cc-sbu", "--world", str(cc_sbu), "--out", str(out), "--limit", "5"])
    assert result.exit_code == 0, result.output
    assert "exported 5 images" in result.output and len(list((out / "image").glob("*.jpg"))) == 5
    (tmp_path / "nocap.jsonl").write_text(json.dumps({"image": "a.png", "question": "q?", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match="missing key 'caption'"):
        export_cc_sbu(tmp_path / "nocap.jsonl", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def _tiny_variant(name: str, tiny_paths, data_dir, tmp_path, **train) -> str:
    """The built-in recipe with tiny models and data swapped in (template, instructions, trainable kept)."""
    raw = yaml.safe_load(find_recipe(name).read_text())
    spec = tiny_spec(tiny_paths, llm="llama")
    raw["model"].update(vision=spec["vision"], vpg=spec["vpg"], llm=spec["llm"])
    raw["data"].update(train=str(data_dir), cache_dtype="float32")
    raw["train"].update(batch_size=4, max_steps=3, warmup_steps=1, save_every=0, max_text_len=24,
                        mixed_precision="no", **train)
    path = tmp_path / f"{name}_tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_minigpt4_stage2_runs_end_to_end_on_cc_sbu_export(cc_sbu, tiny_paths, tmp_path):
    recipe = _tiny_variant("minigpt4_stage2", tiny_paths, cc_sbu / "cc_sbu_align", tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--recipe", recipe, "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "done: 3 steps" in result.output
    rows = read_log(out / "log.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["data"]["train_examples"] == 12
    assert run["plan"]["trainable_tensors"] == {"decay": 1, "no_decay": 1}  # projector weight + bias only

    # The examples the run trained on: MiniGPT-4 template around the prompts, target + '###', instructions drawn.
    r = load_recipe(recipe)
    from vpgtrans.model import build_model

    ds, _ = build_dataset(load_records(r.data), build_model(r.model), r.data, seed=r.train.seed, progress=False)
    texts = [ds.text(i) for i in range(len(ds))]
    assert all(s.before == "###Human: <Img>" and s.after.endswith(" ###Assistant: ") for s, _ in texts)
    assert all(s.target.endswith("###") for s, _ in texts)
    assert {instr for _, instr in texts} <= set(r.data.instructions) and len({i for _, i in texts}) >= 3


def test_lora_recipe_saves_and_reloads_adapter_exactly(cc_sbu, tiny_paths, tmp_path):
    from vpgtrans.checkpoint import load_model
    from vpgtrans.interfaces import TextSample
    from vpgtrans.lora import load_adapter, lora_parameters

    recipe = _tiny_variant("minigpt4_lora", tiny_paths, cc_sbu / "cc_sbu_align", tmp_path, lr=1e-2)
    out = tmp_path / "lora_run"
    result = CliRunner().invoke(main, ["train", "--recipe", recipe, "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    adapter = out / "model" / "lora"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8

    a = load_model(out / "model")
    assert any(p.abs().sum() > 0 for n, p in lora_parameters(a).items() if "lora_B" in n)  # the adapter trained
    b = load_model(out / "model")
    with torch.no_grad():
        for name, p in lora_parameters(b).items():
            p.zero_()
    with torch.no_grad():
        feats = a.encode_images(a.vision.preprocess(tiny_images(2, seed=1)))
    samples = [TextSample(before="###Human: <Img>", after="</Img> Describe this image. ###Assistant: ",
                          target="a red circle###")] * 2
    with torch.no_grad():
        ref = a.logits(feats, samples)
        assert not torch.allclose(ref, b.logits(feats, samples))  # the adapter changes the outputs
        load_adapter(b, adapter)  # peft's own format, not model.safetensors
        assert torch.equal(ref, b.logits(feats, samples))
