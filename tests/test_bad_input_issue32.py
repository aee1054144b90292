"""bad_input, issue 32: refusals that left something behind or said too little (transfer, resume, serve, overrides)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from test_bad_input import _one_line_error, _recipe, _train, data  # noqa: F401 - `data` is a fixture

from vpgtrans.checkpoint import save_model
from vpgtrans.cli import main
from vpgtrans.model import build_model
from vpgtrans.testing import tiny_spec, write_caption_set

FAST = ["train.batch_size=2", "train.max_steps=3", "train.eval_every=0", "train.save_every=0",
        "train.max_text_len=12", "eval.metrics=[val_loss]", "data.max_val_samples=4"]


def _errors(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("error:")]


def _hf_offline(monkeypatch, value: str | None) -> None:
    """Set every offline variable to `value`, or unset them all (None): a user who never heard of them."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VPGTRANS_OFFLINE"):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_paths):
    """A saved tiny OPT model and 8 captioned images."""
    root = tmp_path_factory.mktemp("issue32")
    write_caption_set(root, 8, 3, ["a red circle on the left", "a blue circle on the left"])
    torch.manual_seed(0)
    model = save_model(build_model(tiny_spec(tiny_paths, "opt")), root / "src")
    return {"root": root, "model": model, "data": str(root / "train.jsonl"), "paths": tiny_paths}


def test_refused_transfer_leaves_no_out(source, tmp_path):
    out = tmp_path / "refused"
    result = CliRunner().invoke(main, ["transfer", "--src", str(source["model"]), "--dst",
                                       str(source["paths"]["llama"]), "--data", source["data"], "--out", str(out),
                                       "--min-coverage", "0.99", "--no-progress", "--recipe", "vpgtrans_world",
                                       *FAST, f"data.val={source['data']}"])
    errors = _errors(result.output)
    assert result.exit_code != 0 and len(errors) == 1 and "below the minimum" in errors[0], result.output
    assert not out.exists(), sorted(p.name for p in out.iterdir())


# --- overrides and recipes: YAML 1.2 booleans ---------------------------------------------------------------------

@pytest.mark.parametrize("value", ["no", "fp16", "bf16"])
def test_documented_mixed_precision_values_are_accepted_as_overrides(value):
    from vpgtrans.recipes import load_recipe

    recipe = load_recipe("blip2_stage2_world", [f"train.mixed_precision={value}"])
    assert recipe.train.mixed_precision == value


def test_unquoted_no_in_a_recipe_file_is_text(tmp_path):
    from vpgtrans.recipes import find_recipe, load_recipe

    text = find_recipe("blip2_stage2_world").read_text()
    assert 'mixed_precision: "no"' in text
    path = tmp_path / "r.yaml"
    path.write_text(text.replace('mixed_precision: "no"', "mixed_precision: no"))
    assert load_recipe(str(path)).train.mixed_precision == "no"


@pytest.mark.parametrize("text, value", [("true", True), ("off", False), ("yes", True), ("False", False)])
def test_bool_fields_still_read_yes_no_on_off(text, value):
    from vpgtrans.recipes import load_recipe

    recipe = load_recipe("blip2_stage2_world", [f"train.gradient_checkpointing={text}"])
    assert recipe.train.gradient_checkpointing is value


def test_bad_mixed_precision_override_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["train", "--recipe", "blip2_stage2_world", "--out", str(tmp_path / "o"),
                                       "--dry-run", "train.mixed_precision=off"])
    errors = _errors(result.output)
    assert result.exit_code != 0 and len(errors) == 1 and "mixed_precision 'off' is unknown" in errors[0], \
        result.output


# --- --resume -----------------------------------------------------------------------------------------------------

def test_resume_from_a_directory_that_is_no_checkpoint_writes_nothing(data, tiny_paths, tmp_path):  # noqa: F811
    root, rows = data
    out = tmp_path / "run-resume-etc"
    code, text = _train(_recipe(root, tiny_paths, rows, "resume-etc"), out, "--resume", "/etc")
    _one_line_error(code, text, "/etc is not a training checkpoint")
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_resume_latest_without_a_checkpoint_is_refused_before_anything_is_written(data, tiny_paths,  # noqa: F811
                                                                                    tmp_path):
    import json
    import shutil

    root, rows = data
    out = tmp_path / "run-no-ckpt"
    recipe = _recipe(root, tiny_paths, rows, "no-ckpt")
    code, text = _train(recipe, out)
    assert code == 0, text
    shutil.rmtree(out / "checkpoints")  # e.g. deleted to save space once the model was written
    record = (out / "run.json").read_text()
    code, text = _train(recipe, out, "--resume", "latest")
    _one_line_error(code, text, "no checkpoint to resume")
    assert "resumed from" not in text and "done:" not in text, text
    assert (out / "run.json").read_text() == record and json.loads(record)["status"] == "finished"


# --- dry runs: everything missing, named at once, whatever HF_HUB_OFFLINE says --------------------------------------

@pytest.mark.parametrize("offline", ["1", None])
def test_transfer_dry_run_names_every_missing_input_with_or_without_hf_offline(tmp_path, monkeypatch, offline):
    _hf_offline(monkeypatch, offline)
    monkeypatch.chdir(tmp_path)  # the recipe's relative data path must not exist
    result = CliRunner().invoke(main, ["transfer", "--src", "opt-2.7b", "--dst", "llama-7b", "--dry-run",
                                       "--out", str(tmp_path / "o")])
    missing = [line for line in result.output.splitlines() if line.startswith("MISSING")]
    roles = ["source opt-2.7b", "destination LLM llama-7b", "source LLM opt-2.7b", "vision encoder eva-vit-g", "data"]
    assert [next((r for r in roles if line.startswith(f"MISSING {r}")), line) for line in missing] == roles, \
        result.output
    assert "memory  estimated peak" in result.output  # the whole plan is printed before the refusal
    errors = _errors(result.output)
    assert result.exit_code != 0 and len(errors) == 1 and "4 missing weights" in errors[0], result.output
    assert "hf download Salesforce/blip2-opt-2.7b" in errors[0] and not (tmp_path / "o").exists()


def test_train_dry_run_names_hub_weights_missing_without_hf_offline(tmp_path, monkeypatch):
    _hf_offline(monkeypatch, None)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--recipe", "minigpt4_stage2", "--dry-run", "--out",
                                       str(tmp_path / "o")])
    errors = _errors(result.output)
    assert result.exit_code != 0 and len(errors) == 1, result.output
    assert "annotation file not found" in errors[0] and "2 missing weights" in errors[0], result.output
    assert "hf download Salesforce/blip2-opt-2.7b && hf download lmsys/vicuna-7b-v1.1" in errors[0]


# --- exports: the demo says which of its models export to which format -------------------------------------------

def test_demo_summary_says_which_models_export_to_which_format(tmp_path):
    from vpgtrans.demo import _summary_lines

    summary = {"config": {"src": "world-opt-s"}, "transfers": {}, "timings_s": {"total": 1.0},
               "captions": {"exports": {"source (world-opt-s)": ["hf-blip2"], "VPGTrans (world-opt-m)": []}}}
    lines = _summary_lines(summary, tmp_path)
    start = next(i for i, line in enumerate(lines) if line.startswith("export formats"))
    assert lines[start + 1].split() == ["source", "(world-opt-s)", "hf-blip2"]
    assert lines[start + 2].split() == ["VPGTrans", "(world-opt-m)", "none"]


@pytest.mark.parametrize("offline", ["1", None])
def test_a_transfer_refused_for_missing_inputs_names_them_all(tmp_path, monkeypatch, offline):
    """Not a dry run: the data and every weight that is not here, in one line (was: the data alone)."""
    _hf_offline(monkeypatch, offline)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["transfer", "--src", "opt-2.7b", "--dst", "llama-7b", "--out",
                                       str(tmp_path / "o")])
    errors = _errors(result.output)
    assert result.exit_code != 0 and len(errors) == 1, result.output
    assert "coco_karpathy_train.json does not exist" in errors[0] and "source 'opt-2.7b'" in errors[0], errors[0]
    if offline:  # where nothing downloads, the LLMs and the vision encoder are missing too
        assert "4 missing weights" in errors[0]
    assert not (tmp_path / "o").exists()
