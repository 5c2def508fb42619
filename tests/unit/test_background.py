"""The loop every background worker runs (background.py): a failing pass is retried later and
later, and a database outage is told once, then its end, instead of a line per pass."""

from __future__ import annotations

import logging
import threading

import pytest

from gallery_server import background
from gallery_server.background import BackgroundLoop, retry_delay
from gallery_server.errors import DatabaseUnavailable, Exhausted


def test_the_wait_doubles_with_each_failure_up_to_a_minute() -> None:
    assert [retry_delay(0.5, n) for n in range(9)] == [0.5, 1, 2, 4, 8, 16, 32, 60, 60]
    assert retry_delay(600, 3) == 600  # never sooner than the loop's own interval
    assert retry_delay(0.5, 10 ** 6) == 60


class _Outage(BackgroundLoop):
    thread_name = "test-outage"

    def __init__(self, outcomes: list[BaseException | None]) -> None:
        super().__init__(interval=0.001)
        self.outcomes = outcomes
        self.done = threading.Event()

    def run_pass(self) -> bool:
        if not self.outcomes:
            self.done.set()
            return False
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome
        return False


def test_an_outage_is_one_line_then_its_end(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    waits: list[float] = []
    monkeypatch.setattr(background, "retry_delay", lambda interval, failures: waits.append(failures) or 0.0)
    loop = _Outage([DatabaseUnavailable()] * 4 + [None, ValueError("bug"), ValueError("bug"), None])
    with caplog.at_level(logging.INFO, logger="gallery_server.background"):
        loop.start()
        assert loop.done.wait(10)
        loop.stop(timeout=10)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("INFO", "background worker started"),
        ("WARNING", "background worker waits for the database"),  # once for the 4 failed passes
        ("INFO", "background worker recovered"),
        ("ERROR", "background pass failed"),  # any other error: each, with its traceback
        ("ERROR", "background pass failed"),
        ("INFO", "background worker recovered"),
    ]
    assert [r.failed_passes for r in caplog.records if r.getMessage() == "background worker recovered"] == [4, 2]
    assert waits[:9] == [1, 2, 3, 4, 0, 1, 2, 0, 0]  # the failures in a row each wait is for


def test_a_disk_at_its_headroom_is_one_line_then_its_end(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A thumbnailer stopped at the disk's headroom wrote a traceback at every pass (up to one a
    minute, for as long as the disk stays full); storage.py tells the operator, once a minute."""
    monkeypatch.setattr(background, "retry_delay", lambda interval, failures: 0.0)
    full = Exhausted("INSUFFICIENT_STORAGE", "the disk is down to its headroom")
    loop = _Outage([full] * 3 + [None])
    with caplog.at_level(logging.INFO, logger="gallery_server.background"):
        loop.start()
        assert loop.done.wait(10)
        loop.stop(timeout=10)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "background worker started"),
        ("WARNING", "background worker waits for room on the disk: the disk is down to its headroom"),
        ("INFO", "background worker recovered"),
    ]
