"""Threads and CPU numerics (vpgtrans.threads) and log-friendly progress (vpgtrans.progress)."""

from __future__ import annotations

import io
import sys

import pytest

from vpgtrans import threads
from vpgtrans.progress import LineBar, progress_bar


def test_default_is_one_thread_whatever_the_load_and_omp_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0), raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    n, why = threads.choose_threads()
    # OMP_NUM_THREADS set by a cluster or a shell profile must not change the printed figures.
    assert n == 1 and "OMP_NUM_THREADS=4 is not used" in why
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.choose_threads() == (1, ("the default: the same figures on every machine and under any load; "
                                            "--threads N for more"))
    n, why = threads.choose_threads(3)
    assert n == 3 and why == "--threads; figures differ in the last digits from the one-thread default"
    assert threads.choose_threads(1) == (1, "--threads")


def test_apply_threads_sets_torch_and_names_the_kernels() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        line = threads.apply_threads(2)
        assert torch.get_num_threads() == 2
        assert line.startswith("threads 2 (--threads") and f"CPU kernels {threads.cpu_kernels()}" in line
    finally:
        torch.set_num_threads(before)


def _clean_env(monkeypatch: pytest.MonkeyPatch, torch_loaded: bool = False) -> None:
    for key in (*threads.NUMERIC_ENV, *threads.WAIT_ENV):
        monkeypatch.delenv(key, raising=False)
    if not torch_loaded:
        monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in a fresh `vpgtrans` process


def test_pin_cpu_numerics_sets_defaults_only(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_env(monkeypatch)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")  # the user's choice wins
    monkeypatch.setattr(threads, "has_avx2", lambda: True)
    assert threads.pin_cpu_numerics()
    assert threads.os.environ["ATEN_CPU_CAPABILITY"] == "avx2" and threads.os.environ["MKL_CBWR"] == "COMPATIBLE"
    assert threads.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_pin_cpu_numerics_leaves_cpus_without_avx2_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch obeys ATEN_CPU_CAPABILITY=avx2 without checking the CPU: on one without AVX2 it would crash.
    _clean_env(monkeypatch)
    monkeypatch.setattr(threads, "has_avx2", lambda: False)
    assert threads.pin_cpu_numerics()
    assert not any(key in threads.os.environ for key in threads.NUMERIC_ENV)
    assert threads.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_pin_cpu_numerics_changes_nothing_once_torch_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch  # noqa: F401 - loaded, as in a program that imports vpgtrans after torch

    # Worker processes would inherit kernels this process does not use: their results would differ from its own.
    _clean_env(monkeypatch, torch_loaded=True)
    monkeypatch.setattr(threads, "has_avx2", lambda: True)
    assert not threads.pin_cpu_numerics()
    assert not any(key in threads.os.environ for key in (*threads.NUMERIC_ENV, *threads.WAIT_ENV))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_line_bar_prints_one_line_per_tenth_and_per_interval() -> None:
    out, clock = io.StringIO(), _Clock()
    bar = LineBar(200, "train", "step", stream=out, clock=clock)
    for _ in range(200):
        clock.now += 0.01
        bar.set_postfix(loss="0.5000", refresh=False)
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 10
    assert lines[0].startswith("train: 20/200 step (10%), 100 step/s, 0s elapsed, ETA 2s, loss 0.5000")
    assert lines[-1].startswith("train: 200/200 step (100%)") and "ETA" not in lines[-1]
    # Slow progress: a line every 30 s even within one tenth; close() adds the count reached.
    out, clock = io.StringIO(), _Clock()
    bar = LineBar(1000, "captioning", "img", stream=out, clock=clock)
    for _ in range(3):
        clock.now += 40
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0] == "captioning: 1/1000 img (0%), 40 s/img, 40s elapsed, ETA 11h06m"
    assert lines[-1].startswith("captioning: 3/1000 img (0%)")


def test_line_bar_resumes_counting_from_initial_and_closes_quietly() -> None:
    out, clock = io.StringIO(), _Clock()
    bar = LineBar(100, "train", "step", initial=50, stream=out, clock=clock)
    clock.now = 5.0
    bar.update(10)
    bar.close()
    bar.close()
    # The rate counts the steps of this session only (a resumed run), and close() repeats no line.
    assert out.getvalue().splitlines() == ["train: 60/100 step (60%), 2 step/s, 5s elapsed, ETA 20s"]
    quiet = io.StringIO()
    LineBar(10, "x", stream=quiet).close()
    assert quiet.getvalue() == ""


def test_progress_bar_is_lines_off_a_terminal_and_tqdm_on_one() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress_bar(10, "train", "step", stream=io.StringIO()), LineBar)
    on_terminal = progress_bar(10, "train", "step", stream=Tty())
    assert not isinstance(on_terminal, LineBar) and hasattr(on_terminal, "set_postfix")
    on_terminal.close()
    off = progress_bar(10, "train", "step", disable=True, stream=io.StringIO())
    off.update(5)
    off.close()
