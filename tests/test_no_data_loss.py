"""Issue 34: nothing a user has is ever deleted or mixed — one run per --out whatever the timing, no --out that
holds foreign files or what the command reads is replaced, every input checked before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from vpgtrans import claim
from vpgtrans.checkpoint import save_model
from vpgtrans.cli import main
from vpgtrans.errors import ConfigError
from vpgtrans.model import build_model
from vpgtrans.testing import tiny_images, tiny_spec, write_caption_set

CAPTIONS = ["a red circle on the left", "a blue square on the right", "a green triangle in the middle"]

# Each racer imports everything first, says it is ready, then waits for the barrier file: both start the command
# within a millisecond or two of each other, which no check-then-write order survives.
RACER = textwrap.dedent("""
    import os, sys, time
    import torch, transformers  # noqa: F401 - imported before the barrier, not during the race
    import vpgtrans.train.runner  # noqa: F401 - the rest each command imports alike in both racers
    from vpgtrans.cli import main
    barrier, argv = sys.argv[1], sys.argv[2:]
    {patch}
    open(barrier + f".ready-{{os.getpid()}}", "w").close()
    while not os.path.exists(barrier):
        time.sleep(0.001)
    main(argv, prog_name="vpgtrans")
""")


def _race(tmp_path: Path, argv: list[str], patch: str = "") -> tuple[tuple, tuple]:
    """Start the same command twice at the same moment; return (winner, loser) as (pid, exit code, output)."""
    barrier = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RACER.format(patch=patch), str(barrier),
                               *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    deadline = time.monotonic() + 300
    while not all(Path(f"{barrier}.ready-{p.pid}").exists() for p in procs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[0] for p in procs if p.poll() is not None]
        time.sleep(0.05)
    barrier.touch()
    results = [(p.pid, p.wait(timeout=600), p.stdout.read()) for p in procs]
    codes = sorted(code for _, code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results  # exactly one proceeds
    winner = next(r for r in results if r[1] == 0)
    loser = next(r for r in results if r[1] != 0)
    errors = [line for line in loser[2].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"run in progress (pid {winner[0]})" in errors[0], loser[2]
    assert "Traceback" not in loser[2]
    return winner, loser


def _no_claims_left(*folders: Path) -> None:
    for folder in folders:
        assert not list(folder.glob(f".*{claim.SUFFIX}")), list(folder.iterdir())


@pytest.fixture
def captions(tmp_path):
    """Four captioned images and their JSONL."""
    lines = []
    for i, img in enumerate(tiny_images(4)):
        img.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": CAPTIONS[i % 3]}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "d.jsonl"


def _stage2_recipe(tmp_path, tiny_paths, data, steps=2):
    recipe = {"name": "race", "model": tiny_spec(tiny_paths), "data": {"train": str(data)},
              "train": {"batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "max_steps": steps, "seed": 0,
                        "max_text_len": 16}}
    (tmp_path / "race.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "race.yaml"


def _finished_alone(out: Path, pid: int, steps: int) -> None:
    """The run in `out` is the winner's, finished, its log one run's rows (no second run interleaved)."""
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["pid"] == pid
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "loss" in r]
    assert train_steps == sorted(set(train_steps)) and max(train_steps) == steps, train_steps


# --- the claim itself ----------------------------------------------------------------------------------------------

def test_claim_many_threads_at_once_exactly_one_wins(tmp_path):
    out = tmp_path / "runs" / "x"
    start, won, refused = threading.Barrier(8), [], []

    def racer():
        start.wait()
        try:
            won.append(claim.claim_dir(out))
        except ConfigError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert all(f"run in progress (pid {os.getpid()})" in line for line in refused)
    won[0].release()
    # Nothing was written: no claim file and no --out are left. (runs/ itself may stay, empty: when eight claims
    # race to create it, the one that made it need not be the winner that removes what it created.)
    assert not out.exists()
    if (tmp_path / "runs").exists():
        _no_claims_left(tmp_path / "runs")
        assert not list((tmp_path / "runs").iterdir())


def test_claim_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    claim.lock_path(out).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    notes = []
    with claim.claim_dir(out, echo=notes.append):
        assert json.loads(claim.lock_path(out).read_text())["pid"] == os.getpid()
    assert notes and f"pid {dead.pid}" in notes[0] and "has ended" in notes[0]
    _no_claims_left(tmp_path)


def test_claim_refuses_inside_or_around_a_live_run(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from vpgtrans.claim import claim_dir
        c = claim_dir({str(tmp_path / 'demo' / 'source')!r})
        print("held", flush=True)
        sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"the parent of .*source, which a run in progress is writing "
                                              f"\\(pid {holder.pid}\\)"):
            claim.claim_dir(tmp_path / "demo")
        with pytest.raises(ConfigError, match=f"inside .*source, .*\\(pid {holder.pid}\\)"):
            claim.claim_dir(tmp_path / "demo" / "source" / "model")
    finally:
        holder.stdin.close()
        holder.wait()
    with claim.claim_dir(tmp_path / "demo"):  # the holder ended: free again
        pass


def test_claims_left_held_inside_a_run_end_with_it(tmp_path):
    outer = claim.claim_dir(tmp_path / "demo")
    claim.claim_dir(tmp_path / "demo" / "transfer" / "x")  # as a transfer leaves its own: held until the process ends
    assert claim.lock_path(tmp_path / "demo" / "transfer" / "x").exists()
    outer.release()
    assert not (tmp_path / "demo").exists()  # both locks gone, and the folders the claims made for them
    _no_claims_left(tmp_path)


# --- two runs started at the same moment, for every kind of run ---------------------------------------------------

@pytest.mark.slow
def test_two_train_runs_at_once(tmp_path, tiny_paths, captions):
    out = tmp_path / "run"
    winner, _ = _race(tmp_path, ["train", "--recipe", str(_stage2_recipe(tmp_path, tiny_paths, captions)),
                                 "--out", str(out), "--no-progress"])
    _finished_alone(out, winner[0], 2)
    assert (out / "model" / "manifest.json").exists()
    _no_claims_left(tmp_path)


@pytest.mark.slow
def test_two_stage1_runs_at_once(tmp_path, tiny_paths, captions):
    spec = tiny_spec(tiny_paths, tokenizer=str(tiny_paths["bert"]), vocab_size=1)
    recipe = {"name": "s1", "stage": 1, "model": {"vision": spec["vision"], "vpg": spec["vpg"]},
              "data": {"train": str(captions)}, "train": {"lr": 1e-3, "batch_size": 2, "max_steps": 2,
                                                          "warmup_steps": 0}}
    (tmp_path / "s1.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    winner, _ = _race(tmp_path, ["train", "--recipe", str(tmp_path / "s1.yaml"), "--out", str(out), "--no-progress"])
    # Stage 1 now keeps the same run record as stage 2: pid and host, so the live-run guard sees it.
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == 1 and run["host"] == os.uname().nodename
    _finished_alone(out, winner[0], 2)
    assert (out / "stage1" / "stage1.json").exists()


@pytest.fixture
def source_model(tmp_path, tiny_paths):
    torch.manual_seed(0)
    return save_model(build_model(tiny_spec(tiny_paths)), tmp_path / "src")


@pytest.mark.slow
def test_two_transfers_at_once(tmp_path, tiny_paths, source_model):
    write_caption_set(tmp_path / "data", 8, 3, CAPTIONS[:2])
    out = tmp_path / "transfer"
    # The winner holds its claim a second longer: a 2-step transfer can otherwise finish (and release) before the
    # other racer has planned its own, which then meets a finished run instead of one in progress (seen when idle).
    patch = textwrap.dedent("""
        import vpgtrans.transfer.race as race
        _transfer = race._transfer
        def _held(*a, **k):
            time.sleep(1)
            return _transfer(*a, **k)
        race._transfer = _held
    """)
    winner, _ = _race(tmp_path, [
        "transfer", "--src", str(source_model), "--dst", str(tiny_paths["llama"]), "--data",
        str(tmp_path / "data" / "train.jsonl"), "--out", str(out), "--converter", "lstsq", "--no-progress",
        "--recipe", "vpgtrans_world", "train.batch_size=2", "train.max_steps=2", "train.eval_every=0",
        "train.save_every=0", "train.max_text_len=12", "eval.metrics=[val_loss]", "data.max_val_samples=4",
        f"data.val={tmp_path / 'data' / 'train.jsonl'}"], patch)
    report = json.loads((out / "report.json").read_text())
    assert report["stages"]["finetune"]["steps"] == 2
    for stage in ("warmup", "finetune"):
        assert json.loads((out / stage / "run.json").read_text())["pid"] == winner[0]
    _no_claims_left(tmp_path, out)


@pytest.mark.slow
def test_two_demos_at_once(tmp_path):
    out = tmp_path / "demo"
    # The claim is the demo's first act; its stages are stood in for by one that leaves a file and takes a while
    # (the real ones run in test_demo.py), so that the loser would run beside the winner if it were not refused.
    patch = textwrap.dedent(f"""
        import vpgtrans.demo
        def _world(size, echo):
            open(os.path.join({str(out)!r}, f"worked-{{os.getpid()}}"), "w").close()
            time.sleep(1)
            raise SystemExit(0)
        vpgtrans.demo.ensure_world = _world
    """)
    winner, _ = _race(tmp_path, ["demo", "--out", str(out), "--world-size", "tiny", "--dst", "world-llama",
                                 "--no-progress"], patch)
    assert sorted(p.name for p in out.iterdir()) == [f"worked-{winner[0]}"]


@pytest.mark.slow
def test_two_surrogates_at_once(tmp_path, tiny_paths):
    out = tmp_path / "sur"
    winner, _ = _race(tmp_path, ["surrogate", "--llm", str(tiny_paths["opt"]), "--layers", "1", "--out", str(out)])
    assert json.loads((out / "surrogate.json").read_text())["surrogate-of"]["layers"] == 1
    _no_claims_left(tmp_path)


def test_run_in_progress_blocks_train_even_with_force(tmp_path, tiny_paths, captions):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"from vpgtrans.claim import claim_dir; c = claim_dir("
                               f"{str(out)!r}); print('held', flush=True); input()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(main, ["train", "--recipe", str(_stage2_recipe(tmp_path, tiny_paths, captions)),
                                           "--out", str(out), "--force", "--no-progress"])
        assert result.exit_code != 0 and f"run in progress (pid {holder.pid})" in result.output, result.output
        assert not out.exists()
    finally:
        holder.stdin.close()
        holder.wait()


# --- no --out that holds the user's files or what is read ----------------------------------------------------------

def _user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "keep.txt").write_text("mine")
    (path / "sub").mkdir()
    (path / "sub" / "notes.md").write_text("also mine")
    return path


def _intact(path: Path) -> None:
    assert (path / "keep.txt").read_text() == "mine" and (path / "sub" / "notes.md").read_text() == "also mine"


def _refused(result, *expected: str) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code != 0 and len(errors) == 1, result.output
    assert all(e in errors[0] for e in expected), errors[0]
    return errors[0]


def test_export_keeps_the_users_files_unless_forced(tmp_path, source_model):
    out = _user_dir(tmp_path / "mine")
    args = ["export", "--model", str(source_model), "--format", "hf-blip2", "--out", str(out)]
    _refused(CliRunner().invoke(main, args), "is not empty", "files that are not a vpgtrans export", "--force")
    _intact(out)
    forced = CliRunner().invoke(main, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert not (out / "keep.txt").exists() and (out / "vpgtrans_export.json").exists()
    # An earlier export to the same format is replaced (atomically) without --force; another format is not.
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    _refused(CliRunner().invoke(main, ["export", "--model", str(source_model), "--format", "hf-instructblip",
                                       "--out", str(out)]), "holds an export to hf-blip2", "--force")


@pytest.mark.parametrize("where", ["run", "model", "inside"])
def test_export_never_replaces_the_model_it_reads(tmp_path, tiny_paths, where):
    run = tmp_path / "run"
    torch.manual_seed(0)
    model_dir = save_model(build_model(tiny_spec(tiny_paths)), run / "model")
    (run / "log.jsonl").write_text('{"step": 1}\n')
    out = {"run": run, "model": model_dir, "inside": model_dir / "hf"}[where]
    how = {"run": "contains", "model": "is", "inside": "is inside"}[where]
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    result = CliRunner().invoke(main, ["export", "--model", str(model_dir), "--out", str(out), "--force"])
    _refused(result, f"{how} the model being read")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_import_keeps_the_users_files(tmp_path):
    src = tmp_path / "stock"
    src.mkdir()
    out = _user_dir(tmp_path / "mine")
    _refused(CliRunner().invoke(main, ["import", "--src", str(src), "--out", str(out)]),
             "files that are not a vpgtrans import", "--force")
    _intact(out)
    _refused(CliRunner().invoke(main, ["import", "--src", str(src), "--out", str(src / "x"), "--force"]),
             "is inside the checkpoint being read")


def test_train_into_a_folder_of_the_users_files(tmp_path, tiny_paths, captions):
    out = _user_dir(tmp_path / "mine")
    recipe = _stage2_recipe(tmp_path, tiny_paths, captions)
    result = CliRunner().invoke(main, ["train", "--recipe", str(recipe), "--out", str(out), "--no-progress"])
    _refused(result, "is not empty (keep.txt, sub) and holds no vpgtrans run", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "sub"]


def test_transfer_into_a_folder_of_the_users_files(tmp_path, tiny_paths, source_model):
    write_caption_set(tmp_path / "data", 8, 3, CAPTIONS[:2])
    out = _user_dir(tmp_path / "mine")
    args = ["transfer", "--src", str(source_model), "--dst", str(tiny_paths["llama"]), "--data",
            str(tmp_path / "data" / "train.jsonl"), "--out", str(out), "--recipe", "vpgtrans_world", "--no-progress"]
    for extra in ([], ["--resume"]):
        _refused(CliRunner().invoke(main, [*args, *extra]), "is not empty and holds no transfer run", "--force")
        _intact(out)


def test_surrogate_never_replaces_the_llm_it_reads(tmp_path, tiny_paths):
    import shutil

    llm = tmp_path / "llm"
    shutil.copytree(tiny_paths["opt"], llm)
    before = sorted(p.name for p in llm.iterdir())
    for out, how in ((llm, "is"), (tmp_path, "contains"), (llm / "cut", "is inside")):
        result = CliRunner().invoke(main, ["surrogate", "--llm", str(llm), "--layers", "1", "--out", str(out),
                                           "--force"])
        _refused(result, f"{how} the LLM being read")
    assert sorted(p.name for p in llm.iterdir()) == before


# --- every input checked before anything is written -----------------------------------------------------------------

def test_demo_checks_every_destination_before_training(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--world-size", "tiny", "--dst", "world-llama",
                                       "--dst", "world-nope", "--no-progress"])
    _refused(result, "'world-nope'", "not a world model")
    assert "[1/4]" not in result.output and not out.exists()
    assert not (Path(os.environ["VPGTRANS_HOME"]) / "world").exists()  # nor was the world built first


def test_demo_keeps_the_users_files(tmp_path):
    out = _user_dir(tmp_path / "mine")
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--world-size", "tiny", "--dst", "world-llama",
                                       "--no-progress"])
    _refused(result, "is not empty and holds no demo run", "--force")
    _intact(out)


# --- file outputs and the cc_sbu_align export ------------------------------------------------------------------------

def test_export_cc_sbu_keeps_the_users_files_and_the_world(tmp_path):
    world = tmp_path / "world"
    (world / "data").mkdir(parents=True)
    (world / "data" / "train.jsonl").write_text('{"image": "images/train/0.png", "caption": "x"}\n')
    out = _user_dir(tmp_path / "mine")
    base = ["world", "export-cc-sbu", "--world", str(world)]
    _refused(CliRunner().invoke(main, [*base, "--out", str(out)]), "holds no cc_sbu_align export", "--force")
    _intact(out)
    _refused(CliRunner().invoke(main, [*base, "--out", str(world), "--force"]), "contains the world data being read")
    assert (world / "data" / "train.jsonl").is_file()


def test_file_outputs_never_overwrite_what_they_did_not_write(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    data = tmp_path / "data.jsonl"
    data.write_text('{"image": "a.png", "caption": "x"}\n')
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    images = tmp_path / "images"
    images.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    cases = [
        (["eval", "--model", str(model), "--data", str(data), "--out", str(data), "--force"],
         "is the data file being read"),
        (["eval", "--model", str(model), "--data", str(data), "--out", str(mine)],
         "exists and is not a `vpgtrans eval` report"),
        (["generate", "--model", str(model), "--images", str(images), "--out", str(mine)],
         "exists and is not a `vpgtrans generate` caption file"),
        (["plot", str(run), "--out", str(run / "log.jsonl"), "--force"], "is the training log of"),
        (["plot", str(run), "--out", str(mine)], "exists and is not a PNG"),
    ]
    for argv, expected in cases:
        line = _refused(CliRunner().invoke(main, argv), expected)
        assert "--force" in line or "being read" in line
    assert mine.read_text() == '{"my": "notes"}' and data.read_text().startswith('{"image"')
    assert (run / "log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'
