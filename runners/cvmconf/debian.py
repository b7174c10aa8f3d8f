"""Debian packages from the system's own apt sources or from any Debian suite.

`debian:SUITE/PACKAGE` (e.g. `debian:sid/linux-image-amd64`) is fetched through a private apt
configuration under the cache (its own sources list signed by Debian's archive keyring, its own
lists and package cache); the system's apt sources are never read or changed for it. A bare
package name keeps meaning the system's own suites. Downloaded packages are kept by name,
version and architecture, so a version once fetched is reused without asking the network.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
from pathlib import Path

from cvmconf.errors import HarnessError, UsageError

MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://security.debian.org/debian-security"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEB_ARCH = {"x86_64": "amd64", "arm64": "arm64"}
LISTS_MAX_AGE = 6 * 3600          # refresh a suite's package lists after this many seconds
SPEC_RE = re.compile(r"^debian:([a-z][a-z0-9-]*)/([a-z0-9][a-z0-9.+~-]*)$")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.+~-]*$")


@dataclasses.dataclass(frozen=True)
class PackageSpec:
    name: str
    suite: str | None     # None: the system's apt sources

    def __str__(self) -> str:
        return f"debian:{self.suite}/{self.name}" if self.suite else self.name


def parse_spec(text: str) -> PackageSpec | None:
    """`debian:SUITE/PACKAGE` or a bare package name -> PackageSpec; None if neither."""
    m = SPEC_RE.match(text)
    if m:
        return PackageSpec(name=m.group(2), suite=m.group(1))
    if text.startswith("debian:"):
        raise UsageError(f"malformed package spec {text!r} (expected debian:SUITE/PACKAGE, "
                         "e.g. debian:sid/linux-image-amd64)")
    return PackageSpec(name=text, suite=None) if NAME_RE.match(text) else None


@dataclasses.dataclass
class Stanza:
    package: str
    version: str
    arch: str
    depends: list[str]      # package names, alternatives and versions dropped


def _parse_depends(value: str) -> list[str]:
    names = []
    for part in value.split(","):
        first = part.split("|")[0].strip()
        name = re.split(r"[\s(:]", first, maxsplit=1)[0]
        if name:
            names.append(name)
    return names


def parse_stanza(text: str) -> Stanza | None:
    """The first package stanza of `apt-cache show` output."""
    fields: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t" and key:
            fields[key] += " " + line.strip()
            continue
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    if "Package" not in fields or "Version" not in fields:
        return None
    deps = _parse_depends(fields.get("Pre-Depends", "")) + _parse_depends(fields.get("Depends", ""))
    return Stanza(package=fields["Package"], version=fields["Version"],
                  arch=fields.get("Architecture", ""), depends=deps)


def deb_filename(name: str, version: str, arch: str) -> str:
    """The file name apt-get download gives a package (an epoch's ':' becomes %3a)."""
    return f"{name}_{version.replace(':', '%3a')}_{arch}.deb"


class Archive:
    """apt-cache/apt-get for one suite (private configuration) or the system's sources."""

    def __init__(self, cache: Path, suite: str | None = None):
        self.cache = Path(cache)
        self.suite = suite
        self.debs = self.cache / "debs"
        self.root = self.cache / "apt" / suite if suite else None
        self._updated = False

    # --- configuration ---------------------------------------------------------------------------
    def _options(self) -> list[str]:
        if not self.root:
            return []
        return ["-o", f"Dir::Etc::SourceList={self.root / 'sources.list'}",
                "-o", "Dir::Etc::SourceParts=/dev/null",
                "-o", f"Dir::State::Lists={self.root / 'lists'}",
                "-o", f"Dir::Cache={self.root / 'cache'}",
                "-o", f"Dir::State::status={self.root / 'status'}",
                "-o", "APT::Architectures::=amd64", "-o", "APT::Architectures::=arm64",
                "-o", "APT::Sandbox::User=root"]

    def _setup(self) -> None:
        assert self.root and self.suite
        if not KEYRING.exists():
            raise UsageError(f"{KEYRING} is missing (Debian package debian-archive-keyring)")
        (self.root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "status").touch()
        mirror = SECURITY_MIRROR if self.suite.endswith("-security") else MIRROR
        (self.root / "sources.list").write_text(
            f"deb [arch=amd64,arm64 signed-by={KEYRING}] {mirror} {self.suite} main\n")

    def _apt(self, tool: str, args: list[str], what: str, cwd: Path | None = None,
             timeout: float = 900) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([tool, *self._options(), *args], cwd=cwd, capture_output=True,
                                  text=True, timeout=timeout, check=False,
                                  env={**os.environ, "LC_ALL": "C"})
        except FileNotFoundError:
            raise UsageError(f"{tool} is missing: {what} needs a Debian system") from None
        except subprocess.TimeoutExpired:
            raise HarnessError(f"{what}: {tool} did not finish within {timeout:.0f} s") from None

    def _lists_fresh(self) -> bool:
        lists = self.root / "lists" if self.root else None
        if not lists or not lists.is_dir():
            return False
        stamps = [p.stat().st_mtime for p in lists.glob("*_Packages*")]
        return bool(stamps) and time.time() - max(stamps) < LISTS_MAX_AGE

    def update(self, force: bool = False) -> None:
        """Fetches the suite's package lists (private configuration only; once per process)."""
        if not self.root or self._updated:
            return
        self._setup()
        if force or not self._lists_fresh():
            p = self._apt("apt-get", ["update", "-q"], f"apt-get update for Debian {self.suite}")
            errors = [l for l in (p.stderr or "").splitlines() if l.startswith(("E:", "Err:"))]
            if p.returncode != 0 or errors:
                last = (errors or (p.stderr or "").strip().splitlines() or ["failed"])[-1]
                raise UsageError(f"the package lists of Debian suite {self.suite!r} could not be "
                                 f"fetched: {last.strip()}")
        self._updated = True

    # --- queries ---------------------------------------------------------------------------------
    def show(self, name: str, deb_arch: str, version: str | None = None) -> Stanza | None:
        """The candidate (or given) version's stanza of name:deb_arch, or None if unknown."""
        self.update()
        spec = f"{name}:{deb_arch}" + (f"={version}" if version else "")
        p = self._apt("apt-cache", ["show", "--no-all-versions", spec], f"apt-cache show {spec}")
        if p.returncode != 0:
            return None
        return parse_stanza(p.stdout)

    def names_matching(self, regex: str) -> list[str]:
        """Package names matching regex (apt-cache search --names-only)."""
        self.update()
        p = self._apt("apt-cache", ["search", "--names-only", regex], "apt-cache search")
        return sorted({l.split(" - ")[0].strip() for l in p.stdout.splitlines() if l.strip()})

    # --- files -----------------------------------------------------------------------------------
    def cached(self, name: str, deb_arch: str, version: str | None = None) -> Path | None:
        """A .deb of this package already in the cache (that version, or the newest)."""
        if version:
            p = self.debs / deb_filename(name, version, deb_arch)
            return p if p.exists() else None
        found = sorted(self.debs.glob(f"{name}_*_{deb_arch}.deb"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None

    def download(self, name: str, deb_arch: str, version: str | None = None) -> Path:
        """The .deb of name (candidate version, or `version`) for deb_arch, downloaded once."""
        st = self.show(name, deb_arch, version)
        where = f"Debian {self.suite}" if self.suite else "the system's apt sources"
        if st is None:
            raise UsageError(f"package {name}{'=' + version if version else ''} ({deb_arch}) "
                             f"is not in {where}")
        hit = self.cached(name, deb_arch, st.version)
        if hit:
            return hit
        self.debs.mkdir(parents=True, exist_ok=True)
        spec = f"{name}:{deb_arch}={st.version}"
        p = self._apt("apt-get", ["download", "-q", spec], f"apt-get download {spec}",
                      cwd=self.debs)
        out = self.debs / deb_filename(name, st.version, deb_arch)
        if p.returncode != 0 or not out.exists():
            msg = [l for l in p.stderr.strip().splitlines() if l.startswith("E:")] or ["failed"]
            raise UsageError(f"package {spec} could not be downloaded from {where}: {msg[-1]}")
        return out


def unpack(deb: Path, dest: Path) -> Path:
    """dpkg-deb -x deb into dest (once; a stamp file records which packages are in dest)."""
    dest.mkdir(parents=True, exist_ok=True)
    stamp = dest / ".unpacked"
    have = stamp.read_text().split() if stamp.exists() else []
    if deb.name in have:
        return dest
    try:
        p = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True,
                           text=True, timeout=900, check=False)
    except FileNotFoundError:
        raise UsageError("dpkg-deb is missing: unpacking kernel packages needs a Debian system") \
            from None
    if p.returncode != 0:
        raise UsageError(f"dpkg-deb -x {deb.name}: {(p.stderr.strip().splitlines() or ['failed'])[-1]}")
    with open(stamp, "a") as f:
        f.write(deb.name + "\n")
    return dest


def ensure_foreign_arch(deb_arch: str) -> None:
    """The system's apt can only download packages of architectures dpkg knows about (a private
    suite configuration names its architectures itself and needs nothing)."""
    def out(cmd):
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.split()
    if deb_arch in out(["dpkg", "--print-architecture"]) + \
            out(["dpkg", "--print-foreign-architectures"]):
        return
    if os.geteuid() != 0:
        raise UsageError(f"downloading {deb_arch} packages needs 'dpkg --add-architecture "
                         f"{deb_arch}' and 'apt-get update' as root")
    for cmd in (["dpkg", "--add-architecture", deb_arch], ["apt-get", "update", "-q"]):
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise UsageError(f"{' '.join(cmd)}: {(p.stderr.strip().splitlines() or ['failed'])[-1]}")
