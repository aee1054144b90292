"""Issue 8 catalogue: every bad input gives one line (what is wrong — what to do), exit ≠ 0, no traceback."""

from __future__ import annotations

import errno
import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from vpgtrans.cli import main
from vpgtrans.errors import CheckpointError, ConfigError, DataError, TrainingError
from vpgtrans.testing import tiny_images, tiny_spec

CAPTIONS = ["a red square on the right", "a blue circle", "a green star above a red circle"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_paths):
    """Six good images, their rows, and a writer for recipes pointing at any JSONL."""
    root = tmp_path_factory.mktemp("bad")
    (root / "img").mkdir()
    rows = []
    for i, im in enumerate(tiny_images(6, seed=3)):
        im.save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": CAPTIONS[i % 3]})
    return root, rows


def _recipe(root, tiny_paths, rows_or_text, name="r", **train):
    """Write an annotation file and a recipe for it; return the recipe path."""
    ann = root / f"{name}.jsonl"
    if isinstance(rows_or_text, str):
        ann.write_text(rows_or_text)
    else:
        ann.write_text("".join(json.dumps(r) + "\n" for r in rows_or_text))
    recipe = {"name": name, "model": tiny_spec(tiny_paths),
              "data": {"train": str(ann), "cache_dir": str(root / f"cache-{name}")},
              "train": {"batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "max_steps": 2, "seed": 0,
                        "max_text_len": 16, **train}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _train(recipe, out, *args, debug=False):
    argv = (["--debug"] if debug else []) + ["train", "--recipe", str(recipe), "--out", str(out), "--no-progress",
                                              *args]
    result = CliRunner().invoke(main, argv)
    return result.exit_code, result.output


def _one_line_error(code, out, expected):
    """The failure contract: exit ≠ 0, exactly one `error:` line, no traceback, and it names the problem."""
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code != 0, out
    assert len(errors) == 1 and expected in errors[0], out
    assert " — " in errors[0], out  # what is wrong — what to do
    assert "Traceback" not in out, out


# --- images -------------------------------------------------------------------------------------------------------

def test_bad_input_missing_image(data, tiny_paths):
    root, rows = data
    recipe = _recipe(root, tiny_paths, rows[:3] + [{"image": "img/nope.png", "caption": "x"}], "missing")
    code, out = _train(recipe, root / "run-missing")
    _one_line_error(code, out, "image not found")
    assert not (root / "run-missing" / "model").exists()


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "zero_byte"])
def test_bad_input_broken_image(data, tiny_paths, kind):
    root, rows = data
    bad = root / "img" / f"{kind}.png"
    if kind == "corrupt":
        bad.write_bytes(b"this is not a png at all" * 10)
    elif kind == "truncated":
        good = (root / "img" / "0.png").read_bytes()
        bad.write_bytes(good[: len(good) // 2])
    else:
        bad.write_bytes(b"")
    recipe = _recipe(root, tiny_paths, rows[:3] + [{"image": f"img/{kind}.png", "caption": "x"}], kind)
    code, out = _train(recipe, root / f"run-{kind}")
    _one_line_error(code, out, "empty (0 bytes)" if kind == "zero_byte" else "corrupt")
    assert "--skip-bad-samples" in out or kind == "zero_byte"
    assert not (root / f"run-{kind}" / "model").exists()


def test_bad_input_unusual_image_modes_load_as_rgb(tmp_path, tiny_paths):
    import numpy as np

    from vpgtrans.images import open_image, to_rgb
    from vpgtrans.model import build_model

    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)))
    sixteen = Image.fromarray(rng.integers(0, 65535, (24, 24), dtype=np.uint16))
    images = {"cmyk.jpg": base.convert("CMYK"), "grey16.png": sixteen, "palette.png": base.convert("P"),
              "rgba.png": rgba, "grey.png": base.convert("L")}
    loaded = []
    for name, img in images.items():
        img.save(tmp_path / name)
        out = open_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (24, 24), name
        assert to_rgb(img).mode == "RGB"
        loaded.append(out)
    # 16-bit grey is stretched, not clipped to white.
    assert len(set(np.asarray(open_image(tmp_path / "grey16.png")).ravel().tolist())) > 50
    torch.manual_seed(0)
    model = build_model(tiny_spec(tiny_paths))
    feats = model.encode_images(model.vision.preprocess(loaded))
    assert feats.shape[0] == len(images) and torch.isfinite(feats).all()


# --- annotation files ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, text, expected", [
    ("empty", "", "annotation file is empty"),
    ("syntax", '{"image": "img/0.png", "caption": "a"}\n{"image": "img/1.png", "caption": \n', "line 2: malformed JSON"),
    ("missing_key", '{"image": "img/0.png", "caption": "a"}\n{"image": "img/1.png"}\n', "missing key 'caption'"),
])
def test_bad_input_annotation_file(data, tiny_paths, case, text, expected):
    root, _ = data
    recipe = _recipe(root, tiny_paths, text, f"ann-{case}")
    code, out = _train(recipe, root / f"run-ann-{case}", "--dry-run")
    _one_line_error(code, out, expected)


def test_bad_input_malformed_json_document(tmp_path):
    from vpgtrans.data.readers import _load_json

    path = tmp_path / "caps.json"
    path.write_text('{"annotations": [\n  {"image_id": 1,\n   "caption": "a"\n  ,]\n}')
    with pytest.raises(DataError, match=r"line 4: malformed JSON"):
        _load_json(path)


def test_bad_input_json_lines_given_as_one_document_says_which_format(tmp_path):
    from vpgtrans.data.readers import _load_json

    path = tmp_path / "train.jsonl"
    path.write_text('{"image": "a.png", "caption": "a"}\n{"image": "b.png", "caption": "b"}\n')
    with pytest.raises(DataError, match=r"one JSON object per line .*data.format=jsonl"):
        _load_json(path)
    path.write_text('{"image": "a.png", "caption": "a"}\n{"image": "b.png", "caption": \n')  # line 2 broken: say so
    with pytest.raises(DataError, match=r"line 2: malformed JSON"):
        _load_json(path)


def test_bad_input_long_caption_is_truncated_and_trains(data, tiny_paths):
    root, rows = data
    long_rows = [dict(r, caption=" ".join(["a very long caption"] * 200)) for r in rows]
    recipe = _recipe(root, tiny_paths, long_rows, "long")
    code, out = _train(recipe, root / "run-long")
    assert code == 0, out
    assert (root / "run-long" / "model" / "model.safetensors").exists()


def test_bad_input_skip_bad_samples_counts_them(data, tiny_paths):
    root, rows = data
    text = "".join(json.dumps(r) + "\n" for r in rows) + "{broken json\n" + json.dumps(
        {"image": "img/gone.png", "caption": "x"}) + "\n"
    recipe = _recipe(root, tiny_paths, text, "skip")
    code, out = _train(recipe, root / "run-skip")
    _one_line_error(code, out, "malformed JSON")
    code, out = _train(recipe, root / "run-skip", "--skip-bad-samples")
    assert code == 0, out
    assert "skipped 1 bad sample" in out and "skipped 2 bad sample" in out, out
    assert (root / "run-skip" / "model" / "model.safetensors").exists()


# --- components and widths ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, expected", [
    ("model.vpg.name=qformr", "did you mean 'qformer'"),
    ("model.llm.name=optt", "did you mean 'opt'"),
])
def test_bad_input_unknown_component(data, tiny_paths, override, expected):
    root, rows = data
    code, out = _train(_recipe(root, tiny_paths, rows, "comp"), root / "run-comp", "--dry-run", override)
    _one_line_error(code, out, expected)


@pytest.fixture(scope="module")
def tiny_model(tiny_paths):
    from vpgtrans.model import build_model

    torch.manual_seed(0)
    return build_model(tiny_spec(tiny_paths))


def test_bad_input_vpg_width_not_projector_input(tiny_model):
    from vpgtrans.model import VisionLanguageModel

    m = tiny_model
    with pytest.raises(ConfigError, match="projector input width 7 != VPG output width"):
        VisionLanguageModel(m.vision, m.vpg, m.llm, m.spec, projector=torch.nn.Linear(7, m.llm.embed_dim))


def test_bad_input_projector_output_not_llm_width(tiny_model):
    from vpgtrans.model import VisionLanguageModel

    m = tiny_model
    with pytest.raises(ConfigError, match="projector output width 5 != LLM embedding width") as info:
        VisionLanguageModel(m.vision, m.vpg, m.llm, m.spec, projector=torch.nn.Linear(m.vpg.output_dim, 5))
    assert "vpgtrans transfer" in str(info.value) and "\n" not in str(info.value)


def test_bad_input_tokenizers_share_too_few_tokens(tiny_paths):
    from transformers import AutoTokenizer

    from vpgtrans.transfer.pairing import TokenPairingError, pair_tokens

    src = AutoTokenizer.from_pretrained(str(tiny_paths["opt"]))
    dst = AutoTokenizer.from_pretrained(str(tiny_paths["bert"]))
    with pytest.raises(TokenPairingError, match="token pairs .* below the minimum") as info:
        pair_tokens(src, dst, min_coverage=0.99)
    assert " — " in str(info.value) and "\n" not in str(info.value)


def test_bad_input_checkpoint_for_another_model(tiny_model, tiny_paths, tmp_path):
    from vpgtrans.checkpoint import load_weights, save_model
    from vpgtrans.model import build_model

    save_model(tiny_model, tmp_path / "m")
    other = build_model(tiny_spec(tiny_paths, num_query_tokens=8, num_hidden_layers=1))
    before = {k: v.clone() for k, v in other.trainable_state_dict().items()}
    with pytest.raises(CheckpointError, match="made for another model") as info:
        load_weights(other, tmp_path / "m")
    assert "manifest.json" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in other.trainable_state_dict().items())  # untouched


# --- recipes and run directories ----------------------------------------------------------------------------------

@pytest.mark.parametrize("override, expected", [
    ("bogus.key=1", "bogus"),
    ("train.bogus=1", "unknown key 'bogus'"),
    ("train.lr=fast", "'lr' should be float"),
    ("train.max_steps=many", "max_steps"),
])
def test_bad_input_recipe_key(data, tiny_paths, override, expected):
    root, rows = data
    code, out = _train(_recipe(root, tiny_paths, rows, "key"), root / "run-key", override)
    _one_line_error(code, out, expected)
    assert not (root / "run-key").exists()


def test_bad_input_out_dir_holds_another_run(data, tiny_paths):
    root, rows = data
    out = root / "run-other"
    (out / "model").mkdir(parents=True)
    run = {"format": "vpgtrans-run", "recipe_name": "someone-else", "fingerprint": "0" * 16}
    (out / "run.json").write_text(json.dumps(run))
    code, text = _train(_recipe(root, tiny_paths, rows, "other"), out)
    _one_line_error(code, text, "already holds a different run")
    assert "--force" in text and json.loads((out / "run.json").read_text()) == run


def test_bad_input_debug_shows_traceback(data, tiny_paths):
    root, rows = data
    code, out = _train(_recipe(root, tiny_paths, rows, "dbg"), root / "run-dbg", "data.train=/nope.jsonl",
                       debug=True)
    assert code != 0 and "Traceback" in out and "annotation file not found" in out


# --- failures during training -------------------------------------------------------------------------------------

def _enospc_after(monkeypatch, n_ok, only=""):
    """Make safetensors' save_file fail with ENOSPC after n_ok successful writes to paths containing `only`."""
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def flaky(tensors, filename, *args, **kwargs):
        if only not in str(filename):
            return real(tensors, filename, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", flaky)


def test_bad_input_disk_full_while_checkpointing(data, tiny_paths, monkeypatch):
    from vpgtrans.train.state import find_checkpoint

    root, rows = data
    out = root / "run-full"
    _enospc_after(monkeypatch, 3, only="checkpoints")  # the first checkpoint (model, optimizer, rng) fits, the second does not
    code, text = _train(_recipe(root, tiny_paths, rows, "full", max_steps=4, save_every=2), out)
    _one_line_error(code, text, "No space left on device")
    assert "--resume latest" in text
    latest = find_checkpoint(out, "latest")
    assert latest.name.endswith("2") and (latest / "model.safetensors").exists()
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())  # no half-written dir
    assert not (out / "model").exists()


def test_bad_input_disk_full_while_saving_final_model(data, tiny_paths, monkeypatch):
    root, rows = data
    out = root / "run-full-final"
    _enospc_after(monkeypatch, 0, only=".model.tmp-")
    code, text = _train(_recipe(root, tiny_paths, rows, "full-final"), out)
    _one_line_error(code, text, "could not write the final model")
    assert not (out / "model").exists() and not any(p.name.startswith(".model") for p in out.iterdir())
    assert (out / "checkpoints").is_dir()  # training is checkpointed: --resume latest finishes the job


def test_bad_input_disk_full_keeps_previous_model(tiny_model, tmp_path, monkeypatch):
    from vpgtrans.checkpoint import load_weights, save_model

    save_model(tiny_model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    _enospc_after(monkeypatch, 0)
    with torch.no_grad():
        tiny_model.projector.bias.add_(1.0)
    try:
        with pytest.raises(OSError):
            save_model(tiny_model, tmp_path / "m")
    finally:
        with torch.no_grad():
            tiny_model.projector.bias.sub_(1.0)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    load_weights(tiny_model, tmp_path / "m")


def test_bad_input_non_finite_loss(data, tiny_paths, monkeypatch):
    from vpgtrans_adapters.llm import CausalLMBackend

    real = CausalLMBackend.loss

    def nan_loss(self, *args, **kwargs):
        return real(self, *args, **kwargs) * float("nan")

    monkeypatch.setattr(CausalLMBackend, "loss", nan_loss)
    root, rows = data
    code, out = _train(_recipe(root, tiny_paths, rows, "nan"), root / "run-nan")
    _one_line_error(code, out, "loss is nan at step 1")
    assert not (root / "run-nan" / "model").exists()


# --- resource guard -----------------------------------------------------------------------------------------------

def test_bad_input_llm_does_not_fit_in_memory(data, tiny_paths, monkeypatch):
    import vpgtrans_adapters.llm as llm

    calls = []
    real = llm._count_params
    monkeypatch.setattr(llm, "_count_params", lambda target: calls.append(target) or real(target))
    monkeypatch.setattr(llm, "_available_memory", lambda: ("cuda", 1000))
    root, rows = data
    code, out = _train(_recipe(root, tiny_paths, rows, "mem"), root / "run-mem")
    _one_line_error(code, out, "needs ~0.0 GiB at dtype float32 but the cuda has 0.0 GiB free")
    assert "bfloat16" in out and calls
    params = real(str(tiny_paths["opt"]))
    from transformers import AutoModelForCausalLM

    assert params == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(tiny_paths["opt"])).parameters())
    # Enough memory: no complaint; half precision halves the estimate.
    monkeypatch.setattr(llm, "_available_memory", lambda: ("cpu", params * 3))
    llm.check_fits("opt", str(tiny_paths["opt"]), "bfloat16")
    with pytest.raises(TrainingError, match="dtype float32"):
        llm.check_fits("opt", str(tiny_paths["opt"]), "float32")
    assert math.isfinite(params)
