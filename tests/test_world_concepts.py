"""The richer world's knobs (more colours and shapes, a long tail) and that the default world stays as it was."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vpgtrans.errors import ConfigError
from vpgtrans.world import WorldConfig, build_world, read_manifest
from vpgtrans.world.build import _identity, tokenizer_vocab
from vpgtrans.world.lms import text_samples
from vpgtrans.world.render import render
from vpgtrans.world.scene import COLORS, SHAPES, all_words, describe, rng_for, sample_scene

RICH = {"num_colors": 16, "num_shapes": 16, "concept_tail": 1.0}


def _digest(cfg: WorldConfig, n: int = 300) -> str:
    h = hashlib.sha256()
    for i in range(n):
        rng = rng_for(0, "train", i)
        scene = sample_scene(rng, cfg)
        h.update(json.dumps([scene, describe(scene, rng, cfg)], sort_keys=True).encode())
    for sample in text_samples(cfg, 0, n, "opt"):
        h.update(repr(sample).encode())
    return h.hexdigest()


def test_the_default_world_is_drawn_exactly_as_before_the_richer_knobs() -> None:
    # Published figures and every benchmark cache are keyed on the default world: its scenes, text and identity
    # must not move when knobs are added (digest taken on main before concept_tail existed, 2026-12-07).
    assert _digest(WorldConfig()) == "2992d1897bf764794c4dbbb7c9a15dffe5d79b2846ed83cfc0cda14c52fdaf0e"
    identity = _identity(WorldConfig(), 0)
    assert "concept_tail" not in identity["config"] and identity["lms"]["vocab"] == {"opt": 1000, "llama": 800,
                                                                                     "t5": 600}
    rich = _identity(WorldConfig(**RICH), 0)
    assert rich["config"]["concept_tail"] == 1.0 and rich["lms"]["vocab"]["opt"] > 1000


def test_a_long_tail_makes_later_colours_and_shapes_rarer_and_keeps_references_unambiguous() -> None:
    cfg = WorldConfig(**RICH)
    colors, shapes = Counter(), Counter()
    for i in range(3000):
        scene = sample_scene(rng_for(0, "train", i), cfg)
        objs = scene["objects"]
        for key in ("shape", "color", "position"):
            assert len({o[key] for o in objs}) == len(objs)
        colors.update(o["color"] for o in objs)
        shapes.update(o["shape"] for o in objs)
    assert set(colors) == set(list(COLORS)[:16]) and set(shapes) == set(SHAPES[:16])  # every concept occurs
    for counts, order in ((colors, list(COLORS)), (shapes, list(SHAPES))):
        assert counts[order[0]] > 5 * counts[order[15]]  # Zipf 1 over 16 values, drawn without replacement
        assert counts[order[0]] > counts[order[3]] > counts[order[15]]
    uniform = Counter(o["color"] for i in range(3000)
                      for o in sample_scene(rng_for(0, "train", i), replace(cfg, concept_tail=0.0))["objects"])
    assert max(uniform.values()) < 1.5 * min(uniform.values())


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_draws_a_solid_object_inside_its_cell(shape: str) -> None:
    scene = {"count": 1, "relation": None,
             "objects": [{"shape": shape, "color": "red", "size": "large", "position": "center", "row": 1, "col": 1}]}
    # The star reaches 1.2 radii out; a new shape reaching further would overlap its neighbours more often.
    reach = 1.2 * 0.17 * 48 * 1.08 + 0.05 * 16 + 1  # radius x size x its random scale + jitter + a pixel
    for i in range(5):
        _, mask = render(scene, rng_for(0, "train", i), 48)
        ys, xs = np.nonzero(mask)
        assert len(ys) >= 20  # at least a few patches' worth: the ViT can see it
        assert max(abs(ys - 23.5).max(), abs(xs - 23.5).max()) <= reach


def test_the_richer_knobs_are_validated() -> None:
    with pytest.raises(ConfigError, match="num_colors"):
        WorldConfig(num_colors=17)
    with pytest.raises(ConfigError, match="concept_tail"):
        WorldConfig(concept_tail=-1.0)


def test_a_rich_tiny_world_builds_with_every_new_word_one_token(tmp_path: Path) -> None:
    cfg = replace(WorldConfig.preset("tiny"), **RICH)
    out = build_world(tmp_path / "rich", seed=1, progress=lambda _: None, config=cfg)
    manifest = read_manifest(out)
    assert manifest["config"]["num_shapes"] == 16 and manifest["lms"]["vocab"] == tokenizer_vocab(cfg)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "opt-s")
    for word in ("magenta", "trapezoid", "semicircle", "fuchsia"):  # new concept words and their synonyms
        assert word in all_words(cfg)
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1


def test_the_vit_probe_benchmark_trains_and_probes_the_builds_vit(tmp_path: Path, capsys) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _vit_probe import main

    out = tmp_path / "probe.json"
    knobs = ["vit_steps=3", "vit_batch=8", "vit_hidden=32", "vit_layers=1", "n_train=16", "n_val=8", "n_test=1",
             "num_shapes=12", "concept_tail=1.0"]
    assert main([x for k in knobs for x in ("--set", k)] + ["--out", str(out)]) == 0
    line = json.loads(out.read_text())
    assert line == json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["vit_steps"] == 3 and "concept_tail=1.0" in line["overrides"]
    assert {"object_color", "object_shape", "count"} <= set(line["probe"])
    assert all(0.0 <= v <= 1.0 for v in line["probe"].values())
