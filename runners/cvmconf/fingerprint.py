"""The environment fingerprint of a run: which kernel, which machine, what KVM offers, which
platforms were detected. Targets gather the raw facts (this host's files, or a guest's) and call
build(); the probe (build/bin/cvm-probe JSON) is stored whole, so fields added to the probe later
appear in results without runner changes."""
from __future__ import annotations

import gzip
import hashlib
import os
import platform as pyplatform
import re

# VM type names (cvm-probe "vm_types[].name") -> platform labels used in reports.
PLATFORM_OF_VM_TYPE = {
    "x86-default": "non-CoCo",
    "arm64-default": "non-CoCo",
    "x86-sw-protected": "SW_PROTECTED",
    "x86-sev": "SEV",
    "x86-sev-es": "SEV-ES",
    "x86-snp": "SNP",
    "x86-tdx": "TDX",
    "arm64-pkvm-protected": "pKVM",
}
# Host hints (cvm-probe "host_hints") that say a confidential platform is enabled on the host.
HINT_PLATFORM = {
    "kvm_amd.sev_snp": ("SNP", lambda v: v.upper() in ("Y", "1")),
    "kvm_intel.tdx": ("TDX", lambda v: v.upper() in ("Y", "1")),
    "kvm-arm.mode": ("pKVM", lambda v: v == "protected"),
}


def detect_platforms(probe: dict) -> dict:
    """Platforms usable here (a VM of that type could be created), platforms the host hints at
    but that could not be used (with the reason), and the rest (not offered)."""
    detected: list[dict] = []
    unavailable: list[dict] = []
    seen: set[str] = set()
    for vt in probe.get("vm_types", []) or []:
        if not isinstance(vt, dict):
            continue
        name = str(vt.get("name", ""))
        label = PLATFORM_OF_VM_TYPE.get(name, name)
        if vt.get("creatable"):
            if label not in seen:
                detected.append({"platform": label, "vm_type": name,
                                 "evidence": f"VM type {vt.get('type')} ({name}) created"})
                seen.add(label)
        else:
            unavailable.append({"platform": label, "vm_type": name,
                                "reason": str(vt.get("create_error", "not creatable"))})
    hints = probe.get("host_hints", {}) or {}
    notes = []
    for key, (label, enabled) in HINT_PLATFORM.items():
        val = str(hints.get(key, "") or "")
        if val and enabled(val) and label not in seen:
            notes.append(f"host has {key}={val} but no {label} VM could be created")
    if not probe.get("kvm_available", False):
        notes.append(f"KVM unavailable: {probe.get('kvm_error', 'unknown')}")
    return {"detected": detected, "unavailable": unavailable, "notes": notes,
            "labels": [d["platform"] for d in detected], "host": host_mode(probe)}


def host_mode(probe: dict) -> str:
    """What kind of KVM host this is, from the host's own hints: a pKVM host only when the
    hypervisor said protected (nVHE or hVHE) mode was initialized, not merely requested; and then
    whether creating a protected VM worked (with the probe's error when it did not)."""
    hints = probe.get("host_hints", {}) or {}
    if hints.get("arm64_pkvm_initialized"):
        pvm = next((vt for vt in probe.get("vm_types", []) or []
                    if isinstance(vt, dict) and vt.get("name") == "arm64-pkvm-protected"), None)
        if pvm is None:
            pvms = "protected VMs not probed"
        elif pvm.get("creatable"):
            pvms = "protected VMs available"
        else:
            pvms = f"protected VMs not creatable: {pvm.get('create_error', 'unknown')}"
        return f"pKVM host (kvm-arm.mode=protected, protected mode initialized; {pvms})"
    if str(hints.get("kvm-arm.mode", "")) == "protected":
        return "arm64 host with kvm-arm.mode=protected requested, but protected mode not initialized"
    modes = [label + " host" for key, (label, on) in HINT_PLATFORM.items()
             if key != "kvm-arm.mode" and on(str(hints.get(key, "") or ""))]
    if modes:
        return ", ".join(modes)
    return "non-CoCo KVM host" if probe.get("kvm_available") else "no KVM"


def cpu_model(cpuinfo: str) -> str:
    for key in ("model name", "Hardware", "CPU part", "cpu model"):
        m = re.search(rf"^{re.escape(key)}\s*:\s*(.+)$", cpuinfo, re.M)
        if m:
            return m.group(1).strip()
    return ""


def build(*, probe: dict, kernel_release: str, kernel_version: str, arch: str, cpuinfo: str,
          cpus: int | None, config_sha256: str | None, config_source: str | None,
          config_error: str | None, hugetlb_sizes_kib: list[int], kmsg_readable: bool,
          kmsg_error: str, extra: dict | None = None) -> dict:
    fp = {
        "kernel": {
            "release": kernel_release,
            "version": kernel_version,
            "config_sha256": config_sha256,
            "config_source": config_source,
            "config_error": config_error,
        },
        "arch": arch,
        "cpu_model": cpu_model(cpuinfo),
        "cpus": cpus,
        "kvm": {
            "available": bool(probe.get("kvm_available")),
            "error": probe.get("kvm_error"),
            "vm_types_creatable": probe.get("vm_types_creatable", []),
            "system_caps": probe.get("system", {}),
        },
        "guest_memfd_flags": (probe.get("system", {}) or {}).get("KVM_CAP_GUEST_MEMFD_FLAGS"),
        "pin_providers": probe.get("pin_providers", []),
        "hugetlb_sizes_kib": sorted(hugetlb_sizes_kib),
        "platforms": detect_platforms(probe),
        "kmsg": {"readable": kmsg_readable, "error": kmsg_error or None},
        "probe": probe,
    }
    if extra:
        fp.update(extra)
    return fp


# ---------------------------------------------------------------------------------------------
# Facts of this host (the local target).

def kernel_config_hash(release: str) -> tuple[str | None, str | None, str | None]:
    """(sha256 of the uncompressed config, where it came from, why it is unknown)."""
    errors = []
    try:
        with gzip.open("/proc/config.gz", "rb") as f:
            return hashlib.sha256(f.read()).hexdigest(), "/proc/config.gz", None
    except OSError as e:
        errors.append(f"/proc/config.gz: {e.strerror or e}")
    path = f"/boot/config-{release}"
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest(), path, None
    except OSError as e:
        errors.append(f"{path}: {e.strerror or e}")
    return None, None, "; ".join(errors)


def hugetlb_sizes(root: str = "/sys/kernel/mm/hugepages") -> list[int]:
    sizes = []
    try:
        for d in os.listdir(root):
            m = re.match(r"^hugepages-(\d+)kB$", d)
            if m:
                sizes.append(int(m.group(1)))
    except OSError:
        pass
    return sorted(sizes)


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def local(probe: dict, kmsg_readable: bool, kmsg_error: str) -> dict:
    u = os.uname()
    sha, source, err = kernel_config_hash(u.release)
    return build(probe=probe, kernel_release=u.release, kernel_version=u.version,
                 arch=u.machine or pyplatform.machine(), cpuinfo=read_text("/proc/cpuinfo"),
                 cpus=os.cpu_count(), config_sha256=sha, config_source=source, config_error=err,
                 hugetlb_sizes_kib=hugetlb_sizes(), kmsg_readable=kmsg_readable,
                 kmsg_error=kmsg_error, extra={"hostname": u.nodename})
