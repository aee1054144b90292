"""lmms-eval's own `openai` model type, pointed at `vpgtrans serve`, predicts and scores what `vpgtrans eval` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from serve_helpers import live_server, make_model, require_serve_extra

from vpgtrans.cli import main

require_serve_extra()
pytest.importorskip("lmms_eval", reason="lmms-eval is not installed: pip install 'vpgtrans[eval]' torch==2.13.0")


@pytest.mark.slow
def test_lmms_eval_openai_model_through_serve_equals_vpgtrans_eval(tiny_paths, tmp_path):
    from vpgtrans.lmms_eval_plugin import write_task
    from vpgtrans.world.build import _write_data
    from vpgtrans.world.config import WorldConfig

    data = tmp_path / "data"
    data.mkdir()
    _write_data(data, WorldConfig.preset("tiny"), 0, lambda _: None)
    model_dir = make_model(tiny_paths, tmp_path / "captioner")  # MiniGPT-4 template: its answers are not empty
    limit = 6
    res = CliRunner().invoke(main, ["eval", "--model", str(model_dir), "--data", str(data / "test.jsonl"), "--limit",
                                    str(limit), "--max-new-tokens", "8", "--out", str(tmp_path / "ours.json")])
    assert res.exit_code == 0, res.output
    ours = json.loads((tmp_path / "ours.json").read_text())
    yaml = write_task(data / "test.jsonl", tmp_path / "task", "caption", limit=limit, max_new_tokens=8)

    with live_server(model_dir) as (url, _):
        env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
               "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "OPENAI_API_KEY": "unused"}
        run = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "openai", "--model_args",
                              f"model_version=captioner,base_url={url}/v1,timeout=600,num_concurrent=4,max_retries=1",
                              "--batch_size", "1", "--tasks", yaml.stem, "--include_path", str(yaml.parent),
                              "--output_path", str(tmp_path / "out"), "--log_samples"],
                             capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("*samples_*.jsonl") for line in f.open()]
    resps = [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
    predictions = [r[0] if isinstance(r, list) else r for r in resps]
    assert predictions == [p["prediction"] for p in ours["predictions"]]
    assert all(predictions)
    metrics = json.loads(next((tmp_path / "out").rglob("*results.json")).read_text())["results"][yaml.stem]
    assert metrics["cider,none"] == pytest.approx(ours["metrics"]["cider"], abs=1e-9)
