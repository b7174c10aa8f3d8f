"""The CLI as a user meets it: one-line errors with distinct exit codes when KVM is missing or
not permitted, and suites that SKIP with the reason."""
import json
import os
import shutil
import subprocess

import pytest

from conftest import BROKEN_CATALOGUE, REPO, cvmconf


def test_run_without_kvm_device_is_one_line_exit_2(build_dir):
    r = cvmconf("--build-dir", str(build_dir), "run", env={"CVMCONF_KVM_DEVICE": "/nonexistent/kvm"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "cvmconf: KVM unavailable: open /nonexistent/kvm: No such file or directory (ENOENT)"]
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_run_without_permission_is_one_line_exit_2(build_dir):
    r = cvmconf("--build-dir", str(build_dir), "run",
                prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Permission denied (EACCES)" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_suite_skips_with_reason_when_dev_kvm_is_really_absent(build_dir, tmp_path):
    """In a private mount namespace /dev is replaced by a tmpfs without a kvm node."""
    report = tmp_path / "r.json"
    binary = build_dir / "suites" / "cvm_suite_gmem_mmap"
    # The tmpfs must not propagate back to the host's /dev: make /dev private in the new
    # namespace first (/ itself is not a mount point in a chroot), or give up (exit 77).
    script = (
        "{ mount --make-rprivate / 2>/dev/null || mount --make-rprivate /dev; } || exit 77; "
        "mount -t tmpfs none /dev && mknod -m 666 /dev/null c 1 3 && "
        f"exec {binary} --gtest_filter='*x86_default' --gtest_output=json:{report}")
    r = subprocess.run(["unshare", "--mount", "--propagation", "unchanged", "sh", "-c", script],
                       capture_output=True, text=True, timeout=300)
    if r.returncode == 77:
        pytest.skip("not applicable: cannot make /dev private in a new mount namespace here")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    tests = [t for s in json.loads(report.read_text())["testsuites"] for t in s["testsuite"]]
    assert tests
    for t in tests:
        assert t["result"] == "SKIPPED", t
        assert t["skip_reason"] == "capability absent: open /dev/kvm: No such file or directory (ENOENT)"


def test_check_catalogue_passes(build_dir):
    r = cvmconf("--build-dir", str(build_dir), "check-catalogue")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 problem(s)" in r.stdout


def test_bad_catalogue_is_one_line_exit_2(build_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("requirements: [unclosed\n")
    r = cvmconf("--build-dir", str(build_dir), "--catalogue", str(bad), "check-catalogue")
    assert r.returncode == 2
    assert r.stderr.startswith("cvmconf: requirement catalogue")
    assert len(r.stderr.strip().splitlines()) == 1


def test_unknown_command_is_usage_error():
    r = subprocess.run([str(REPO / "cvmconf"), "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown command 'frobnicate'" in r.stderr


@pytest.mark.parametrize("option", [
    ["--max-reboots", "3"],          # the QEMU target's default value: still given
    ["--boot-timeout", "300"],
    ["--max-reboots", "0"],
    ["--kernel", "bzImage"],
    ["--pkvm"],
    ["--memory", "4096"],
])
def test_qemu_options_with_the_local_target_are_a_usage_error(tmp_path, option):
    r = cvmconf("--build-dir", str(tmp_path), "--catalogue", str(BROKEN_CATALOGUE), "list",
                *option)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [f"cvmconf: {option[0]} only apply to --target qemu"]
