"""bad_input, issue 15: every bad file (annotations, images, manifests, weights, recipes) and usage error is one line.

Each case runs the real CLI: exit ≠ 0, exactly one `error:` line of the form `what — what to do`, no traceback,
and nothing written to --out.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_bad_input import _one_line_error, _recipe, _train, data  # noqa: F401 - `data` is a fixture

from vpgtrans.checkpoint import save_model
from vpgtrans.cli import main
from vpgtrans.model import build_model
from vpgtrans.testing import tiny_images, tiny_spec


def _rows_text(rows, extra: bytes) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode() + extra


BAD_ROWS = {
    "not_utf8": (b'{"image": "img/0.png", "caption": "caf\xe9"}\n', "not UTF-8"),
    "nested": (b'{"image": "img/0.png", "caption": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
               "nested too deeply"),
    "caption_number": (b'{"image": "img/0.png", "caption": 42}\n', "'caption' should be text, got int"),
    "caption_object": (b'{"image": "img/0.png", "caption": {"en": "a"}}\n', "'caption' should be text, got dict"),
    "caption_nan": (b'{"image": "img/0.png", "caption": NaN}\n', "NaN is not a valid JSON value"),
    "caption_huge": (b'{"image": "img/0.png", "caption": "' + b"a" * 1_000_000 + b'"}\n', "characters long"),
    "duplicate_key": (b'{"image": "img/0.png", "caption": "a", "caption": "b"}\n', "duplicate key 'caption'"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_input_annotation_row(data, tiny_paths, case):  # noqa: F811
    root, rows = data
    extra, expected = BAD_ROWS[case]
    recipe = _recipe(root, tiny_paths, rows, f"row-{case}")
    (root / f"bad-{case}.jsonl").write_bytes(_rows_text(rows, extra))
    override = f"data.train={root / f'bad-{case}.jsonl'}"
    code, out = _train(recipe, root / f"run-row-{case}", "--dry-run", override)
    _one_line_error(code, out, expected)
    assert f"line {len(rows) + 1}" in out  # names the line
    code, out = _train(recipe, root / f"run-row-{case}", "--dry-run", "--skip-bad-samples", override)
    assert code == 0 and "skipped 1 bad sample" in out, out
    assert not (root / f"run-row-{case}").exists()


def test_bad_input_recipe_duplicate_key(data, tiny_paths):  # noqa: F811
    root, rows = data
    recipe = _recipe(root, tiny_paths, rows, "dupkey")
    recipe.write_text(recipe.read_text() + "train:\n  lr: 0.5\n")
    code, out = _train(recipe, root / "run-dupkey", "--dry-run")
    _one_line_error(code, out, "duplicate key 'train'")


@pytest.mark.parametrize("override, expected", [
    ("train.lr=nan", "'lr' must be a finite number"),
    ("train.lr=inf", "'lr' must be a finite number"),
    ("train.betas=[2,3]", "betas must be two numbers in [0, 1)"),
    ("model.vpg.num_query_tokens=0", "'num_query_tokens' must be >= 1"),
    ("train.epochs=-1", "train.epochs must be positive"),
    ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
    ("train.save_every=-2", "train.save_every must be >= 0"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints must be >= 0"),
    ("train.max_text_len=0", "'max_text_len' must be >= 1"),
    ("train.batch_size=0", "batch_size"),
])
def test_bad_input_recipe_value(data, tiny_paths, override, expected):  # noqa: F811
    root, rows = data
    out_dir = root / "run-value"
    code, out = _train(_recipe(root, tiny_paths, rows, "value"), out_dir, override)
    _one_line_error(code, out, expected)
    assert not out_dir.exists()


# --- images -------------------------------------------------------------------------------------------------------

def test_bad_input_decompression_bomb_is_one_line_and_skippable(data, tiny_paths, monkeypatch):  # noqa: F811
    root, rows = data
    Image.new("L", (100, 100)).save(root / "img" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 10,000 px > 2 × the limit: a DecompressionBombError
    recipe = _recipe(root, tiny_paths, rows + [{"image": "img/bomb.png", "caption": "x"}], "bomb")
    code, out = _train(recipe, root / "run-bomb")
    _one_line_error(code, out, "too large")
    assert not (root / "run-bomb").exists()
    code, out = _train(recipe, root / "run-bomb", "--skip-bad-samples")
    assert code == 0 and "skipped 1 bad sample" in out and "too large" in out, out


def test_bad_input_pixel_cap_reduces_jpeg_before_decoding(tmp_path, monkeypatch):
    from vpgtrans.errors import DataError
    from vpgtrans.images import open_image

    big = Image.new("RGB", (400, 300), (200, 30, 30))
    big.save(tmp_path / "big.jpg")
    big.save(tmp_path / "big.png")
    assert open_image(tmp_path / "big.jpg").size == (400, 300)
    monkeypatch.setenv("VPGTRANS_MAX_IMAGE_PIXELS", "20000")
    small = open_image(tmp_path / "big.jpg")  # JPEG: decoded at 1/4 scale by the decoder itself
    assert small.size[0] * small.size[1] <= 20000 and small.size == (100, 75)
    assert abs(small.getpixel((50, 37))[0] - 200) < 8
    with pytest.raises(DataError, match="image is too large.*VPGTRANS_MAX_IMAGE_PIXELS"):
        open_image(tmp_path / "big.png")  # PNG cannot be decoded reduced: refused, not decoded whole
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # 120,000 px: where Pillow only warns
    assert open_image(tmp_path / "big.jpg").size == (100, 75)  # still decoded reduced, not refused


def test_feature_batches_hold_resized_images_only(tiny_paths, tmp_path, monkeypatch):
    """Each image is preprocessed as soon as it is decoded: the batch never holds two decoded originals."""
    from vpgtrans.data.cache import FeatureCache, prepare_features
    from vpgtrans.data.readers import ImageReader

    for i, im in enumerate(tiny_images(4, size=64)):
        im.save(tmp_path / f"{i}.png")
    torch.manual_seed(0)
    model = build_model(tiny_spec(tiny_paths))
    live, peak = [0], [0]
    decode, preprocess = ImageReader.decode, model.vision.preprocess

    def counting_decode(self, rec, raw=None):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        return decode(self, rec, raw)

    def counting_preprocess(images):
        live[0] -= len(images)
        return preprocess(images)

    monkeypatch.setattr(ImageReader, "decode", counting_decode)
    monkeypatch.setattr(model.vision, "preprocess", counting_preprocess)
    records = [{"image": str(tmp_path / f"{i}.png")} for i in range(4)]
    shas, report = prepare_features(records, model.vision, FeatureCache(tmp_path / "c", "t"), batch_size=4,
                                    progress=False)
    assert report.computed == 4 and report.vision_batches == 1 and peak[0] == 1


# --- model directories --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tiny_paths, tmp_path_factory):
    torch.manual_seed(0)
    return save_model(build_model(tiny_spec(tiny_paths)), tmp_path_factory.mktemp("files") / "model")


def _generate(model, tmp_path, *extra):
    image = tmp_path / "a.png"
    tiny_images(1)[0].save(image)
    result = CliRunner().invoke(main, ["generate", "--model", str(model), "--image", str(image),
                                       "--max-new-tokens", "2", *extra])
    return result.exit_code, result.output


def _broken_copy(model_dir, tmp_path, edit):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    edit(broken)
    return broken


def _manifest_edit(change):
    def edit(d):
        m = json.loads((d / "manifest.json").read_text())
        (d / "manifest.json").write_text(json.dumps(change(m)))
    return edit


MANIFESTS = {
    "a_list": (lambda d: (d / "manifest.json").write_text("[1, 2]"), "not a vpgtrans model manifest"),
    "no_spec": (_manifest_edit(lambda m: {k: v for k, v in m.items() if k != "spec"}), "field 'spec' is missing"),
    "spec_wrong_type": (_manifest_edit(lambda m: {**m, "spec": "qformer"}), "field 'spec' should be dict"),
    "vpg_not_object": (_manifest_edit(lambda m: {**m, "spec": {**m["spec"], "vpg": 3}}), "field 'spec.vpg'"),
    "vpg_no_name": (_manifest_edit(lambda m: {**m, "spec": {**m["spec"], "vpg": {"hidden_size": 8}}}),
                    "field 'spec.vpg.name'"),
    "projector_negative": (_manifest_edit(lambda m: {**m, "projector": {"in_features": -1, "out_features": 4}}),
                           "field 'projector.in_features'"),
    "future_version": (_manifest_edit(lambda m: {**m, "format_version": 99}), "format_version 99"),
    "not_utf8": (lambda d: (d / "manifest.json").write_bytes(b'{"format": "vpgtrans-model\xff"}'), "not UTF-8"),
    "nested": (lambda d: (d / "manifest.json").write_text('{"format": "vpgtrans-model", "spec": '
                                                          + "[" * 100_000 + "]" * 100_000 + "}"), "nested too deeply"),
    "weights_truncated": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:100]), "truncated or damaged"),
    "weights_garbage": (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), "truncated or damaged"),
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_bad_input_model_directory(model_dir, tmp_path, case):
    edit, expected = MANIFESTS[case]
    code, out = _generate(_broken_copy(model_dir, tmp_path, edit), tmp_path)
    _one_line_error(code, out, expected)


def test_bad_input_llm_weights_truncated(model_dir, tiny_paths, tmp_path):
    llm = tmp_path / "llm"
    shutil.copytree(tiny_paths["opt"], llm)
    weights = next(llm.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])
    code, out = _generate(_broken_copy(model_dir, tmp_path, _llm_edit(llm)), tmp_path)
    _one_line_error(code, out, "truncated or damaged")


class _Unpickle:
    """Loading this pickle calls open(marker, 'w'): what a malicious pytorch_model.bin would do, harmlessly."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _llm_edit(path):
    return _manifest_edit(lambda m: {**m, "spec": {**m["spec"], "llm": {**m["spec"]["llm"], "path": str(path)}}})


def test_bad_input_malicious_pytorch_model_bin(model_dir, tiny_paths, tmp_path):
    llm = tmp_path / "llm"
    shutil.copytree(tiny_paths["opt"], llm)
    for weights in llm.glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "unpickled"
    torch.save({"model.decoder.embed_tokens.weight": _Unpickle(str(marker))}, llm / "pytorch_model.bin")
    code, out = _generate(_broken_copy(model_dir, tmp_path, _llm_edit(llm)), tmp_path)
    _one_line_error(code, out, "never unpickles arbitrary objects")
    assert "weights_only=False" not in out and not marker.exists()


def test_bad_input_truncated_gguf(model_dir, tmp_path):
    pytest.importorskip("gguf", reason="pip install -e '.[real]'")
    gguf_file = tmp_path / "broken.gguf"
    gguf_file.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 20)
    code, out = _generate(_broken_copy(model_dir, tmp_path, _llm_edit(gguf_file)), tmp_path)
    _one_line_error(code, out, f"GGUF file {gguf_file} is truncated or damaged")


def _small_gguf(path):
    """A well-formed two-tensor .gguf (16,576 bytes); returns where its tensor data starts."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    for name in ("token_embd.weight", "output.weight"):
        writer.add_tensor(name, np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return min(int(t.data_offset) for t in gguf.GGUFReader(str(path)).tensors)


@pytest.mark.parametrize("cut", ["header_only", "half", "mid_metadata"])
def test_bad_input_cut_gguf_is_one_line_naming_the_file(model_dir, tmp_path, cut):
    pytest.importorskip("gguf", reason="pip install -e '.[real]'")
    gguf_file = tmp_path / "cut.gguf"
    data_start = _small_gguf(gguf_file)
    whole = gguf_file.read_bytes()
    keep = {"header_only": data_start, "half": len(whole) // 2, "mid_metadata": 60}[cut]
    gguf_file.write_bytes(whole[:keep])
    code, out = _generate(_broken_copy(model_dir, tmp_path, _llm_edit(gguf_file)), tmp_path)
    _one_line_error(code, out, f"GGUF file {gguf_file} is truncated or damaged")
    assert "dequantising" not in out, out  # refused before any work starts, with nothing else printed


def test_bad_input_missing_local_llm_says_path_does_not_exist(model_dir, tmp_path):
    gone = tmp_path / "no-such-llm"
    code, out = _generate(_broken_copy(model_dir, tmp_path, _llm_edit(gone)), tmp_path)
    _one_line_error(code, out, f"{gone} does not exist")
    assert "download" not in out and "Hugging Face cache" not in out


# --- command line -------------------------------------------------------------------------------------------------

def test_bad_input_click_usage_errors_are_one_line(model_dir, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["train", "--recipe", "blip2_stage2_world", "--out", str(a_file)], "'--out'"),
        (["generate", "--image", str(a_file)], "'--model'"),
        (["generate", "--model", str(model_dir), "--image", str(tmp_path)], "'--image'"),
        (["no-such-command"], "No such command"),
    ]
    for argv, expected in cases:
        result = CliRunner().invoke(main, argv)
        _one_line_error(result.exit_code, result.output, expected)
        assert "Usage:" not in result.output and "--help" in result.output


def test_bad_input_out_under_a_file_or_read_only(data, tiny_paths, monkeypatch):  # noqa: F811
    import os

    root, rows = data
    (root / "plain-file").write_text("x")
    recipe = _recipe(root, tiny_paths, rows, "where")
    code, out = _train(recipe, root / "plain-file" / "run")
    _one_line_error(code, out, "is a file, not a directory")
    # Read-only file system (tests run as root, so simulate what os.access and statvfs report there).
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    code, out = _train(recipe, root / "ro" / "run")
    _one_line_error(code, out, "cannot write to")
    assert not (root / "ro").exists()


def _library_errors():
    import errno
    import json as _json
    import pickle

    import yaml
    from safetensors import SafetensorError

    def raised(call):
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - collecting the real exception objects of each library
            return exc
        raise AssertionError("did not raise")

    return [
        (OSError(errno.ENOSPC, "No space left on device", "/x/model.safetensors"), "No space left on device"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/out"), "read-only file system"),
        (OSError(errno.ENOTDIR, "Not a directory", "/f/out"), "a parent of the path is a file"),
        (OSError(errno.EACCES, "Permission denied", "/root/x"), "permission denied"),
        (OSError(errno.EEXIST, "File exists", "/f"), "is not a directory"),
        (SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "/c/x"'),
         "No space left on device"),
        (SafetensorError("Error while deserializing header: invalid header length"), "truncated or damaged"),
        (Image.DecompressionBombError("Image size (1 pixels) exceeds limit"), "too large to decode safely"),
        (raised(lambda: _json.loads('{"a": ')), "malformed JSON"),
        (raised(lambda: b"\xff".decode("utf-8")), "not UTF-8"),
        (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
        (raised(lambda: yaml.safe_load("a: [")), "invalid YAML"),
        (pickle.UnpicklingError("Weights only load failed"), "never unpickles"),
    ]


def test_bad_input_library_failures_map_to_one_line():
    from vpgtrans.errors import VpgtransError, translate

    for exc, expected in _library_errors():
        known = translate(exc)
        assert isinstance(known, VpgtransError), exc
        assert expected in str(known) and " — " in str(known) and "\n" not in str(known), (exc, str(known))
    assert translate(ZeroDivisionError("a bug")) is None  # a bug stays a bug: the CLI asks for --debug
