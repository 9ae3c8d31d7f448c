"""Progress of the analysis loops: lines with an ETA when stderr is not a terminal, a bar when it
is, nothing with progress=False. A fake clock and fake streams: no wall-clock assertions."""

from __future__ import annotations

import io

import torch
from tqdm import tqdm

from samkit.analysis import lanczos, power_iteration_lambda_max, slq_density
from samkit.analysis import progress as progress_module
from samkit.analysis.progress import ProgressLines, format_seconds, progress_bar


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_come_every_interval_with_the_count_and_an_eta():
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressLines(total=20, desc="lanczos", unit="HVP", file=out, clock=clock)
    bar.update(1)  # no time has passed: nothing yet
    assert out.getvalue() == ""
    clock.now += 12.0
    bar.update(1)  # 2 done in 12 s: 6 s each, 18 left
    assert out.getvalue() == "lanczos: 2/20 HVP (10%), 12 s elapsed, ETA 1 min 48 s\n"
    clock.now += 5.0
    bar.update(1)  # within the interval
    clock.now += 6.0
    bar.update(1)  # 11 s after the last line but only 10% more: still printed (>= 5%)
    clock.now += 100.0
    bar.update(16)
    bar.close()
    bar.close()  # once
    lines = out.getvalue().splitlines()
    assert lines[1] == "lanczos: 4/20 HVP (20%), 23 s elapsed, ETA 1 min 32 s"
    assert lines[2] == "lanczos: 20/20 HVP (100%), 2 min 03 s elapsed, ETA 0 s"
    assert lines[3] == "lanczos: 20/20 HVP, done in 2 min 03 s"
    assert len(lines) == 4


def test_small_steps_wait_for_five_percent_or_a_minute():
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressLines(total=1000, desc="loss surface", unit="points", file=out, clock=clock)
    for _ in range(10):
        clock.now += 5.0
        bar.update(1)  # 1 point every 5 s: 0.1% per step
    assert out.getvalue() == ""  # 50 s, 1% done
    clock.now += 15.0
    bar.update(1)  # a minute after the start
    assert out.getvalue().splitlines() == [
        "loss surface: 11/1000 points (1%), 1 min 05 s elapsed, ETA 1 h 37 min"
    ]


def test_a_short_loop_writes_nothing_and_an_unknown_total_has_no_eta():
    out, clock = io.StringIO(), FakeClock()
    with ProgressLines(range(3), desc="x", file=out, clock=clock) as bar:
        assert list(bar) == [0, 1, 2]
    assert out.getvalue() == ""
    bar = ProgressLines(desc="probes", file=out, clock=clock)
    clock.now += 70.0
    bar.update(3)
    bar.close()
    assert out.getvalue().splitlines() == [
        "probes: 3 it, 1 min 10 s elapsed",
        "probes: 3 it, done in 1 min 10 s",
    ]


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.4, 60, 3599, 3600, 7380)] == [
        "0 s",
        "59 s",
        "1 min 00 s",
        "59 min 59 s",
        "1 h 00 min",
        "2 h 03 min",
    ]


def test_progress_bar_picks_lines_a_bar_or_nothing(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    for progress in (None, True):
        bar = progress_bar(None, progress, total=3, desc="d")
        assert isinstance(bar, ProgressLines) and bar.enabled and bar.file is log
    silent = progress_bar(range(2), False, desc="d")
    assert list(silent) == [0, 1] and not silent.enabled
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    bar = progress_bar(range(2), None, desc="d")
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    assert not isinstance(progress_bar(None, False, total=2), tqdm)


def _every_update(monkeypatch) -> io.StringIO:
    """A non-terminal stderr, and a line at every update."""
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    monkeypatch.setattr(progress_module, "LINE_INTERVAL", 0.0)
    monkeypatch.setattr(progress_module, "LINE_STEP", 0.0)
    return log


def test_the_hessian_loops_write_lines_to_a_log(monkeypatch):
    log = _every_update(monkeypatch)
    a = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    lanczos(lambda v: a @ v, 10, 2, num_steps=4, tol=None)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("lanczos: 1/4 HVP (25%), ") and "ETA " in lines[0]  # tol=None
    assert lines[-1].startswith("lanczos: 4/4 HVP, done in ")
    assert len(lines) == 5

    log.truncate(0), log.seek(0)
    lanczos(lambda v: a @ v, 10, 2, num_steps=4)  # may stop at convergence
    assert "ETA at most" in log.getvalue().splitlines()[0]

    log.truncate(0), log.seek(0)
    power_iteration_lambda_max(lambda v: a @ v, 10, max_iters=3, tol=0.0)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("power iteration: 1/3 HVP (33%)") and "ETA at most" in lines[0]
    assert lines[-1].startswith("power iteration: 3/3 HVP, done in ")

    log.truncate(0), log.seek(0)
    slq_density(lambda v: a @ v, 10, num_probes=2, num_steps=3)
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("SLQ: 1/6 HVP (17%)")  # one unit per HVP over all probes
    assert lines[-1].startswith("SLQ: 6/6 HVP, done in ")


def test_no_progress_means_no_lines(monkeypatch):
    log = _every_update(monkeypatch)
    a = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    lanczos(lambda v: a @ v, 10, 2, num_steps=4, tol=None, progress=False)
    slq_density(lambda v: a @ v, 10, num_probes=2, num_steps=3, progress=False)
    assert log.getvalue() == ""
