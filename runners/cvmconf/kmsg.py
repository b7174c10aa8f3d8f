"""The runner's own kernel-log watcher: /dev/kmsg read non-blocking from its end, around each
batch, so a test that crashed or hung (and so could not record its own kernel_log property) still
gets the kernel-log lines logged while it ran."""
from __future__ import annotations

import dataclasses
import errno
import os

DEFAULT_PATH = "/dev/kmsg"


@dataclasses.dataclass
class KernelLine:
    usec: int      # printk timestamp (microseconds since boot)
    text: str

    def render(self) -> str:
        return f"[{self.usec // 1000000:5d}.{self.usec % 1000000:06d}] {self.text}"


def parse_record(raw: bytes) -> KernelLine | None:
    """One /dev/kmsg record: "prio,seq,usec,flags[,...];text\\n[ KEY=value\\n...]"."""
    head, sep, rest = raw.partition(b";")
    if not sep:
        return None
    fields = head.split(b",")
    if len(fields) < 3:
        return None
    try:
        usec = int(fields[2])
    except ValueError:
        return None
    text = rest.split(b"\n", 1)[0].decode("utf-8", "replace")
    return KernelLine(usec, text)


class KmsgReader:
    """Opens the kernel log at its end. `error` says why it is unavailable (then drain() returns
    nothing); `lost` counts records overwritten before they could be read."""

    def __init__(self, path: str | None = None):
        self.path = path or os.environ.get("CVMCONF_KMSG_PATH") or DEFAULT_PATH
        self.fd: int | None = None
        self.error: str | None = None
        self.lost = 0
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as e:
            self.error = f"{self.path}: {e.strerror} ({errno.errorcode.get(e.errno, e.errno)})"
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    @property
    def available(self) -> bool:
        return self.fd is not None

    def drain(self) -> list[KernelLine]:
        out: list[KernelLine] = []
        if self.fd is None:
            return out
        while True:
            try:
                raw = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:   # records overwritten before we read them
                    self.lost += 1
                    continue
                if e.errno == errno.EINTR:
                    continue
                self.error = f"{self.path}: read: {e.strerror}"
                break
            if not raw:
                break
            line = parse_record(raw)
            if line is not None:
                out.append(line)
        return out

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def probe_readable(path: str | None = None) -> tuple[bool, str]:
    """Whether the kernel log can be watched here, and why not (for the fingerprint)."""
    r = KmsgReader(path)
    ok = r.available
    why = r.error or ""
    r.close()
    return ok, why
