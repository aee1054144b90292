"""The synthetic world: scenes and text, a tiny build, loading, tokenizers, determinism, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpgtrans.errors import ConfigError, VpgtransError
from vpgtrans.world import WorldConfig, build_world, read_manifest
from vpgtrans.world.scene import all_words, captions, context, qa_pairs, rng_for, sample_scene

LMS = ("opt-s", "opt-m", "llama", "flant5")


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny world for the whole module (a few seconds)."""
    out = tmp_path_factory.mktemp("w") / "world"
    build_world(out, seed=3, progress=lambda _: None, config=WorldConfig.preset("tiny"))
    return out


def _records(world: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (world / "data" / f"{split}.jsonl").read_text().splitlines()]


# ---- scenes and text (no build) ----------------------------------------------------------------

def test_scenes_are_consistent_and_seeded() -> None:
    cfg = WorldConfig()
    for i in range(200):
        scene = sample_scene(rng_for(0, "train", i), cfg)
        objs = scene["objects"]
        assert len(objs) == scene["count"]
        for key in ("shape", "color", "position"):  # unambiguous references
            assert len({o[key] for o in objs}) == len(objs)
        rel = scene["relation"]
        if rel is not None:
            a, b = objs[rel["subject"]], objs[rel["object"]]
            holds = {"to the left of": a["col"] < b["col"], "to the right of": a["col"] > b["col"],
                     "above": a["row"] < b["row"], "below": a["row"] > b["row"]}
            assert holds[rel["relation"]]
    assert sample_scene(rng_for(0, "train", 5), cfg) == sample_scene(rng_for(0, "train", 5), cfg)
    differs = [sample_scene(rng_for(0, "train", i), cfg) != sample_scene(rng_for(1, "train", i), cfg)
               for i in range(20)]
    assert sum(differs) >= 15


def test_captions_qa_and_context_carry_the_attributes() -> None:
    cfg = WorldConfig()
    for i in range(100):
        rng = rng_for(0, "val", i)
        scene = sample_scene(rng, cfg)
        ctx = context(scene, rng)
        for cap in captions(scene, rng, 3):
            for o in scene["objects"]:
                assert o["color"] in cap and o["shape"] in cap and o["size"] in cap
                assert f"{o['size']} {o['color']} {o['shape']} {o['position']}" in ctx
        answers = dict(qa_pairs(scene, rng, cfg))
        o = scene["objects"][0]
        assert answers[f"what color is the {o['shape']}?"] == o["color"]
        assert answers[f"where is the {o['color']} {o['shape']}?"] == o["position"]
        assert answers["how many shapes are there?"] == ("one", "two", "three")[scene["count"] - 1]


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        WorldConfig(max_objects=4)
    with pytest.raises(ConfigError):
        WorldConfig(relation_share=1.5)
    with pytest.raises(ConfigError):
        WorldConfig.preset("huge")


def test_paths_follow_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vpgtrans.paths import home, world_dir

    monkeypatch.delenv("VPGTRANS_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert home() == tmp_path / "xdg" / "vpgtrans"
    monkeypatch.setenv("VPGTRANS_HOME", str(tmp_path / "vh"))
    assert world_dir() == tmp_path / "vh" / "world"


# ---- a tiny build ------------------------------------------------------------------------------

def test_data_files(tiny_world: Path) -> None:
    from PIL import Image

    cfg = WorldConfig.preset("tiny")
    for split in ("train", "val", "test"):
        recs = _records(tiny_world, split)
        assert len(recs) == getattr(cfg, f"n_{split}")
        for r in recs[:5]:
            assert {"image", "caption", "captions", "question", "answer", "qa", "attributes"} <= set(r)
            with Image.open(tiny_world / "data" / r["image"]) as im:
                assert im.size == (cfg.image_size, cfg.image_size) and im.mode == "RGB"
            assert [r["question"], r["answer"]] in r["qa"]
            for o in r["attributes"]["objects"]:
                assert o["color"] in r["caption"] and o["shape"] in r["caption"]
    manifest = read_manifest(tiny_world)
    assert manifest["seed"] == 3 and "data/train.jsonl" in manifest["files"]
    for name in LMS:
        assert set(manifest["lm_context_check"][name]) == {"true_context", "shuffled_context", "no_context"}


def test_assets_load_with_auto_classes(tiny_world: Path) -> None:
    import torch
    from transformers import (AutoImageProcessor, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                              Blip2VisionModel)

    vit = Blip2VisionModel.from_pretrained(tiny_world / "vit")
    proc = AutoImageProcessor.from_pretrained(tiny_world / "vit")
    from PIL import Image

    rec = _records(tiny_world, "val")[0]
    pixels = proc(images=[Image.open(tiny_world / "data" / rec["image"])], return_tensors="pt")["pixel_values"]
    feats = vit(pixel_values=pixels).last_hidden_state
    cfg = WorldConfig.preset("tiny")
    assert feats.shape == (1, (cfg.image_size // cfg.vit_patch) ** 2 + 1, vit.config.hidden_size)
    for name in LMS:
        tok = AutoTokenizer.from_pretrained(tiny_world / name)
        cls = AutoModelForSeq2SeqLM if name == "flant5" else AutoModelForCausalLM
        model = cls.from_pretrained(tiny_world / name)
        ids = tok([rec["caption"]], return_tensors="pt").input_ids
        kwargs = {"labels": ids} if name == "flant5" else {}
        out = model(input_ids=ids, **kwargs)
        assert out.logits.shape[-1] >= len(tok) and torch.isfinite(out.logits).all()
    assert AutoModelForCausalLM.from_pretrained(tiny_world / "opt-m").config.word_embed_proj_dim != \
        AutoModelForCausalLM.from_pretrained(tiny_world / "opt-m").config.hidden_size


def test_tokenizers_differ_round_trip_and_follow_conventions(tiny_world: Path) -> None:
    from transformers import AutoTokenizer

    toks = {name: AutoTokenizer.from_pretrained(tiny_world / name) for name in LMS}
    assert (tiny_world / "opt-s" / "tokenizer.json").read_bytes() == (tiny_world / "opt-m" / "tokenizer.json").read_bytes()
    opt, llama, t5 = toks["opt-s"], toks["llama"], toks["flant5"]
    assert (opt.bos_token_id, opt.eos_token_id, opt.pad_token_id) == (2, 2, 1)
    assert (llama.bos_token_id, llama.eos_token_id, llama.pad_token_id) == (1, 2, 3)
    assert (t5.pad_token_id, t5.eos_token_id, t5.bos_token_id) == (0, 1, None)
    assert opt("red").input_ids[0] == 2 and llama("red").input_ids[0] == 1 and t5("red").input_ids[-1] == 1
    vocabs = [opt.get_vocab(), llama.get_vocab(), t5.get_vocab()]
    assert "Ġred" in vocabs[0] and "▁red" in vocabs[1] and "▁red" in vocabs[2]
    assert len({v["Ġred"] if "Ġred" in v else v["▁red"] for v in vocabs}) == 3
    assert len({len(v) for v in vocabs}) == 3
    texts = [r["caption"] for r in _records(tiny_world, "val")] + [r["question"] for r in _records(tiny_world, "val")]
    for tok in (opt, llama, t5):
        for text in texts:
            assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
        for word in all_words(WorldConfig.preset("tiny")):
            assert len(tok(f"the {word}", add_special_tokens=False).input_ids) == 2
    # Byte fallback: LLaMA never needs <unk>, even for text the world never wrote.
    assert llama.unk_token_id not in llama("Zürich ✓", add_special_tokens=False).input_ids


def test_same_seed_same_files_and_cli(tiny_world: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from vpgtrans.cli.world import world

    out = tmp_path / "again"
    result = CliRunner().invoke(world, ["build", "--out", str(out), "--seed", "3", "--size", "tiny"])
    assert result.exit_code == 0, result.output
    assert "world ready at" in result.output
    first, second = read_manifest(tiny_world)["files"], read_manifest(out)["files"]
    assert first == second  # sha256 of every data file, tokenizer and weight file
    assert any(f.endswith(".safetensors") for f in first)
    # Up to date: a second build is skipped.
    again = CliRunner().invoke(world, ["build", "--out", str(out), "--seed", "3", "--size", "tiny"])
    assert again.exit_code == 0 and "up to date" in again.output
    info = CliRunner().invoke(world, ["info", "--out", str(out)])
    assert info.exit_code == 0 and json.loads(info.output)["seed"] == 3


def test_refuses_foreign_dir_and_never_leaves_half_a_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vpgtrans.world import build as build_mod

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(VpgtransError):
        build_world(foreign, config=WorldConfig.preset("tiny"), progress=lambda _: None)
    assert (foreign / "notes.txt").read_text() == "keep me"

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(build_mod, "_build_vit", boom)
    target = tmp_path / "w"
    with pytest.raises(RuntimeError):
        build_world(target, config=WorldConfig.preset("tiny"), progress=lambda _: None)
    assert not target.exists() and list(tmp_path.iterdir()) == [foreign]


def test_cli_rejects_bad_knob(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from vpgtrans.cli.world import world

    result = CliRunner().invoke(world, ["build", "--out", str(tmp_path / "x"), "--size", "tiny",
                                        "--set", "max_objets=2"])
    assert result.exit_code != 0 and isinstance(result.exception, ConfigError)
    assert "max_objects" in str(result.exception)


def test_leftovers_of_killed_builds_are_cleaned(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".w.building-{int(dead.stdout)}"
    (stale / "data").mkdir(parents=True)
    build_world(tmp_path / "w", config=WorldConfig.preset("tiny"), progress=lambda _: None)
    assert not stale.exists() and (tmp_path / "w" / "world.json").is_file()


def test_a_changed_lm_recipe_makes_a_built_world_stale(tiny_world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from vpgtrans.world import lms
    from vpgtrans.world.build import is_current

    cfg = WorldConfig.preset("tiny")
    assert is_current(tiny_world, cfg, 3)
    original = lms.lm_specs
    # The LM sizes and step budgets live in code, not in WorldConfig: changing them must force a rebuild.
    monkeypatch.setattr(lms, "lm_specs", lambda c: [replace(s, step_share=2.0) for s in original(c)])
    assert not is_current(tiny_world, cfg, 3)


def test_build_report_records_converter_cosines_for_every_ordered_pair(tiny_world: Path) -> None:
    from vpgtrans.world.fidelity import DEFAULT_CONVERTERS

    report = read_manifest(tiny_world)["converter_cosines"]
    assert set(report) == {f"{a}>{b}" for a in LMS for b in LMS if a != b}
    for key, row in report.items():
        assert row["seen_pairs"] <= row["string_pairs"] and 0 < row["dst_coverage"] <= 1
        assert 0 <= row["caption_mass_paired"] <= 1 and row["dst_caption_tokens_paired"] <= row["dst_caption_tokens"]
        assert set(row["converters"]) == set(DEFAULT_CONVERTERS), key
        for scores in row["converters"].values():
            assert -1 <= scores["uniform"] <= 1 and -1 <= scores["caption_weighted"] <= 1
    # One tokenizer for both OPT sizes: every seen token pairs with itself.
    assert report["opt-s>opt-m"]["dst_coverage"] == 1.0


def test_crossval_cosine_tells_related_from_unrelated_spaces() -> None:
    import torch

    from vpgtrans.registry import build
    from vpgtrans.world.fidelity import crossval_cosines

    g = torch.Generator().manual_seed(0)
    src = torch.randn(300, 16, generator=g)
    related = src @ torch.randn(16, 24, generator=g) + 0.05 * torch.randn(300, 24, generator=g)
    unrelated = torch.randn(300, 24, generator=g)
    weights = torch.zeros(300)
    weights[:10] = 1.0  # weighted mean over the first ten rows only
    for name in ("lstsq", "ridge", "anchor-omp"):
        good = crossval_cosines(build("converter", name), src, related, weights)
        bad = crossval_cosines(build("converter", name), src, unrelated, weights)
        assert good["uniform"] > 0.95 and good["caption_weighted"] > 0.95
        assert abs(bad["uniform"]) < 0.15
    # The weighted mean really is over the weighted rows: make only those rows unrelated.
    mixed = related.clone()
    mixed[:10] = unrelated[:10]
    scores = crossval_cosines(build("converter", "lstsq"), src, mixed, weights)
    assert scores["uniform"] > 0.8 and scores["caption_weighted"] < 0.4


@pytest.mark.slow
def test_parts_trained_in_worker_processes_equal_the_inline_ones(tiny_world: Path, tmp_path: Path) -> None:
    import hashlib
    import shutil

    from vpgtrans.world.build import _Lanes, _train_lm
    from vpgtrans.world.stage1 import STAGE1_DIR, train_stage1

    copy = tmp_path / "copy"
    shutil.copytree(tiny_world, copy)
    shutil.rmtree(copy / STAGE1_DIR)
    lines: list[str] = []
    cfg = WorldConfig.preset("tiny")
    with _Lanes(2, lines.append) as pool:
        jobs = [pool.submit(k, _train_lm, str(copy), cfg, 3, k) for k in range(len(LMS))]
        stage1 = pool.submit(1, train_stage1, str(copy), cfg, 3)
        results = [pool.result(job) for job in jobs]
        stage1_report = pool.result(stage1)
    manifest = read_manifest(tiny_world)
    for name, res in zip(LMS, results):
        assert res["check"] == manifest["lm_context_check"][name]
        digest = hashlib.sha256((copy / name / "model.safetensors").read_bytes()).hexdigest()
        assert digest == manifest["files"][f"{name}/model.safetensors"]["sha256"]
    weights = f"{STAGE1_DIR}/stage1.safetensors"
    assert hashlib.sha256((copy / weights).read_bytes()).hexdigest() == manifest["files"][weights]["sha256"]
    assert stage1_report["recall"] == manifest["stage1"]["recall"]
    assert any(line.startswith("[world] flant5: caption loss") for line in lines)  # progress came back
    assert any(line.startswith(f"[world] {STAGE1_DIR}: val image→text recall@1") for line in lines)


def test_the_world_ships_the_stage1_qformer_every_arm_starts_from(tiny_world: Path) -> None:
    from vpgtrans.model import build_model
    from vpgtrans.recipes import load_recipe
    from vpgtrans.train.stage1 import init_vpg_from_stage1
    from vpgtrans.world.stage1 import STAGE1_DIR

    manifest = read_manifest(tiny_world)
    assert set(manifest["stage1"]["recall"]) == {"i2t_r1", "t2i_r1"}
    assert manifest["stage1"]["steps"] == WorldConfig.preset("tiny").stage1_steps
    assert not (tiny_world / ".stage1-run").exists()  # its checkpoints and feature cache stay out of the world
    assert sorted(p.name for p in (tiny_world / STAGE1_DIR).iterdir()) == ["stage1.json", "stage1.safetensors", "tokenizer"]
    recipe = load_recipe("blip2_stage2_world", [f"model.vision.path={tiny_world / 'vit'}",
                                                f"model.llm.path={tiny_world / 'opt-s'}"])
    model = build_model(recipe.model)
    assert init_vpg_from_stage1(model.vpg, tiny_world / STAGE1_DIR)  # the stage-2 VPG has its shape


def test_a_changed_stage1_recipe_makes_a_built_world_stale(tiny_world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vpgtrans.world import stage1
    from vpgtrans.world.build import is_current

    cfg = WorldConfig.preset("tiny")
    assert is_current(tiny_world, cfg, 3)
    original = stage1.stage1_recipe_identity
    monkeypatch.setattr(stage1, "stage1_recipe_identity", lambda: {**original(), "train": {"lr": 1.0}})
    assert not is_current(tiny_world, cfg, 3)


def test_stage1_training_reports_its_steps_while_it_runs(tmp_path: Path) -> None:
    import threading
    import time

    from vpgtrans.world.stage1 import _report_steps

    log_file, lines, stop = tmp_path / "log.jsonl", [], threading.Event()
    log_file.write_text(json.dumps({"step": 40, "loss": 5.25, "lr": 1e-3}) + "\n")
    watcher = threading.Thread(target=_report_steps, args=(log_file, 400, lines.append, stop, 0.01))
    watcher.start()
    deadline = time.time() + 5
    while not lines and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # ten more ticks
    stop.set()
    watcher.join()
    assert len(lines) == 1 and "step 40/400 loss 5.250" in lines[0]  # once per new step, not once per tick
