"""Model directories: exact round trip, atomic writes, safe loading, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from vpgtrans.checkpoint import atomic_dir, load_model, save_model
from vpgtrans.cli import main
from vpgtrans.errors import CheckpointError
from vpgtrans.interfaces import TextSample
from vpgtrans.model import build_model
from vpgtrans.testing import tiny_images, tiny_spec


@pytest.mark.parametrize("llm", ["opt", "llama", "t5"])
def test_save_load_reproduces_logits_exactly(tiny_paths, tmp_path, llm):
    torch.manual_seed(0)
    model = build_model(tiny_spec(tiny_paths, llm=llm))
    with torch.no_grad():  # make the weights differ from any fresh init
        for p in model.vpg.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    feats = model.encode_images(model.vision.preprocess(tiny_images(2)))
    samples = [TextSample(target="a red circle"), TextSample(after="what?", target="blue")]
    before = model.logits(feats, samples)
    save_model(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["spec"]["llm"]["path"] == str(tiny_paths[llm])
    assert all(k.startswith(("vpg.", "projector.")) for k in manifest["weights"])
    torch.manual_seed(123)  # a different init must not matter
    again = load_model(tmp_path / "m")
    assert torch.equal(before, again.logits(feats, samples))


def test_checkpoint_for_another_model_is_refused(tiny_paths, tmp_path):
    small = build_model(tiny_spec(tiny_paths, llm="opt"))
    save_model(small, tmp_path / "m")
    other = build_model(tiny_spec(tiny_paths, llm="opt-m"))
    from vpgtrans.checkpoint import load_weights

    with pytest.raises(CheckpointError, match="made for another model"):
        load_weights(other, tmp_path / "m")


def test_failed_save_leaves_previous_model_intact(tiny_paths, tmp_path):
    model = build_model(tiny_spec(tiny_paths))
    save_model(model, tmp_path / "m")
    first = (tmp_path / "m" / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "m") as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_not_a_model_dir(tmp_path):
    with pytest.raises(CheckpointError, match="not a vpgtrans model directory"):
        load_model(tmp_path)


def test_missing_weights_alias_gives_one_line_and_nonzero_exit(tiny_paths, tmp_path):
    model = build_model(tiny_spec(tiny_paths))
    save_model(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    manifest["spec"]["llm"]["path"] = "opt-2.7b"
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    tiny_images(1)[0].save(tmp_path / "img.png")
    res = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "img.png")])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    assert "opt-2.7b" in lines[0] and "facebook/opt-2.7b" in lines[0] and "`hf download facebook/opt-2.7b`" in lines[0]
    assert "Traceback" not in res.output


def test_generate_cli_prints_text(tiny_paths, tmp_path):
    torch.manual_seed(0)
    save_model(build_model(tiny_spec(tiny_paths)), tmp_path / "m")
    tiny_images(1)[0].save(tmp_path / "img.png")
    res = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "img.png"),
                                    "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
