"""Resolving --kernel and --modules into a KernelBundle (image, modules, config).

--kernel takes:
  - a kernel image path (bzImage, Image, vmlinuz);
  - `ref` (or nothing, with --target qemu): the project's reference kernel, built if missing
    (cvmconf.refkernel);
  - `debian:SUITE/PACKAGE`, e.g. `debian:sid/linux-image-amd64`, fetched from that Debian suite
    through a private apt configuration (cvmconf.debian);
  - a bare Debian package name, fetched from the system's own apt sources.
Meta packages are followed to the package holding the image, including 7.x's split of an image
package into linux-binary-REL (vmlinuz), linux-modules-REL (compressed modules) and
linux-base-REL (config), all under usr/lib/modules/REL/.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from cvmconf import debian
from cvmconf.errors import UsageError

DEB_ARCH = debian.DEB_ARCH
IMAGE_OR_BINARY_RE = re.compile(r"^linux-(image|binary)-\d")
SIBLING_RE = re.compile(r"^linux-(modules|base)-\d")
META_RE = re.compile(r"^linux-image-")
REFERENCE_NAMES = ("ref", "reference")


@dataclasses.dataclass
class KernelBundle:
    image: Path                      # bzImage / Image / vmlinuz
    modules_dir: Path | None         # .../lib/modules/<release> holding kernel/
    release: str | None              # e.g. 7.2.13+deb14-amd64
    arch: str                        # x86_64 | arm64
    source: str                      # what the user gave
    config: Path | None = None       # the kernel's .config, when known
    packages: list[str] = dataclasses.field(default_factory=list)  # .deb files used
    meta_dirs: list[Path] = dataclasses.field(default_factory=list)  # lib/modules/<rel> dirs
                                     # holding modules.builtin & co. (7.x: linux-base)


def _module_dirs(tree: Path) -> list[Path]:
    """Every lib/modules/<release> directory in an unpacked tree (usr-merged or not)."""
    out = []
    for base in (tree / "lib" / "modules", tree / "usr" / "lib" / "modules"):
        if base.is_dir():
            out += sorted(d for d in base.iterdir() if d.is_dir())
    return out


def _image_in(tree: Path) -> tuple[Path, str] | None:
    """(image, release) of the kernel image in an unpacked package, if it holds one."""
    boot = tree / "boot"
    if boot.is_dir():
        for p in sorted(boot.glob("vmlinuz-*")) + sorted(boot.glob("vmlinux-*")):
            return p, p.name.split("-", 1)[1]
    for d in _module_dirs(tree):
        for n in ("vmlinuz", "vmlinux", "Image"):
            if (d / n).is_file():
                return d / n, d.name
    return None


def _modules_in(trees: list[Path], release: str | None) -> Path | None:
    for t in trees:
        for d in _module_dirs(t):
            if (d / "kernel").is_dir() and (release is None or d.name == release):
                return d
    return None


def _config_in(trees: list[Path], release: str | None) -> Path | None:
    for t in trees:
        for p in sorted((t / "boot").glob("config-*")) if (t / "boot").is_dir() else []:
            if release is None or p.name == f"config-{release}":
                return p
        for d in _module_dirs(t):
            if (d / "config").is_file() and (release is None or d.name == release):
                return d / "config"
    return None


def from_package(spec: debian.PackageSpec, arch: str, cache: Path) -> KernelBundle:
    """Downloads (once per version) and unpacks a Debian kernel package, following meta
    packages to the image and collecting its modules and config packages."""
    deb_arch = DEB_ARCH[arch]
    if spec.suite is None:
        debian.ensure_foreign_arch(deb_arch)
    archive = debian.Archive(cache, spec.suite)
    name, siblings, debs = spec.name, [], []
    for _ in range(5):
        st = archive.show(name, deb_arch)
        if st is None:
            where = f"Debian {spec.suite}" if spec.suite else "the system's apt sources"
            raise UsageError(f"kernel package {name} ({deb_arch}) is not in {where}")
        deb = archive.download(name, deb_arch)
        debs.append(deb)
        tree = debian.unpack(deb, cache / "trees" / deb.stem)
        found = _image_in(tree)
        siblings += [d for d in st.depends if SIBLING_RE.match(d) and d not in siblings]
        if found:
            break
        nxt = [d for d in st.depends if IMAGE_OR_BINARY_RE.match(d)] or \
              [d for d in st.depends if META_RE.match(d) and d != name]
        if not nxt:
            raise UsageError(f"package {name} contains no kernel image and depends on none")
        name = nxt[0]
    else:
        raise UsageError(f"{spec}: no kernel image found within five levels of dependencies")
    image, release = found
    trees = [tree]
    for s in siblings:
        sdeb = archive.download(s, deb_arch)
        debs.append(sdeb)
        trees.append(debian.unpack(sdeb, cache / "trees" / sdeb.stem))
    return KernelBundle(image=image, modules_dir=_modules_in(trees, release), release=release,
                        arch=arch, source=str(spec), config=_config_in(trees, release),
                        packages=[d.name for d in debs],
                        meta_dirs=[d for t in trees for d in _module_dirs(t) if d.name == release])


def _modules_option(modules: str, cache: Path, release: str | None) -> Path:
    """--modules DIR|DEB -> the lib/modules/<release> directory to take modules from."""
    mpath = Path(modules)
    if mpath.is_file() and mpath.name.endswith(".deb"):
        tree = debian.unpack(mpath, cache / "trees" / mpath.name[:-4])
        found = _modules_in([tree], release) or _modules_in([tree], None)
        if not found:
            raise UsageError(f"--modules {modules}: the package has no lib/modules/<release>/kernel/")
        return found
    if mpath.is_dir():
        if (mpath / "kernel").is_dir():            # a lib/modules/<release> directory itself
            return mpath
        found = _modules_in([mpath], release) or _modules_in([mpath], None)
        if found:
            return found
        raise UsageError(f"--modules {modules}: no lib/modules/<release>/ or kernel/ inside")
    raise UsageError(f"--modules {modules}: not a directory or .deb")


# Boot-image magic (Documentation/arch/x86/boot.rst: "HdrS" at 0x202; Documentation/arch/arm64/
# booting.rst: "ARM\x64" at 0x38). Anything else would sit in QEMU until the boot timeout.
_IMAGE_MAGIC = {"x86_64": (0x202, b"HdrS", "a bzImage"), "arm64": (0x38, b"ARM\x64", "an arm64 Image")}


def check_image(path: Path, arch: str) -> None:
    """Refuses a file that is not a kernel image QEMU can boot for `arch`, in one line."""
    offset, magic, what = _IMAGE_MAGIC[arch]
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            found = f.read(len(magic))
    except OSError as e:
        raise UsageError(f"kernel image {path} cannot be read: {e.strerror}") from None
    if found != magic:
        raise UsageError(f"kernel image {path} is not {what} (no {magic!r} at {offset:#x}); "
                         f"give a kernel for --arch {arch}")


def resolve(kernel: str | None, arch: str, cache: Path, modules: str | None = None,
            build_reference=None) -> KernelBundle:
    """--kernel [--modules] -> KernelBundle, with one-line errors. `build_reference(arch)`
    returns the reference kernel's (image, config) for `ref` (and for no --kernel)."""
    if arch not in DEB_ARCH:
        raise UsageError(f"unsupported --arch {arch} (x86_64 or arm64)")
    spec = None
    if kernel is None or kernel in REFERENCE_NAMES:
        if build_reference is None:
            raise UsageError("--kernel is required here (an image, debian:SUITE/PACKAGE or a "
                             "package name)")
        image, config = build_reference(arch)
        bundle = KernelBundle(image=image, modules_dir=None, release=None, arch=arch,
                              source="ref", config=config)
    elif Path(kernel).exists():
        path = Path(kernel)
        if not path.is_file():
            raise UsageError(f"kernel image {kernel} is not a file")
        check_image(path, arch)
        bundle = KernelBundle(image=path.resolve(), modules_dir=None, release=None, arch=arch,
                              source=kernel)
    elif (spec := debian.parse_spec(kernel)) is not None and (spec.suite or
                                                              spec.name.startswith("linux-")):
        bundle = from_package(spec, arch, cache)
    else:
        raise UsageError(f"kernel image not found: {kernel} (give an image path, 'ref', "
                         "debian:SUITE/PACKAGE, or a Debian kernel package name such as "
                         "linux-image-cloud-amd64)")
    if modules:
        bundle.modules_dir = _modules_option(modules, cache, bundle.release)
        bundle.release = bundle.modules_dir.name
        bundle.meta_dirs = [bundle.modules_dir]
    return bundle
