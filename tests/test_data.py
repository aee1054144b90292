"""Data pipeline: readers, bad rows, webdataset safety, the frozen-feature cache and example building."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path
from unittest import mock

import pytest
import torch

from vpgtrans.data import (BadSamples, DataConfig, FeatureCache, ImageReader, build_dataset, detect_format,
                           expand_braces, load_records, prepare_features, read_cc_sbu_align, read_coco, read_jsonl,
                           read_records, read_webdataset, split_caption)
from vpgtrans.errors import DataError
from vpgtrans.model import Template, build_model
from vpgtrans.testing import tiny_images, tiny_spec



@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "img"
    folder.mkdir()
    for i, im in enumerate(tiny_images(6, seed=3)):
        im.save(folder / f"{i}.png")
    return folder


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    tiny_images(1, seed=seed)[0].save(buf, format="PNG")
    return buf.getvalue()


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- readers -----------------------------------------------------------------------------------------

def test_jsonl_resolves_relative_paths_and_reads_vqa(tmp_path, images):
    path = _write_jsonl(tmp_path / "train.jsonl", [
        {"image": "img/0.png", "caption": "a red circle", "attributes": ["red"]},
        {"image": "img/1.png", "question": "what colour?", "answer": "blue"},
    ])
    recs = read_jsonl(path)
    assert recs[0]["image"] == str(images / "0.png") and recs[0]["caption"] == "a red circle"
    assert recs[0]["attributes"] == ["red"] and "line 1" in recs[0]["where"]
    assert recs[1]["question"] == "what colour?" and recs[1]["answer"] == "blue" and "caption" not in recs[1]
    assert detect_format(path) == "jsonl"


def test_jsonl_malformed_line_names_the_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"image": "a.png", "caption": "x"}, '{"image": "b.png", "capt'])
    with pytest.raises(DataError, match=r"line 2: malformed JSON"):
        read_jsonl(path)


def test_jsonl_missing_key_names_key_and_row_and_skip_counts(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"image": "a.png", "caption": "x"}, {"image": "b.png"},
                                               {"caption": "no image"}])
    with pytest.raises(DataError, match=r"line 2: missing key 'caption'"):
        read_jsonl(path, task="caption")
    bad = BadSamples(skip=True)
    recs = read_jsonl(path, task="caption", bad=bad)
    assert len(recs) == 1 and len(bad) == 2
    assert "missing key 'image'" in bad.items[1] and "skipped 2" in bad.summary()


def test_empty_and_missing_annotation_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "nope.jsonl")


def test_coco_official_and_lavis_formats(tmp_path, images):
    official = tmp_path / "captions.json"
    anns = [{"image_id": 7, "caption": "one"}, {"image_id": 7, "caption": "two"}, {"image_id": 8, "caption": "three"}]
    official.write_text(json.dumps({"images": [{"id": 7, "file_name": "0.png"}, {"id": 8, "file_name": "1.png"}],
                                    "annotations": anns}))
    recs = read_coco(official, image_root=images)
    assert [r["caption"] for r in recs] == ["one", "two", "three"]
    assert recs[0]["image"] == str(images / "0.png") == recs[1]["image"]
    lavis = tmp_path / "karpathy.json"
    lavis.write_text(json.dumps([{"image": "img/2.png", "caption": ["a", "b"], "image_id": 2}]))
    recs = read_records(lavis)  # auto-detected as coco, images relative to the file
    assert [r["caption"] for r in recs] == ["a", "b"] and recs[0]["image"] == str(images / "2.png")
    broken = tmp_path / "broken.json"
    broken.write_text('{\n "images": [\n  {"id": 1,,}\n ]\n}')
    with pytest.raises(DataError, match="line 3"):
        read_coco(broken)


def test_cc_sbu_align_folder(tmp_path):
    root = tmp_path / "cc_sbu_align"
    (root / "image").mkdir(parents=True)
    tiny_images(1)[0].save(root / "image" / "42.jpg")
    (root / "filter_cap.json").write_text(json.dumps({"annotations": [{"image_id": "42", "caption": "a long text"}]}))
    recs = read_records(root)
    assert recs == [{"image_id": "42", "caption": "a long text", "image": str(root.resolve() / "image" / "42.jpg"),
                     "where": "filter_cap.json annotations[0]"}]
    assert read_cc_sbu_align(root)[0]["caption"] == "a long text"


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shards_read_in_memory(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    meta = b'{"caption": "blue star", "url": "u"}'
    _tar(shards / "00000.tar", {"000000000.jpg": _png_bytes(1), "000000000.txt": b"a red circle\n",
                                "000000001.png": _png_bytes(2), "000000001.json": meta})
    _tar(shards / "00001.tar", {"sub/000000002.jpg": _png_bytes(3), "sub/000000002.txt": b"green square"})
    recs = read_records(str(shards / "{00000..00001}.tar"))
    assert [r["caption"] for r in recs] == ["a red circle", "blue star", "green square"]
    assert recs[1]["url"] == "u" and recs[2]["image"] == "sub/000000002.jpg"
    assert recs[0]["archive"] == str((shards / "00000.tar").resolve())
    reader = ImageReader()
    assert reader.read_bytes(recs[0]) == _png_bytes(1)
    assert reader.decode(recs[2]).size == (40, 40)
    assert len(read_webdataset(shards)) == 3  # a directory of shards
    assert not any(tmp_path.glob("**/000000000.jpg"))  # nothing was extracted to disk


def test_webdataset_member_cannot_escape(tmp_path):
    shard = _tar(tmp_path / "evil.tar", {"../evil.jpg": _png_bytes(1), "../evil.txt": b"x",
                                         "ok.jpg": _png_bytes(2), "ok.txt": b"fine"})
    with pytest.raises(DataError, match="unsafe member path"):
        read_webdataset(shard)
    bad = BadSamples(skip=True)
    recs = read_webdataset(shard, bad=bad)
    assert [r["caption"] for r in recs] == ["fine"] and len(bad) == 2
    with pytest.raises(DataError, match="unsafe"):
        ImageReader().read_bytes({"archive": str(shard), "image": "../evil.jpg"})
    assert not (tmp_path.parent / "evil.jpg").exists()


def test_expand_braces():
    assert expand_braces("d/{008..011}.tar") == ["d/008.tar", "d/009.tar", "d/010.tar", "d/011.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


# --- examples ----------------------------------------------------------------------------------------

def test_split_caption_is_a_word_boundary():
    rng = random.Random(0)
    for _ in range(20):
        prefix, target = split_caption("a small red circle on the left", rng)
        assert target and f"{prefix} {target}".strip() == "a small red circle on the left"
    assert split_caption("one", rng) == ("", "one")


class _FakeLLM:
    def __init__(self, enc_dec: bool):
        self.is_encoder_decoder = enc_dec


class _FakeModel:
    """Enough of a VisionLanguageModel for the dataset: template, llm flag, a real tiny vision encoder."""

    def __init__(self, vision, enc_dec: bool, template: Template | None = None):
        self.vision, self.llm, self.template = vision, _FakeLLM(enc_dec), template or Template()


@pytest.fixture(scope="module")
def vision(tiny_paths):
    return build_model(tiny_spec(tiny_paths)).vision


def _caption_records(tmp_path, images, n=6):
    return read_jsonl(_write_jsonl(tmp_path / "c.jsonl", [
        {"image": f"img/{i}.png", "caption": f"a small red circle number {i} on the left"} for i in range(n)]))


def test_prefix_lm_split_for_encoder_decoder_only(tmp_path, images, vision):
    recs = _caption_records(tmp_path, images)
    cfg = DataConfig(train="x", cache_dir=str(tmp_path / "cache"))
    t5_set, _ = build_dataset(recs, _FakeModel(vision, True), cfg, seed=1, progress=False)
    opt_set, _ = build_dataset(recs, _FakeModel(vision, False), cfg, seed=1, progress=False)
    feats, sample, instruction = opt_set[0]
    assert feats.shape == (vision.num_tokens, vision.hidden_size) and instruction == ""
    assert sample.after == "" and sample.target == recs[0]["caption"]
    splits = []
    for epoch in range(4):
        t5_set.set_epoch(epoch)
        s, _ = t5_set.text(0)
        assert f"{s.after} {s.target}".strip() == recs[0]["caption"] and s.target
        splits.append(s.after)
    assert len(set(splits)) > 1  # a new draw per epoch …
    t5_set.set_epoch(2)
    assert t5_set.text(0)[0].after == splits[2]  # … reproducible from (seed, epoch, index)


def test_instructions_vqa_and_template(tmp_path, images, vision):
    recs = read_jsonl(_write_jsonl(tmp_path / "q.jsonl", [
        {"image": "img/0.png", "question": "what shape?", "answer": ["circle", "circle", "ring"]},
        {"image": "img/1.png", "caption": "a blue star", "captions": ["a blue star", "one blue star"]}]))
    tpl = Template(text="###Human: <Img><ImageHere></Img> {instruction} ###Assistant: ", end="###")
    cfg = DataConfig(train="x", task="auto", instructions=["Describe it.", "What is this?"],
                     cache_dir=str(tmp_path / "cache"))
    ds, _ = build_dataset(recs, _FakeModel(vision, False, tpl), cfg, progress=False)
    vqa, instr = ds.text(0)
    assert instr == "Question: what shape? Answer:" and vqa.target == "circle###"
    assert vqa.before == "###Human: <Img>" and vqa.after == "</Img> Question: what shape? Answer: ###Assistant: "
    cap, instr = ds.text(1)
    assert instr in cfg.instructions and cap.target in ("a blue star###", "one blue star###")
    batch = ds.collate([ds[0], ds[1]])
    assert batch["features"].shape[0] == 2 and len(batch["samples"]) == 2 and len(batch["instructions"]) == 2


# --- feature cache -----------------------------------------------------------------------------------

def test_feature_cache_second_run_does_no_vision_forward(tmp_path, images, vision):
    recs = _caption_records(tmp_path, images, n=6)
    recs += [dict(recs[0], caption="same image, other caption")]
    cache = FeatureCache(tmp_path / "cache", vision.cache_id())
    with mock.patch.object(vision, "forward", wraps=vision.forward) as forward:
        shas, report = prepare_features(recs, vision, cache, batch_size=4, progress=False)
        assert report.computed == 6 and report.cached == 0 and forward.call_count == 2  # 6 images, batches of 4
        assert shas[0] == shas[-1]  # content-keyed: one entry for the duplicate image
        forward.reset_mock()
        shas2, report2 = prepare_features(recs, vision, cache, batch_size=4, progress=False)
        assert forward.call_count == 0 and report2.computed == 0 and report2.cached == 6 and shas2 == shas
    direct = vision(vision.preprocess([ImageReader().decode(recs[2])]))[0]
    assert torch.allclose(cache.load(shas[2]), direct, atol=1e-6)
    path = cache.path(shas[0])
    assert path.parent.parent.name == vision.cache_id() and path.parent.name == shas[0][:2]
    other = FeatureCache(tmp_path / "cache", "another-encoder")
    assert not other.has(shas[0])  # another encoder never sees these features


def test_bad_images_raise_or_are_skipped(tmp_path, images, vision):
    (images / "corrupt.png").write_bytes(b"\x89PNG not really")
    (images / "empty.png").write_bytes(b"")
    path = _write_jsonl(tmp_path / "b.jsonl", [
        {"image": "img/0.png", "caption": "ok"}, {"image": "img/corrupt.png", "caption": "broken"},
        {"image": "img/missing.png", "caption": "gone"}, {"image": "img/empty.png", "caption": "empty"}])
    cfg = DataConfig(train=str(path), cache_dir=str(tmp_path / "cache"))
    recs = load_records(cfg)
    with pytest.raises(DataError, match="not found"):
        build_dataset(recs, _FakeModel(vision, False), cfg, progress=False)
    bad = BadSamples(skip=True)
    ds, report = build_dataset(recs, _FakeModel(vision, False), cfg, bad=bad, progress=False)
    assert len(ds) == 1 and report.bad == 3 and len(bad) == 3
    assert any("corrupt" in m for m in bad.items) and any("empty" in m for m in bad.items)


# --- the plan's data lines: the cache's disk and pre-pass, or images on the fly ------------------------------

def test_cache_states_its_disk_and_pre_pass_before_encoding(tmp_path, images, vision):
    recs = _caption_records(tmp_path, images, n=6)
    lines: list[str] = []
    prepare_features(recs, vision, FeatureCache(tmp_path / "cache", vision.cache_id()), progress=False,
                     echo=lines.append)
    per_image = vision.num_tokens * vision.hidden_size * 4
    assert len(lines) == 1 and f"6 images × {vision.num_tokens} tokens × {vision.hidden_size} × float32" in lines[0]
    assert f"{6 * per_image / 1e3:.1f} kB" in lines[0] and "pre-pass" in lines[0] and "FLOP" in lines[0]
    lines.clear()
    prepare_features(recs, vision, FeatureCache(tmp_path / "cache", vision.cache_id()), progress=False,
                     echo=lines.append)
    assert lines == []  # everything cached: nothing to announce


def test_a_cache_that_does_not_fit_the_disk_is_refused_before_writing(tmp_path, images, vision, monkeypatch):
    import vpgtrans.resources as resources

    monkeypatch.setattr(resources, "free_disk", lambda path: 1000)
    recs = _caption_records(tmp_path, images, n=6)
    cache = FeatureCache(tmp_path / "cache", vision.cache_id())
    with pytest.raises(DataError) as err:
        prepare_features(recs, vision, cache, progress=False)
    text = str(err.value)
    assert "\n" not in text and "needs" in text and "1.0 kB free" in text
    assert "stream instead: data.feature_cache=false" in text
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_the_plan_says_which_data_path_a_run_takes(tmp_path, images, tiny_paths):
    from types import SimpleNamespace

    from vpgtrans.memory import data_plan_lines
    from vpgtrans.model import ModelSpec

    path = _write_jsonl(tmp_path / "c.jsonl", [{"image": f"img/{i % 3}.png", "caption": f"c {i}"} for i in range(6)])
    spec = ModelSpec(**tiny_spec(tiny_paths))

    def plan(**data):
        return data_plan_lines(SimpleNamespace(model=spec, data=DataConfig(train=str(path), **data)), 6)

    cached = plan(cache_dir=str(tmp_path / "cache"), augment=True)
    assert cached[0].startswith("data    feature cache on: 3 images × ") and "pre-pass" in cached[1]
    assert "data.augment is off while features are cached" in cached[2]
    fly = plan(feature_cache=False, augment=True, flip=False)
    assert len(fly) == 1 and "encoded on the fly" in fly[0] and "random resized crop 0.5-1, bicubic, no flip" in fly[0]
    from test_stream import write_shards

    shards = write_shards(tmp_path / "shards", [3, 3])
    streamed = data_plan_lines(SimpleNamespace(model=spec, data=DataConfig(train=str(shards), feature_cache=False)))
    assert streamed[0].startswith("data    streamed from webdataset shards") and streamed[1].strip() == \
        "sources: shards 6 (2 shards)"
