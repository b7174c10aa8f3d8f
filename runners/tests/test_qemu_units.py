"""QEMU runner pieces that need no boot: command lines, kernel resolution errors, accel choice."""
from pathlib import Path

import pytest

from cvmconf.errors import UsageError
from cvmconf.qemu import kernel, vm


def test_x86_command_line_has_no_network_and_a_dedicated_agent_channel(tmp_path):
    cmd = vm.qemu_command("x86_64", Path("/k"), Path("/i"), tmp_path / "s", tmp_path / "st",
                          tmp_path / "c", "tcg", append="foo=1")
    assert cmd[0] == "qemu-system-x86_64"
    assert cmd[cmd.index("-cpu") + 1] == "max"          # exposes SVM for nested KVM under TCG
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


def test_modules_option_is_validated(tmp_path):
    img = tmp_path / "bzImage"
    img.write_bytes(b"\0" * 16)
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
