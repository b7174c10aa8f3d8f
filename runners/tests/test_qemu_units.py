"""QEMU runner pieces that need no boot: command lines, kernel resolution errors, accel choice."""
import os
import subprocess
from pathlib import Path

import pytest

import conftest

from cvmconf.errors import UsageError
from cvmconf.qemu import kernel, vm


def test_x86_command_line_has_no_network_and_a_dedicated_agent_channel(tmp_path):
    cmd = vm.qemu_command("x86_64", Path("/k"), Path("/i"), tmp_path / "s", tmp_path / "st",
                          tmp_path / "c", "tcg", append="foo=1")
    assert cmd[0] == "qemu-system-x86_64"
    # max exposes SVM for nested KVM under TCG; pdpe1gb 1 GiB pages (hugetlb 1 GiB pin cases)
    assert cmd[cmd.index("-cpu") + 1] == "max,pdpe1gb=on"
    assert cmd[cmd.index("-accel") + 1] == "tcg,thread=single"  # MTTCG int3-patching livelock
    assert cmd[cmd.index("-nic") + 1] == "none"
    assert "-no-reboot" in cmd
    assert f"file:{tmp_path / 'c'}" in cmd
    append = cmd[cmd.index("-append") + 1]
    assert "console=ttyS0" in append and "panic=-1" in append and append.endswith("foo=1")
    assert f"virtserialport,chardev=agent,name={vm.AGENT_PORT}" in cmd
    assert f"virtserialport,chardev=status,name={vm.STATUS_PORT}" in cmd


def test_arm64_pkvm_command_line(tmp_path):
    cmd = vm.qemu_command("arm64", Path("/k"), Path("/i"), tmp_path / "s", tmp_path / "st",
                          tmp_path / "c", "tcg", pkvm=True)
    assert cmd[0] == "qemu-system-aarch64"
    assert cmd[cmd.index("-machine") + 1] == "virt,virtualization=on,gic-version=3"
    append = cmd[cmd.index("-append") + 1]
    assert "kvm-arm.mode=protected" in append and "console=ttyAMA0" in append


def test_unknown_arch_and_accel_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="unsupported --arch"):
        vm.qemu_command("riscv64", Path("/k"), Path("/i"), tmp_path / "s", tmp_path / "st",
                        tmp_path / "c", "tcg")
    with pytest.raises(UsageError, match="--accel must be kvm or tcg"):
        vm.choose_accel("x86_64", "hvf")


def test_accel_choice_needs_hardware_virtualisation_for_kvm(monkeypatch):
    monkeypatch.setattr(vm, "host_has_hw_virt", lambda: False)
    assert vm.choose_accel("x86_64") == "tcg"
    assert vm.choose_accel("arm64" if __import__("os").uname().machine == "x86_64" else "x86_64") == "tcg"


def test_missing_kernel_image_is_a_one_line_usage_error(tmp_path):
    with pytest.raises(UsageError, match="kernel image not found: /no/such/bzImage"):
        kernel.resolve("/no/such/bzImage", "x86_64", tmp_path)
    with pytest.raises(UsageError, match="is not a file"):
        kernel.resolve(str(tmp_path), "x86_64", tmp_path)
    with pytest.raises(UsageError, match="unsupported --arch"):
        kernel.resolve("/no/such", "mips", tmp_path)


def test_a_file_that_is_not_a_kernel_image_is_refused_before_booting(tmp_path):
    junk = tmp_path / "bzImage"
    junk.write_bytes(b"this is not a kernel" * 100)
    with pytest.raises(UsageError, match=r"is not a bzImage \(no b'HdrS' at 0x202\)"):
        kernel.resolve(str(junk), "x86_64", tmp_path)
    img = conftest.fake_bzimage(tmp_path / "real")
    assert kernel.resolve(str(img), "x86_64", tmp_path).image == img.resolve()
    with pytest.raises(UsageError, match="is not an arm64 Image"):
        kernel.resolve(str(img), "arm64", tmp_path)


def test_modules_option_is_validated(tmp_path):
    img = conftest.fake_bzimage(tmp_path / "bzImage")
    with pytest.raises(UsageError, match="not a directory or .deb"):
        kernel.resolve(str(img), "x86_64", tmp_path, modules=str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no lib/modules"):
        kernel.resolve(str(img), "x86_64", tmp_path, modules=str(empty))
    tree = tmp_path / "tree" / "lib" / "modules" / "6.99.0-test"
    (tree / "kernel").mkdir(parents=True)
    b = kernel.resolve(str(img), "x86_64", tmp_path, modules=str(tmp_path / "tree"))
    assert b.release == "6.99.0-test" and b.image == img.resolve()


def test_crash_lines_are_found_in_the_console(tmp_path):
    v = vm.QemuVm("x86_64", Path("/k"), Path("/i"), tmp_path, "tcg")
    v.boots = 1
    v.console_file.write_text("[    1.0] ok\n[    2.0] sysrq: Trigger a crash\n"
                              "[    2.1] Kernel panic - not syncing: sysrq triggered crash\n")
    assert v.crash_lines() == ["[    2.1] Kernel panic - not syncing: sysrq triggered crash"]


KALLSYMS = """\
0000000000000000 A fixed_percpu_data
ffffffff81000000 T _stext
ffffffff81001000 T exc_int3
ffffffff81001200 t asm_exc_int3
ffffffff81002000 D some_data
ffffffffc0400000 t svm_vcpu_run\t[kvm_amd]
"""

X86_REGS = """CPU#0
RAX=0000000000000000 RBX=ffffffff82a1c940 RCX=0000000000000001 RDX=0000000000000000
RIP=ffffffff81001010 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0
CPU#1
RAX=0000000000000000 RBX=0000000000000000
RIP=ffffffffc0400044 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
"""

ARM64_REGS = """CPU#0
 PC=ffff800008010000 X00=0000000000000000 X01=0000000000000000
CPU#1
 PC=ffff800008020000 X00=0000000000000000
"""


def test_vcpu_program_counters_are_named_with_the_guest_symbols():
    from cvmconf.qemu import cpustate
    syms = cpustate.Symbols(KALLSYMS)
    assert len(syms) == 4                                   # text only, no zero addresses
    assert syms.name(0xffffffff81001010) == "exc_int3+0x10"
    assert syms.name(0xffffffffc0400044) == "svm_vcpu_run+0x44 [kvm_amd]"
    assert syms.name(0x1000) == "0x1000"                      # below the kernel: raw address
    pcs = cpustate.parse_pcs(X86_REGS, "x86_64")
    assert pcs == {0: 0xffffffff81001010, 1: 0xffffffffc0400044}
    assert cpustate.parse_pcs(ARM64_REGS, "arm64") == {0: 0xffff800008010000, 1: 0xffff800008020000}
    assert cpustate.parse_pcs("RIP=ffffffff81001010 RFL=0", "x86_64") == {0: 0xffffffff81001010}
    moved = {**pcs, 0: 0xffffffff81001210}
    text = cpustate.describe([pcs, pcs, moved], syms)
    assert text == ("vCPU 0: exc_int3 (2/3 samples), asm_exc_int3 (1/3 samples); "
                    "vCPU 1: svm_vcpu_run [kvm_amd] (3/3 samples)")
    assert cpustate.describe([], syms) == ""
    assert cpustate.describe([pcs], None).startswith("vCPU 0: 0xffffffff81001010 (1/1 samples)")
    # A vCPU sampled while it ran a user process is said to be there, not given a kernel symbol.
    in_user = {0: 0xffffffff81001010, 1: 0x40e1b3}
    assert cpustate.describe([in_user], syms) == ("vCPU 0: exc_int3 (1/1 samples); "
                                                  "vCPU 1: user space 0x40e1b3 (1/1 samples)")


def test_qmp_socket_is_on_the_command_line_only_when_asked(tmp_path):
    cmd = vm.qemu_command("x86_64", Path("/k"), Path("/i"), tmp_path / "s", tmp_path / "st",
                          tmp_path / "c", "tcg")
    assert "-qmp" not in cmd
    cmd = vm.qemu_command("arm64", Path("/k"), Path("/i"), tmp_path / "s", tmp_path / "st",
                          tmp_path / "c", "tcg", qmp_sock=tmp_path / "q.sock")
    assert cmd[cmd.index("-qmp") + 1] == f"unix:{tmp_path / 'q.sock'},server=on,wait=off"


def test_suite_binaries_reach_the_initramfs_without_debug_sections(build_dir, tmp_path):
    from cvmconf.qemu import initramfs
    src = build_dir / "suites" / "cvm_suite_gmem_mmap"
    dst = tmp_path / "suite"
    initramfs.stage_binary(src, dst, "x86_64")
    assert dst.stat().st_size < src.stat().st_size / 2, (dst.stat().st_size, src.stat().st_size)
    assert os.access(dst, os.X_OK)
    sections = subprocess.run(["objdump", "-h", str(dst)], capture_output=True, text=True,
                              check=True).stdout
    assert ".text" in sections and ".debug_info" not in sections


def test_guest_memory_reaches_the_guest(tmp_path, monkeypatch):
    # --memory must reach QemuVm (whose command line then says -m), and no --memory leaves its
    # default alone.
    from cvmconf.targets.qemu import QemuTarget
    with pytest.raises(UsageError, match="--memory 100: a guest needs at least 512 MB"):
        QemuTarget(tmp_path, memory=100)
    made = []

    class FakeVm:
        def __init__(self, *args, **kw):
            made.append(kw)

        def start(self):
            pass

    monkeypatch.setattr(vm, "QemuVm", FakeVm)
    for memory in (4096, None):
        t = QemuTarget(tmp_path, memory=memory)
        monkeypatch.setattr(t, "_prepare", lambda t=t: (setattr(t, "bundle", kernel.KernelBundle(
            image=Path("/k"), modules_dir=None, release=None, arch="x86_64", source="k")),
            setattr(t, "initrd", Path("/i"))))
        t._boot()
    assert [m["memory_mb"] for m in made] == [4096, None]
    cmd = vm.qemu_command("x86_64", Path("/k"), Path("/i"), tmp_path / "a.sock",
                          tmp_path / "st", tmp_path / "c.log", "tcg", memory_mb=4096)
    assert cmd[cmd.index("-m") + 1] == "4096"
