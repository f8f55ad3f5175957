"""A run's progress line: redrawn on a terminal; in a log, a run's first and last states only."""

from __future__ import annotations

import sys

import pytest

from load.live import progress_line
from load.report import draw_progress


def test_a_log_gets_only_the_states_to_keep(capsys: pytest.CaptureFixture[str]) -> None:
    assert not sys.stderr.isatty()  # pytest's capture is no terminal
    draw_progress("  kvaware    1/100", keep=True)
    draw_progress("  kvaware   10/100", keep=False)
    draw_progress("  kvaware  100/100", keep=True)
    assert capsys.readouterr().err == "\r  kvaware    1/100\r  kvaware  100/100"


def test_a_terminal_gets_every_redraw(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    draw_progress("  kvaware   10/100", keep=False)
    draw_progress("  kvaware  100/100", keep=True)
    assert capsys.readouterr().err == "\r  kvaware   10/100\r  kvaware  100/100"


def test_the_live_bar_in_a_log_is_its_first_and_last_state(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr("load.live.time.monotonic", lambda: clock[0])
    progress = progress_line("kvaware", started=0.0)
    for done in range(1, 501):
        clock[0] += 0.01  # 5 s in all: ten redraws on a terminal
        progress(done, 500)
    states = capsys.readouterr().err.split("\r")[1:]
    assert len(states) == 2 and "    1/500 requests" in states[0] and "500/500 requests" in states[1]
