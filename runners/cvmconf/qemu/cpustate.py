"""Where a wedged guest's vCPUs are: program counters read over QMP, named with the guest's own
/proc/kallsyms (read through the agent right after boot, so KASLR and modules are accounted for).

A guest that stops answering the agent without printing anything is otherwise a black box; the
symbol each vCPU sits in (sampled a few times) tells a kernel developer a livelock from a
deadlock and where it is, e.g. "vCPU 0: exc_int3+0x1f (3/3 samples)".
"""
from __future__ import annotations

import bisect
import json
import re
import socket
import time
from pathlib import Path

# `info registers -a` prints one block per vCPU starting with "CPU#<n>"; the program counter is
# RIP=<16 hex> on x86_64 and PC=<16 hex> on aarch64.
_CPU_RE = re.compile(r"^CPU#(\d+)", re.MULTILINE)
_PC_RE = {"x86_64": re.compile(r"\bRIP=([0-9a-fA-F]{8,16})"),
          "arm64": re.compile(r"\bPC=([0-9a-fA-F]{8,16})")}
# On x86_64 and arm64 alike the kernel lives in the upper half of the address space; a program
# counter below it is a vCPU running a user process when the guest was sampled.
_KERNEL_HALF = 1 << 63


class Symbols:
    """Text symbols of a /proc/kallsyms listing: address -> 'name' or 'name [module]'."""

    def __init__(self, kallsyms: str):
        table: dict[int, str] = {}
        for line in kallsyms.splitlines():
            parts = line.split(None, 3)
            if len(parts) < 3 or parts[1] not in ("t", "T", "w", "W"):
                continue
            try:
                addr = int(parts[0], 16)
            except ValueError:
                continue
            if addr == 0:   # kptr_restrict hides addresses: nothing to resolve with
                continue
            name = parts[2] + (f" {parts[3].strip()}" if len(parts) > 3 else "")
            table.setdefault(addr, name)
        self._addrs = sorted(table)
        self._names = [table[a] for a in self._addrs]

    def __len__(self) -> int:
        return len(self._addrs)

    def name(self, pc: int) -> str:
        i = bisect.bisect_right(self._addrs, pc) - 1
        if i < 0 or pc - self._addrs[i] > 0x100000:   # below the kernel or far past a symbol
            return f"{pc:#x}"
        name = self._names[i]
        module = ""
        if " [" in name:
            name, module = name.split(" ", 1)
            module = " " + module
        return f"{name}+{pc - self._addrs[i]:#x}{module}"


def parse_pcs(text: str, arch: str) -> dict[int, int]:
    """vCPU index -> program counter, from the text of `info registers -a`."""
    pc_re = _PC_RE[arch]
    starts = [(m.start(), int(m.group(1))) for m in _CPU_RE.finditer(text)]
    if not starts:                  # a single vCPU prints no CPU# header
        m = pc_re.search(text)
        return {0: int(m.group(1), 16)} if m else {}
    out = {}
    for i, (pos, cpu) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        m = pc_re.search(text, pos, end)
        if m:
            out[cpu] = int(m.group(1), 16)
    return out


def hmp(qmp_sock: Path, command: str, timeout: float = 5.0) -> str:
    """Runs one human-monitor command over QMP and returns its text. Raises OSError/ValueError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(qmp_sock))
        f = s.makefile("rwb")

        def reply() -> dict:
            while True:
                line = f.readline()
                if not line:
                    raise ValueError("QMP connection closed")
                msg = json.loads(line)
                if "return" in msg or "error" in msg:
                    return msg
                # greeting ("QMP") and asynchronous events are skipped

        def execute(cmd: str, **args) -> dict:
            f.write((json.dumps({"execute": cmd, "arguments": args} if args else {"execute": cmd})
                     + "\n").encode())
            f.flush()
            return reply()

        execute("qmp_capabilities")
        msg = execute("human-monitor-command", **{"command-line": command})
        if "error" in msg:
            raise ValueError(msg["error"].get("desc", "QMP error"))
        return str(msg["return"])


def describe(samples: list[dict[int, int]], symbols: Symbols | None) -> str:
    """'vCPU 0: exc_int3+0x1f (3/3 samples); vCPU 1: ...' from PC samples."""
    if not samples or not any(samples):
        return ""
    parts = []
    for cpu in sorted({c for s in samples for c in s}):
        seen: dict[str, int] = {}
        for s in samples:
            if cpu in s:
                pc = s[cpu]
                if pc < _KERNEL_HALF:
                    where = f"user space {pc:#x}"
                else:
                    where = symbols.name(pc) if symbols else f"{pc:#x}"
                where = re.sub(r"\+0x[0-9a-f]+", "", where)   # one function, wherever in it
                seen[where] = seen.get(where, 0) + 1
        ranked = sorted(seen.items(), key=lambda kv: -kv[1])
        parts.append(f"vCPU {cpu}: " + ", ".join(f"{w} ({n}/{len(samples)} samples)" for w, n in ranked))
    return "; ".join(parts)


def sample(qmp_sock: Path, arch: str, symbols: Symbols | None, count: int = 3,
           interval: float = 0.5) -> str:
    """Samples every vCPU's PC `count` times; '' if QMP cannot be reached."""
    samples = []
    for i in range(count):
        try:
            samples.append(parse_pcs(hmp(qmp_sock, "info registers -a"), arch))
        except (OSError, ValueError):
            break
        if i + 1 < count:
            time.sleep(interval)
    return describe(samples, symbols)
