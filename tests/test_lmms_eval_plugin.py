"""The lmms-eval plugin, offline: the lmms-eval CLI on a local task over the world's test split scores a vpgtrans
model exactly as `vpgtrans eval` does (same predictions, same CIDEr / VQA accuracy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from vpgtrans.checkpoint import save_model
from vpgtrans.cli import main
from vpgtrans.model import build_model
from vpgtrans.testing import tiny_spec

INSTALL = "pip install 'vpgtrans[eval]' torch==2.13.0  (lmms-eval 0.7.3 with the torch pin kept)"


@pytest.fixture(scope="module")
def lmms():
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        pytest.skip(f"lmms-eval is not installed: {INSTALL}")


@pytest.fixture(scope="module")
def world_test(tmp_path_factory):
    """The world's test split (rendered by the world's own generator, tiny preset: no LM training)."""
    from vpgtrans.world.build import _write_data
    from vpgtrans.world.config import WorldConfig

    data = tmp_path_factory.mktemp("world") / "data"
    data.mkdir()
    _write_data(data, WorldConfig.preset("tiny"), 0, lambda _: None)
    return data / "test.jsonl"


@pytest.fixture(scope="module")
def model_dir(tiny_paths, tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(tiny_spec(tiny_paths, "opt")).eval()
    with torch.no_grad():
        for p in [*model.vpg.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p) * 0.3)
    return save_model(model, tmp_path_factory.mktemp("m") / "model")


def test_entry_point_registers_the_model(lmms):
    from lmms_eval.models import get_model

    from vpgtrans.lmms_eval_plugin import VpgtransLMM

    assert get_model("vpgtrans") is VpgtransLMM


@pytest.mark.slow
@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_lmms_eval_cli_scores_equal_vpgtrans_eval(lmms, world_test, model_dir, tmp_path, task):
    from vpgtrans.lmms_eval_plugin import write_task

    limit = 6
    res = CliRunner().invoke(main, ["eval", "--model", str(model_dir), "--data", str(world_test), "--task", task,
                                    "--limit", str(limit), "--batch-size", "4", "--max-new-tokens", "8",
                                    "--out", str(tmp_path / "ours.json")])
    assert res.exit_code == 0, res.output
    ours = json.loads((tmp_path / "ours.json").read_text())
    yaml = write_task(world_test, tmp_path / "task", task, limit=limit, max_new_tokens=8)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    run = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "vpgtrans", "--model_args",
                          f"pretrained={model_dir},device=cpu", "--batch_size", "4", "--tasks", yaml.stem,
                          "--include_path", str(yaml.parent), "--output_path", str(tmp_path / "out"),
                          "--log_samples"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = next((tmp_path / "out").rglob("*results.json"))
    metrics = json.loads(results.read_text())["results"][yaml.stem]
    key = "vqa_accuracy" if task == "vqa" else "cider"
    theirs = metrics[f"{key},none"]
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("*samples_*.jsonl") for line in f.open()]
    resps = [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
    predictions = [r[0] if isinstance(r, list) else r for r in resps]
    assert predictions == [p["prediction"] for p in ours["predictions"]]
    assert theirs == pytest.approx(ours["metrics"][key], abs=1e-9)


@pytest.mark.parametrize("llm", ["llama", "t5"])
def test_loglikelihood_scores_the_continuation_only(tiny_paths, tmp_path, llm):
    """Sum of log p(continuation) = -(loss over continuation + EOS) minus the EOS term; greedy text is greedy."""
    from vpgtrans.interfaces import GenerationConfig
    from vpgtrans.lmms_eval_plugin import VpgtransLMM
    from vpgtrans.testing import tiny_images

    torch.manual_seed(1)
    model = build_model(tiny_spec(tiny_paths, llm)).eval()
    with torch.no_grad():
        for p in [*model.vpg.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p) * 0.3)
    lmm = VpgtransLMM(pretrained=str(save_model(model, tmp_path / "m")))
    image = tiny_images(1, seed=7)[0]
    context = "what colour is it"
    # No min_new_tokens: suppressing EOS would make the text not what unconstrained argmax picks.
    greedy = model.generate([image], context, config=GenerationConfig(max_new_tokens=4))[0]
    ids = lmm.model.llm._ids(greedy)
    if lmm.model.llm.tokenizer.decode(ids).strip() != greedy or not ids:
        pytest.skip("greedy text does not survive a decode/encode round trip with this tokenizer")
    total, is_greedy = lmm._score(image, context, greedy)
    # The continuation is tokenized on its own, as in training: LLaMA's Metaspace then writes "▁ri" where
    # generation had produced "ri" after the context, so only T5's greedy text is greedy token for token.
    assert is_greedy or llm != "t5"
    other_total, other_greedy = lmm._score(image, context, greedy + " red")
    assert not other_greedy and other_total < total
    # Against the training loss: mean NLL over continuation + EOS, so the sum is -(n + 1) * loss minus log p(EOS),
    # and greedy decoding stopped at EOS or ran out of tokens, so log p(EOS | greedy) is at most 0.
    sample = model.template.sample(context)
    sample.target = greedy
    with torch.no_grad():
        loss = float(lmm.model(lmm._features([image]), [sample]))
    eos_logp = -(len(ids) + 1) * loss - total
    assert -30 < eos_logp <= 1e-4
