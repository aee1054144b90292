"""A new user's first hour: dry runs that check every weight, hints that work, did-you-mean suggestions."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from vpgtrans.cli import main
from vpgtrans.errors import WeightsNotFoundError
from vpgtrans.names import LLM_ALIASES, download_command, locate, resolve
from vpgtrans.testing import tiny_images


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-empty"))
    return tmp_path / "hf-empty"


def _jsonl(tmp_path, n=4):
    rows = []
    for i, im in enumerate(tiny_images(n)):
        im.save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": "a red square"})
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow  # subprocesses / a 7B memory plan by name: ~20-60 s on a busy 2-core box
def test_train_dry_run_prints_the_plan_and_names_every_missing_weight(tmp_path, empty_cache):
    data = _jsonl(tmp_path)
    result = CliRunner().invoke(main, ["train", "--recipe", "minigpt4_stage2", "--dry-run", f"data.train={data}",
                                       "data.format=jsonl", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    out = result.output
    assert "recipe  minigpt4_stage2" in out and "4 examples" in out  # the whole plan still printed
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 missing weights" in errors[0]
    assert "eva-vit-g" in errors[0] and "vicuna-7b" in errors[0]
    assert "hf download Salesforce/blip2-opt-2.7b && hf download lmsys/vicuna-7b-v1.1" in errors[0]
    assert not (tmp_path / "o").exists()


def test_download_hint_uses_the_installed_cli():
    from importlib.metadata import version

    major = int(version("huggingface_hub").split(".")[0])
    assert download_command("facebook/opt-2.7b") == ("hf download facebook/opt-2.7b" if major >= 1
                                                     else "huggingface-cli download facebook/opt-2.7b")


def test_locate_reports_without_loading(tmp_path, empty_cache):
    assert locate(str(tmp_path), LLM_ALIASES) == (str(tmp_path), None)
    target, why = locate("llama-7b", LLM_ALIASES)
    assert target == "huggyllama/llama-7b" and why.startswith("not in the Hugging Face cache")
    assert "did you mean llama-7b?" in locate("lama-7b", LLM_ALIASES)[1]


@pytest.mark.parametrize("typo, expected", [("world-lama", "world-llama"), ("world-opt-x", "world-opt-s"),
                                            ("world-vitt", "world-vit")])
def test_mistyped_world_names_get_a_suggestion(typo, expected):
    with pytest.raises(WeightsNotFoundError, match=f"did you mean {expected}\\?"):
        resolve(typo, LLM_ALIASES)


def test_mistyped_alias_gets_a_suggestion_on_the_command_line(tmp_path, empty_cache):
    result = CliRunner().invoke(main, ["transfer", "--src", str(tmp_path), "--dst", "lama-7b", "--dry-run"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and "did you mean llama-7b?" in lines[0], result.output


def test_init_from_says_what_it_skipped_and_refuses_when_nothing_that_trains_fits(tiny_paths, tmp_path):
    import torch

    from vpgtrans.checkpoint import save_model
    from vpgtrans.errors import CheckpointError
    from vpgtrans.init_report import init_from_model_dir
    from vpgtrans.model import build_model
    from vpgtrans.testing import tiny_spec

    torch.manual_seed(0)
    src = save_model(build_model(tiny_spec(tiny_paths, "opt")), tmp_path / "src")  # projector 32 → 32
    model = build_model(tiny_spec(tiny_paths, "opt-m"))  # projector 32 → 64: another LLM width
    model.set_trainable(vpg=True, projector=True)
    lines = init_from_model_dir(model, src)
    assert lines[0].startswith(f"init_from {src}: loaded") and "projector" not in lines[0]
    assert any("skipped projector.weight: shape [32, 32] in the checkpoint, [64, 32] here" in ln for ln in lines)
    assert any(ln.startswith("WARNING: the projector, which trains, was NOT") for ln in lines)
    projector_only = build_model(tiny_spec(tiny_paths, "opt-m"))
    projector_only.set_trainable(vpg=False, projector=True)
    with pytest.raises(CheckpointError, match="nothing that trains here \\(projector\\) fits"):
        init_from_model_dir(projector_only, src)


def test_running_others_counts_busy_processes():
    import multiprocessing

    from vpgtrans import threads

    before = threads.running_others()
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    spinners = [ctx.Process(target=_spin, args=(stop,)) for _ in range(3)]
    for p in spinners:
        p.start()
    try:
        import time

        time.sleep(1.0)  # let the spawned interpreters start spinning
        assert threads.running_others() >= min(3, before + 2)
    finally:
        stop.set()
        for p in spinners:
            p.join(10)


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def test_threads_are_stated_before_the_plan_but_not_before_a_one_line_error(tmp_path):
    data = _jsonl(tmp_path)
    ok = CliRunner().invoke(main, ["train", "--recipe", "blip2_stage2_world", "--dry-run", "--threads", "1",
                                   f"data.train={data}", "data.val=null", "eval.metrics=[]"])
    assert ok.output.splitlines()[0].startswith("threads 1 (--threads); CPU kernels "), ok.output
    bad = CliRunner().invoke(main, ["train", "--recipe", "blip2_stage2_world", "--threads", "1", "train.lr=-1"])
    assert bad.exit_code != 0 and len(bad.output.strip().splitlines()) == 1, bad.output


def test_eval_progress_line_has_an_eta():
    from vpgtrans.cli.eval import progress_line

    assert progress_line("eval", 64, 500, 20.0) == "eval 64/500 (12.8%), 3.2/s, ETA 2 min 16 s"
    assert progress_line("eval", 500, 500, 100.0).endswith("ETA 0 s")


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_honour_the_umask(tiny_paths, tmp_path, mask):
    import os
    import stat

    from vpgtrans.checkpoint import atomic_write_text, save_model
    from vpgtrans.model import build_model
    from vpgtrans.testing import tiny_spec

    old = os.umask(mask)
    try:
        out = save_model(build_model(tiny_spec(tiny_paths)), tmp_path / "model")
        atomic_write_text(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for f in [*out.iterdir(), tmp_path / "report.json"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_chat_reads_terminal_lines_through_readline(monkeypatch):
    import io
    import sys

    from vpgtrans.cli import chat

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Tty(""))
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt: asked.append(prompt) or "what colour?")
    assert chat.read_line() == "what colour?\n" and asked == ["> "]
    assert "readline" in sys.modules  # line editing and history for input()

    def eof(prompt):
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    assert chat.read_line() == ""
    monkeypatch.setattr(sys, "stdin", io.StringIO("piped\n"))  # not a terminal: plain lines
    assert chat.read_line() == "piped\n"


@pytest.mark.slow  # subprocesses / a 7B memory plan by name: ~20-60 s on a busy 2-core box
def test_components_listing_is_cached_and_then_imports_no_plugin(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "VPGTRANS_HOME": str(tmp_path / "home")}
    code = ("import sys\nfrom vpgtrans.cli import main\ntry:\n    main(['components'])\nexcept SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "home" / "components.json").exists() and "qformer" in first.stdout
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if "heavy: []" not in second.stdout:  # a plugin file edited meanwhile (a dev checkout) forces one rebuild
        second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert second.stdout.split("heavy:")[0] == first.stdout.split("heavy:")[0]
    assert "heavy: []" in second.stdout  # listing from the cache imports neither torch nor transformers
    saved = json.loads((tmp_path / "home" / "components.json").read_text())
    saved["fingerprint"] = "stale"
    saved["components"] = []
    (tmp_path / "home" / "components.json").write_text(json.dumps(saved))
    third = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "qformer" in third.stdout  # a changed installation is listed afresh, not from the stale cache


def test_train_names_every_missing_weight_before_starting(tmp_path, empty_cache, monkeypatch):
    data = _jsonl(tmp_path)
    result = CliRunner().invoke(main, ["train", "--recipe", "minigpt4_stage2", f"data.train={data}",
                                       "data.format=jsonl", "--out", str(tmp_path / "o")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and "2 missing weights" in lines[0], result.output
    assert not (tmp_path / "o").exists()
    # Where downloads are allowed, a model that is only not cached yet is no reason to refuse.
    from vpgtrans.names import LLM_ALIASES, missing_weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert missing_weights([("LLM", "vicuna-7b", LLM_ALIASES)]) == []
    assert missing_weights([("LLM", str(tmp_path / "gone"), LLM_ALIASES)])[0][3] == "no such file or directory"
