"""The per-test event stream a suite binary writes when $CVMCONF_EVENTS names a file
(hostlib/src/gtest_support.cc, EventStreamListener): one JSON object per line,

  {"event": "program_start", "pid": N, "mono_us": T}
  {"event": "start", "test": "Suite.Name", "mono_us": T}
  {"event": "end", "test": "Suite.Name", "skipped": bool, "failures": [str], "elapsed_ms": N,
   "properties": {str: str}, "mono_us": T}
  {"event": "program_end", "passed": bool, "mono_us": T}

mono_us is CLOCK_MONOTONIC in microseconds on the machine that ran the binary. Each line is
written with one write() and fsync'd, so a binary that dies leaves at most a torn last line,
which is tolerated; anything else malformed raises EventStreamError (one line)."""
from __future__ import annotations

import dataclasses
import json

from cvmconf import gtest

KINDS = ("program_start", "start", "end", "program_end")


class EventStreamError(ValueError):
    """An event stream that cannot be understood (the message is one line)."""


@dataclasses.dataclass
class StreamState:
    """What an event stream says about a batch."""
    finished: dict[str, dict] = dataclasses.field(default_factory=dict)  # test -> end event
    running: str | None = None          # started, not ended
    started_us: dict[str, int] = dataclasses.field(default_factory=dict)
    program_started: bool = False
    program_ended: bool = False
    torn_tail: bool = False             # the last line was cut short


def _check_int(v, what: str, n: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise EventStreamError(f"event line {n}: '{what}' must be a non-negative integer")
    return v


def _validate(ev, n: int) -> dict:
    if not isinstance(ev, dict):
        raise EventStreamError(f"event line {n}: not a JSON object")
    kind = ev.get("event")
    if kind not in KINDS:
        raise EventStreamError(f"event line {n}: unknown event {str(kind)[:40]!r}")
    _check_int(ev.get("mono_us"), "mono_us", n)
    if kind in ("start", "end"):
        if not isinstance(ev.get("test"), str) or not ev["test"]:
            raise EventStreamError(f"event line {n}: '{kind}' without a test name")
    if kind == "end":
        if not isinstance(ev.get("skipped"), bool):
            raise EventStreamError(f"event line {n}: 'skipped' must be true or false")
        f = ev.get("failures")
        if not isinstance(f, list) or not all(isinstance(x, str) for x in f):
            raise EventStreamError(f"event line {n}: 'failures' must be a list of strings")
        p = ev.get("properties")
        if not isinstance(p, dict) or not all(isinstance(v, str) for v in p.values()):
            raise EventStreamError(f"event line {n}: 'properties' must map names to strings")
        _check_int(ev.get("elapsed_ms"), "elapsed_ms", n)
    return ev


def parse(text: str) -> StreamState:
    """Parses a whole event stream (possibly cut short by a crash)."""
    if not isinstance(text, str):
        raise EventStreamError("event stream is not text")
    st = StreamState()
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]
    for n, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except (ValueError, RecursionError):
            raise EventStreamError(f"event line {n}: not JSON") from None
        apply(st, _validate(ev, n), n)
    if tail.strip():
        # Written without its newline: the writer died in the middle of the line.
        try:
            ev = _validate(json.loads(tail), len(lines))
        except (ValueError, RecursionError):
            st.torn_tail = True
        else:
            apply(st, ev, len(lines))
    return st


def apply(st: StreamState, ev: dict, n: int = 0) -> None:
    """Applies one validated event to the state (also used for live streams)."""
    kind = ev["event"]
    if kind == "program_start":
        if st.program_started:
            raise EventStreamError(f"event line {n}: second program_start")
        st.program_started = True
    elif kind == "program_end":
        if st.running is not None:
            raise EventStreamError(f"event line {n}: program ended while {st.running} was running")
        st.program_ended = True
    elif kind == "start":
        if st.running is not None:
            raise EventStreamError(f"event line {n}: {ev['test'][:120]} started while "
                                   f"{st.running[:120]} was running")
        if ev["test"] in st.finished:
            raise EventStreamError(f"event line {n}: {ev['test'][:120]} started twice")
        st.running = ev["test"]
        st.started_us[ev["test"]] = ev["mono_us"]
    elif kind == "end":
        if st.running != ev["test"]:
            raise EventStreamError(f"event line {n}: {ev['test'][:120]} ended but was not running")
        st.finished[ev["test"]] = ev
        st.running = None


def result_from_end(ev: dict, binary: str) -> gtest.TestResult:
    """The TestResult an end event describes (same rules as the JSON report)."""
    split = gtest.split_properties(ev["properties"])
    return gtest.TestResult(
        name=ev["test"], binary=binary,
        outcome=gtest.outcome_of(ev["failures"], ev["skipped"], ev["properties"]),
        duration=ev["elapsed_ms"] / 1000.0,
        messages=list(ev["failures"]),
        **split)


class LiveState:
    """Applies event lines one at a time as they arrive (from a file being written, or from a
    VM's agent). A malformed line stops live interpretation; the final parse() reports it."""

    def __init__(self):
        self.state = StreamState()
        self.lineno = 0
        self.error: str | None = None

    @property
    def running(self) -> str | None:
        return self.state.running

    def feed(self, line: str) -> dict | None:
        """The event of one complete line, or None (blank, malformed, or after an error)."""
        if self.error:
            return None
        self.lineno += 1
        if not line.strip():
            return None
        try:
            ev = _validate(json.loads(line), self.lineno)
            apply(self.state, ev, self.lineno)
        except (ValueError, RecursionError) as e:
            self.error = str(e) if isinstance(e, EventStreamError) else "not JSON"
            return None
        return ev


class LiveReader:
    """Reads an event stream file while the binary writes it (non-blocking, by offset)."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.partial = b""
        self.live = LiveState()

    @property
    def state(self) -> StreamState:
        return self.live.state

    @property
    def error(self) -> str | None:
        return self.live.error

    def poll(self) -> list[dict]:
        """New complete events since the last call; a malformed stream stops live reading
        (the final parse reports the error)."""
        if self.error:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        except OSError as e:
            self.live.error = str(e)
            return []
        self.offset += len(data)
        buf = self.partial + data
        *lines, self.partial = buf.split(b"\n")
        out = []
        for raw in lines:
            ev = self.live.feed(raw.decode("utf-8", "replace"))
            if self.error:
                return out
            if ev is not None:
                out.append(ev)
        return out
