"""Progress display: one line per finished test. On a terminal, outcomes are coloured and a status
line below them shows the test running now and for how long; elsewhere (a pipe, a CI log) plain
lines only."""
from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import TextIO

from cvmconf import gtest
from cvmconf.gtest import TestResult
from cvmconf.text import printable

COLOURS = {"PASS": "32", "FAIL": "31;1", "ERROR": "35;1", "TIMEOUT": "33;1", "SKIP": "36"}


def detail(r: TestResult) -> str:
    if r.outcome == gtest.SKIP:
        return printable(r.skip_reason)
    if r.outcome != gtest.PASS and r.messages:
        lines = [l for l in r.messages[0].splitlines() if l.strip()]
        # GoogleTest failures start with "file:line"; the message proper follows.
        if len(lines) > 1 and ":" in lines[0] and " " not in lines[0]:
            lines = lines[1:]
        if len(lines) > 1 and lines[0].strip() == "Failed":   # ADD_FAILURE() / FAIL()
            lines = lines[1:]
        return printable(lines[0]) if lines else ""
    return ""


class Progress:
    def __init__(self, stream: TextIO | None = None, live: bool | None = None, total: int = 0):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.total = total
        self.done = 0
        self.counts: dict[str, int] = {}
        self.running: dict[str, tuple[str, float]] = {}   # binary -> (test, since)
        self._lock = threading.Lock()
        self._status_shown = False
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.live:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    # -- executor callbacks ---------------------------------------------------------------------

    def batch_started(self, plan) -> None:
        pass

    def test_started(self, binary: str, test: str) -> None:
        with self._lock:
            self.running[binary] = (test, time.monotonic())
            self._status()

    def test_done(self, r: TestResult, retry: int = 0) -> None:
        with self._lock:
            cur = self.running.get(r.binary)
            if cur and cur[0] == r.name:
                del self.running[r.binary]
            if not retry:
                self.done += 1
                self.counts[r.outcome] = self.counts.get(r.outcome, 0) + 1
            self._line(r, retry)
            self._status()

    def note(self, text: str) -> None:
        with self._lock:
            self._clear()
            print(text, file=self.stream, flush=True)
            self._status()

    def close(self) -> None:
        self._stop.set()
        if self._ticker:
            self._ticker.join(timeout=2)
        with self._lock:
            self._clear()

    # -- rendering ------------------------------------------------------------------------------

    def _width(self) -> int:
        return max(40, shutil.get_terminal_size((120, 24)).columns)

    def _line(self, r: TestResult, retry: int) -> None:
        self._clear()
        prefix = f"retry {retry}: " if retry else ""
        count = f"[{self.done}/{self.total}]" if self.total and not retry else ""
        outcome = r.outcome
        if self.live:
            outcome = f"\x1b[{COLOURS.get(r.outcome, '0')}m{r.outcome:<7}\x1b[0m"
        else:
            outcome = f"{r.outcome:<7}"
        text = f"{outcome} {r.duration:8.3f}s {count:>9} {gtest.family_of(r.binary)} {prefix}{r.name}"
        d = detail(r)
        if d:
            text += f"  -- {d}"
        if self.live:
            text = text[: self._width() + 12]   # colour codes take no columns
        print(text, file=self.stream, flush=True)

    def _status(self) -> None:
        if not self.live or not self.running:
            return
        now = time.monotonic()
        parts = [f"{gtest.family_of(b)} {t} ({now - since:.0f}s)"
                 for b, (t, since) in sorted(self.running.items())]
        text = f"  running: {'; '.join(parts)}"[: self._width() - 1]
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._status_shown = True

    def _clear(self) -> None:
        if self.live and self._status_shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._status_shown = False

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                if self.running:
                    self._status()
