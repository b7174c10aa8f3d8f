"""Targets: where suite binaries run. `local` is this host; `qemu` and `libvirt` (their own
issues) register here and implement cvmconf.targets.base.Target."""
from __future__ import annotations

from cvmconf.errors import UsageError
from cvmconf.targets.base import BatchOutput, BatchPlan, SuiteBinary, Target  # noqa: F401

KINDS = ("local", "qemu")


def create(kind: str, *, build_dir, **options) -> Target:
    if kind == "local":
        from cvmconf.targets.local import LocalTarget
        return LocalTarget(build_dir, **options)
    if kind == "qemu":
        from cvmconf.targets.qemu import QemuTarget
        return QemuTarget(build_dir, **options)
    raise UsageError(f"unknown target '{kind}' (known: {', '.join(KINDS)})")
