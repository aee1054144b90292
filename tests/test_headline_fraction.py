"""data.fraction: a seeded random share of the training records (VPGTrans trained on 10.7% of the data)."""

from __future__ import annotations

import json

import pytest

from vpgtrans.data import load_records
from vpgtrans.data.dataset import DataConfig, fraction_subset
from vpgtrans.errors import ConfigError
from vpgtrans.recipes import build_recipe


def _rows(tmp_path, n):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"image": f"{i}.png", "caption": f"caption {i}"}) + "\n" for i in range(n)))
    return path


def test_fraction_is_a_seeded_ordered_subset_of_the_training_set_only(tmp_path):
    path = _rows(tmp_path, 200)
    cfg = DataConfig(train=str(path), val=str(path), fraction=0.107, fraction_seed=3)
    train = load_records(cfg, "train")
    assert len(train) == 21  # round(200 × 0.107)
    assert train == load_records(cfg, "train")  # same seed, same subset
    ids = [int(r["caption"].split()[1]) for r in train]
    assert ids == sorted(ids) and ids != list(range(21))  # file order kept, but not simply the first rows
    other = load_records(DataConfig(train=str(path), fraction=0.107, fraction_seed=4), "train")
    assert other != train
    assert len(load_records(cfg, "val")) == 200  # validation is never thinned
    capped = load_records(DataConfig(train=str(path), fraction=0.5, max_samples=10), "train")
    assert len(capped) == 10 and capped == load_records(DataConfig(train=str(path), fraction=0.5), "train")[:10]


def test_fraction_keeps_at_least_one_and_is_validated(tmp_path):
    assert len(fraction_subset(list(range(5)), 0.01)) == 1
    assert fraction_subset([], 0.5) == []
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="data.fraction"):
            build_recipe({"data": {"train": "x.jsonl", "fraction": bad}})
    recipe = build_recipe({"data": {"train": "x.jsonl"}}, ["data.fraction=0.25"])
    assert recipe.data.fraction == 0.25 and "fraction" in recipe.raw["data"]
