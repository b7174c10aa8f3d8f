"""Resolving --kernel (an image path or a Debian kernel package name) and --modules."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

from cvmconf.errors import HarnessError, UsageError

PACKAGE_RE = re.compile(r"^linux-image-[A-Za-z0-9.+~-]+$")
DEB_ARCH = {"x86_64": "amd64", "arm64": "arm64"}


@dataclasses.dataclass
class KernelBundle:
    image: Path                 # bzImage / Image / vmlinuz
    modules_root: Path | None   # directory that holds lib/modules/<release>/
    release: str | None         # e.g. 6.1.0-56-cloud-amd64 (from the modules tree)
    arch: str                   # x86_64 | arm64
    source: str                 # what the user gave (path or package)


def _run(cmd: list[str], what: str) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HarnessError(f"{what}: {e}") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["exit status " + str(p.returncode)])[-1]
        raise UsageError(f"{what}: {last}")
    return p.stdout


def _release_of(modules_root: Path) -> str | None:
    mods = modules_root / "lib" / "modules"
    if not mods.is_dir():
        return None
    rels = sorted(d.name for d in mods.iterdir() if (d / "kernel").is_dir())
    return rels[-1] if rels else None


def _ensure_foreign_arch(deb_arch: str) -> None:
    """apt can only download packages of architectures dpkg knows about."""
    native = _run(["dpkg", "--print-architecture"], "dpkg").strip()
    if deb_arch == native:
        return
    foreign = _run(["dpkg", "--print-foreign-architectures"], "dpkg").split()
    if deb_arch in foreign:
        return
    if os.geteuid() != 0:
        raise UsageError(f"downloading {deb_arch} packages needs 'dpkg --add-architecture {deb_arch}' "
                         "and 'apt-get update' as root")
    _run(["dpkg", "--add-architecture", deb_arch], "dpkg --add-architecture")
    _run(["apt-get", "update", "-q"], "apt-get update")


def download_deb(package: str, deb_arch: str, cache: Path) -> Path:
    """apt-get download of package (for deb_arch) into cache; returns the .deb path."""
    _ensure_foreign_arch(deb_arch)
    cache.mkdir(parents=True, exist_ok=True)
    spec = package if ":" in package else f"{package}:{deb_arch}"
    existing = sorted(cache.glob(f"{package.split(':')[0]}_*_{deb_arch}.deb"))
    if existing:
        return existing[-1]
    try:
        p = subprocess.run(["apt-get", "download", "-q", spec], cwd=cache, capture_output=True,
                           text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HarnessError(f"apt-get download {spec}: {e}") from None
    if p.returncode != 0:
        msg = [l for l in p.stderr.strip().splitlines() if l.startswith("E:")] or ["failed"]
        raise UsageError(f"kernel package {spec} could not be downloaded: {msg[-1]}")
    debs = sorted(cache.glob(f"{package.split(':')[0]}_*_{deb_arch}.deb"))
    if not debs:
        raise HarnessError(f"apt-get download {spec} produced no .deb")
    return debs[-1]


def unpack_deb(deb: Path, dest: Path) -> Path:
    if not (dest / ".unpacked").exists():
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(dest)], f"dpkg-deb -x {deb.name}")
        (dest / ".unpacked").touch()
    return dest


def _image_in(tree: Path) -> Path | None:
    cands = sorted((tree / "boot").glob("vmlinuz-*")) if (tree / "boot").is_dir() else []
    return cands[-1] if cands else None


def _dependency_image_package(meta: str, deb_arch: str) -> str | None:
    """linux-image-cloud-amd64 -> linux-image-6.1.0-NN-cloud-amd64 (its first Depends)."""
    out = _run(["apt-cache", "depends", f"{meta}:{deb_arch}" if deb_arch else meta], "apt-cache depends")
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:"):
            dep = line.split(":", 1)[1].strip().split(":")[0]
            if PACKAGE_RE.match(dep):
                return dep
    return None


def resolve(kernel: str, arch: str, cache: Path, modules: str | None = None) -> KernelBundle:
    """--kernel IMAGE|PACKAGE [--modules DIR_OR_DEB] -> KernelBundle. One-line errors."""
    if arch not in DEB_ARCH:
        raise UsageError(f"unsupported --arch {arch} (x86_64 or arm64)")
    deb_arch = DEB_ARCH[arch]
    path = Path(kernel)
    if path.exists():
        if not path.is_file():
            raise UsageError(f"kernel image {kernel} is not a file")
        bundle = KernelBundle(image=path.resolve(), modules_root=None, release=None, arch=arch,
                              source=kernel)
    elif PACKAGE_RE.match(kernel):
        deb = download_deb(kernel, deb_arch, cache / "debs")
        tree = unpack_deb(deb, cache / "trees" / deb.stem)
        image = _image_in(tree)
        if image is None:  # a meta package: follow it to the real image package
            real = _dependency_image_package(kernel, deb_arch)
            if not real:
                raise UsageError(f"package {kernel} contains no kernel image and depends on none")
            return resolve(real, arch, cache, modules)
        bundle = KernelBundle(image=image, modules_root=tree, release=_release_of(tree), arch=arch,
                              source=kernel)
    else:
        raise UsageError(f"kernel image not found: {kernel} (give an image path or a Debian "
                         "kernel package name such as linux-image-cloud-amd64)")
    if modules:
        mpath = Path(modules)
        if mpath.is_file() and mpath.suffix == ".deb":
            bundle.modules_root = unpack_deb(mpath, cache / "trees" / mpath.stem)
        elif mpath.is_dir():
            if (mpath / "lib" / "modules").is_dir():
                bundle.modules_root = mpath
            elif (mpath / "kernel").is_dir():  # a lib/modules/<release> directory itself
                root = cache / "trees" / f"modules-{mpath.name}"
                (root / "lib" / "modules").mkdir(parents=True, exist_ok=True)
                link = root / "lib" / "modules" / mpath.name
                if not link.exists():
                    link.symlink_to(mpath.resolve())
                bundle.modules_root = root
            else:
                raise UsageError(f"--modules {modules}: no lib/modules/<release>/ or kernel/ inside")
        else:
            raise UsageError(f"--modules {modules}: not a directory or .deb")
        bundle.release = _release_of(bundle.modules_root)
    return bundle
