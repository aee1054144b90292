"""Streamed webdataset shards and the official train transform: each sample once per epoch over ranks and loader
workers, exact resume from any micro-batch, a weighted mixture of sources, bad samples, and the crop's draws."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from vpgtrans.data import BadSamples, DataConfig, build_dataset, load_records
from vpgtrans.data.streaming import Layout, StreamSpec, count_shard, Keep
from vpgtrans.data.transforms import TrainTransform, crop_box
from vpgtrans.errors import ConfigError, DataError
from vpgtrans.model import Template
from vpgtrans.train.stream import BatchStream


def _png(i: int, size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (i % 251, (3 * i) % 251, 9)).save(buf, "PNG")
    return buf.getvalue()


def write_shards(folder: Path, sizes: list[int], prefix: str = "s", first: int = 0,
                 broken: set[int] = frozenset()) -> Path:
    """Shards of `sizes` samples each, keys numbered from `first`; caption 'c <key>'; `broken` keys get bad PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    k = first
    for s, n in enumerate(sizes):
        with tarfile.open(folder / f"{prefix}{s:03d}.tar", "w") as tar:
            for _ in range(n):
                image = b"not a png" if k in broken else _png(k)
                for ext, data in (("png", image), ("txt", f"c {k}".encode())):
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1
    return folder


class FakeVision:
    """The preprocess of a vision encoder: the image's first pixel, so tests can see crops and flips cheaply."""

    input_hw = (8, 8)

    def preprocess(self, images):
        return torch.stack([torch.tensor(im.getpixel((0, 0)), dtype=torch.float32) for im in images])


class FakeModel:
    vision, template = FakeVision(), Template()
    llm = type("LLM", (), {"is_encoder_decoder": False})()


def _stream(config: DataConfig, bad: BadSamples | None = None, seed: int = 3):
    spec = load_records(config, "train", bad)
    assert isinstance(spec, StreamSpec)
    return build_dataset(spec, FakeModel(), config, seed=seed)[0]


def _captions(batches) -> list[tuple[str, ...]]:
    return [tuple(s.target for s in b["samples"]) for b in batches]


def _take(stream: BatchStream, start: int, n: int) -> list[tuple[str, ...]]:
    it = stream.batches(start)
    return _captions(next(it) for _ in range(n))


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path / "shards", [7, 5, 6, 9, 8, 4])


def test_streams_only_what_it_should(tmp_path, shards):
    assert isinstance(load_records(DataConfig(train=str(shards))), list)  # the cache on: indexed, as before
    spec = load_records(DataConfig(train=str(shards), feature_cache=False))
    assert isinstance(spec, StreamSpec) and len(spec) == 39 and not hasattr(spec, "records")
    assert [r["caption"] for r in spec[:3]] == ["c 0", "c 1", "c 2"]
    assert "6 shards" in spec.describe()
    assert isinstance(load_records(DataConfig(train=str(shards), feature_cache=False, stream="false")), list)
    with pytest.raises(ConfigError, match="max_samples"):
        load_records(DataConfig(train=str(shards), feature_cache=False, max_samples=5))
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"image": "x.png", "caption": "c"}) + "\n")
    with pytest.raises(ConfigError, match="data.stream=true streams webdataset"):
        load_records(DataConfig(train=str(jsonl), stream=True))


def test_counting_reads_headers_only_and_matches_the_reader(shards):
    path = str(sorted(shards.glob("*.tar"))[3])
    assert count_shard(path, Keep()) == 9
    half = Keep(0.5, seed=1)
    from webdataset.tariterators import tarfile_samples

    assert count_shard(path, half) == sum(1 for s in tarfile_samples([{"url": path}]) if half(s)) < 9


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_shows_each_sample_once_over_ranks_and_workers(shards, workers):
    config = DataConfig(train=str(shards), feature_cache=False, shuffle_buffer=4)
    seen: list[str] = []
    for rank in range(2):
        stream = BatchStream(_stream(config), 2, seed=3, rank=rank, world_size=2, num_workers=workers)
        seen += [c for batch in _take(stream, 0, stream.per_epoch) for c in batch]
    # A few samples are left over per pass (every reader emits the smallest reader's count), never repeated.
    assert len(seen) == len(set(seen)) == len(stream.dataset) == stream.per_epoch * 4
    assert 39 - 9 * (2 * max(1, workers)) <= len(seen) <= 39


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_any_micro_batch_continues_exactly(shards, workers):
    config = DataConfig(train=str(shards), feature_cache=False, shuffle_buffer=5, augment=True)
    stream = BatchStream(_stream(config), 3, seed=3, num_workers=workers)
    full = _take(stream, 0, 3 * stream.per_epoch)  # across epochs: every pass is dealt anew
    assert full[:stream.per_epoch] != full[stream.per_epoch:2 * stream.per_epoch]
    for start in (1, 2, stream.per_epoch - 1, stream.per_epoch + 2):
        assert _take(stream, start, len(full) - start) == full[start:], start


def test_the_augmented_pixels_resume_too(shards):
    config = DataConfig(train=str(shards), feature_cache=False, shuffle_buffer=5, augment=True)
    stream = BatchStream(_stream(config), 2, seed=3)
    pixels = [b["pixels"] for b in (lambda it: [next(it) for _ in range(6)])(stream.batches(0))]
    again = [b["pixels"] for b in (lambda it: [next(it) for _ in range(2)])(stream.batches(4))]
    assert all(torch.equal(a, b) for a, b in zip(pixels[4:], again))


def test_a_mixture_follows_its_weights_and_resumes(tmp_path):
    a = write_shards(tmp_path / "coco", [40, 40], prefix="a", first=0)
    b = write_shards(tmp_path / "vg", [50, 50], prefix="b", first=1000)
    img = tmp_path / "img"
    img.mkdir()
    rows = []
    for i in range(30):
        (img / f"{i}.png").write_bytes(_png(i))
        rows.append({"image": f"img/{i}.png", "caption": f"laion {i}"})
    (tmp_path / "laion.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = DataConfig(feature_cache=False, shuffle_buffer=8, sources=[
        {"train": str(a), "weight": 0.1, "name": "coco"}, {"train": str(b), "weight": 0.2, "name": "vg"},
        {"train": str(tmp_path / "laion.jsonl"), "weight": 0.7, "name": "laion"}])
    stream = BatchStream(_stream(config), 4, seed=3)
    full = _take(stream, 0, 500)
    kinds = Counter("laion" if c.startswith("laion") else ("vg" if int(c.split()[1]) >= 1000 else "coco")
                    for batch in full for c in batch)
    share = {k: v / 2000 for k, v in kinds.items()}
    assert share == pytest.approx({"coco": 0.1, "vg": 0.2, "laion": 0.7}, abs=0.03), share
    assert _take(stream, 137, 20) == full[137:157]


def test_sources_are_checked_in_one_line():
    for bad, match in (([{"weight": 1}], "needs a 'train' path"), ([{"train": "a", "weight": 0}], "positive"),
                       ([{"train": "a", "wieght": 1}], "unknown key 'wieght'"), ("a.tar", "must be a list"),
                       ([{"train": "x/a"}, {"train": "y/a"}], "names repeat")):
        with pytest.raises(ConfigError, match=match):
            DataConfig(sources=bad)
    with pytest.raises(ConfigError, match="crop_scale"):
        DataConfig(crop_scale=[0.0, 1.0])


def test_too_few_shards_for_the_readers_is_one_error(tmp_path):
    config = DataConfig(train=str(write_shards(tmp_path / "one", [6])), feature_cache=False)
    with pytest.raises(DataError, match="readers"):
        BatchStream(_stream(config), 2, rank=0, world_size=2)


def test_a_bad_image_is_skipped_without_shifting_the_stream(tmp_path):
    folder = write_shards(tmp_path / "bad", [6, 6], broken={4})
    config = DataConfig(train=str(folder), feature_cache=False, shuffle_buffer=3)
    with pytest.raises(DataError, match="corrupt"):
        _take(BatchStream(_stream(config), 2), 0, 6)
    bad = BadSamples(skip=True)
    skipping = BatchStream(_stream(config, bad), 2)
    got = _take(skipping, 0, 6)
    assert len(bad) == 1 and "corrupt" in bad.items[0]
    flat = [c for b in got for c in b]
    assert "c 4" not in flat and len(flat) == 11 and min(len(b) for b in got) == 1
    assert _take(skipping, 3, 3) == got[3:]


# --- the official train transform ------------------------------------------------------------------------------
def test_crop_box_draws_like_torchvision():
    rng = random.Random(0)
    for _ in range(300):
        w, h = rng.randint(20, 400), rng.randint(20, 400)
        left, top, cw, ch = crop_box(w, h, rng)
        assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h
        if (cw, ch) != (w, h) and 3 / 4 <= w / h <= 4 / 3:
            assert 0.5 * w * h * 0.9 <= cw * ch <= w * h  # area from scale 0.5-1 (rounding aside)
            assert 3 / 4 * 0.9 <= cw / ch <= 4 / 3 * 1.1
    assert crop_box(1000, 10, random.Random(1))[2:] == (13, 10)  # a strip: the centre crop at ratio 4/3


def test_train_transform_is_seeded_and_its_flip_can_be_switched_off():
    image = Image.new("RGB", (40, 30))
    image.paste((255, 0, 0), (0, 0, 20, 30))  # red left half, black right half
    on, off = TrainTransform((8, 8)), TrainTransform((8, 8), flip=False)
    outs = [on(image, random.Random(i)) for i in range(40)]
    assert all(o.size == (8, 8) for o in outs)
    assert on(image, random.Random(5)).tobytes() == outs[5].tobytes()
    # Every crop starts inside the red half (it is at least 21 pixels wide), so a dark left edge means a flip.
    flipped = [o.getpixel((0, 4))[0] < 128 for o in outs]
    unflipped = [off(image, random.Random(i)).getpixel((0, 4))[0] < 128 for i in range(40)]
    assert 5 < sum(flipped) < 35 and sum(unflipped) < sum(flipped)


def test_evaluation_never_sees_the_train_transform(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(i, (64, 48)))
        rows.append({"image": f"img/{i}.png", "caption": f"c {i}"})
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = DataConfig(train=str(tmp_path / "t.jsonl"), feature_cache=False, augment=True)
    val, _ = build_dataset(load_records(config), FakeModel(), config, seed=1)
    plain = [val[i][0] for i in range(4)]
    train, _ = build_dataset(load_records(config), FakeModel(), config, seed=1)
    BatchStream(train, 2, seed=1)  # training switches the transform on for its own dataset only
    assert val.transform is None and train.transform is not None
    assert all(torch.equal(val[i][0], plain[i]) for i in range(4))


def test_shard_counts_are_remembered_until_the_shard_changes(tmp_path, shards, monkeypatch):
    import os

    import vpgtrans.data.streaming as streaming

    config = DataConfig(train=str(shards), feature_cache=False, cache_dir=str(tmp_path / "cache"))
    assert len(load_records(config)) == 39
    calls = []
    real = streaming.count_shard
    monkeypatch.setattr(streaming, "count_shard", lambda path, keep: calls.append(path) or real(path, keep))
    assert len(load_records(config)) == 39 and calls == []  # no tar header read the second time
    first = sorted(shards.glob("*.tar"))[0]
    write_shards(tmp_path / "again", [3], prefix="x")
    os.replace(sorted((tmp_path / "again").glob("*.tar"))[0], first)
    assert len(load_records(config)) == 39 - 7 + 3 and calls == [str(first.resolve())]


def test_real_recipes_encode_on_the_fly_and_the_world_keeps_its_cache():
    from vpgtrans.recipes import load_recipe

    for name in ("vpgtrans_vl_llama", "vpgtrans_opt2.7b_to_6.7b", "blip2_stage2_opt2.7b", "blip2_stage2_flant5xl",
                 "minigpt4_stage2", "minigpt4_lora", "vl_vicuna"):
        data = load_recipe(name).data
        assert (data.feature_cache, data.augment, data.flip, data.crop_scale) == (False, True, True, [0.5, 1.0]), name
    llava = load_recipe("llava_pretrain").data
    assert not llava.feature_cache and not llava.augment  # LLaVA's pre-training does not augment
    for name in ("blip2_stage2_world", "vpgtrans_world", "easyvqa_smollm2"):
        assert load_recipe(name).data.feature_cache and not load_recipe(name).data.augment, name
