"""The project's reference kernels: built from Debian's linux-source package (or a user's tree)
with a config fragment kept in the project (arch/<arch>/kconfig/<flavour>.config), cached
outside the clone by (source version, fragments, compiler), so a second checkout or a CI run on
the same machine reuses them.

    ./cvmconf kernel build [--source debian:sid/linux-source-7.2 | DIR] [--arch x86_64]
                           [--flavour ref|debug]
    ./cvmconf run --target qemu [--kernel ref]      # builds it when missing, reuses it otherwise
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cvmconf import debian
from cvmconf.errors import HarnessError, UsageError

# The reference kernel's source: the one place it is pinned. Moving the reference kernel is an
# edit here plus new baselines (results/baselines/).
REFERENCE_SOURCE = "debian:sid/linux-source-7.2"
REFERENCE_VERSION = "7.2.13-1"

ROOT = Path(__file__).resolve().parents[2]
FLAVOURS = ("ref", "debug")
KARCH = {"x86_64": "x86", "arm64": "arm64"}
DEFCONFIG = {"x86_64": "x86_64_defconfig", "arm64": "defconfig"}
IMAGE = {"x86_64": "arch/x86/boot/bzImage", "arm64": "arch/arm64/boot/Image"}
CROSS = {"arm64": "aarch64-linux-gnu-"}
RECIPE = 1   # bump when the build steps change in a way that changes the result
PROGRESS_EVERY = 20.0


def cache_root() -> Path:
    """Where downloads, source trees and built kernels are kept: $CVMCONF_CACHE, else
    /var/cache/cvmconf for root, else ~/.cache/cvmconf (outside any checkout)."""
    if os.environ.get("CVMCONF_CACHE"):
        return Path(os.environ["CVMCONF_CACHE"])
    if os.geteuid() == 0:
        return Path("/var/cache/cvmconf")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cvmconf"


def fragments(arch: str, flavour: str) -> list[Path]:
    if arch not in KARCH:
        raise UsageError(f"unsupported --arch {arch} (x86_64 or arm64)")
    if flavour not in FLAVOURS:
        raise UsageError(f"unknown --flavour {flavour} ({' or '.join(FLAVOURS)})")
    names = ["ref"] if flavour == "ref" else ["ref", flavour]
    out = [ROOT / "arch" / KARCH[arch] / "kconfig" / f"{n}.config" for n in names]
    for f in out:
        if not f.is_file():
            raise HarnessError(f"config fragment {f} is missing")
    return out


def wanted_options(frags: list[Path]) -> dict[str, str]:
    """CONFIG_X -> 'y'/'m'/value, or 'n' for '# CONFIG_X is not set' (later fragments win)."""
    want: dict[str, str] = {}
    for f in frags:
        for line in f.read_text().splitlines():
            m = re.match(r"^(CONFIG_\w+)=(.*)$", line.strip())
            if m:
                want[m.group(1)] = m.group(2)
                continue
            m = re.match(r"^# (CONFIG_\w+) is not set$", line.strip())
            if m:
                want[m.group(1)] = "n"
    return want


def unmet_options(config_text: str, want: dict[str, str]) -> list[str]:
    have: dict[str, str] = {}
    for line in config_text.splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            have[m.group(1)] = m.group(2)
    bad = []
    for k, v in want.items():
        got = have.get(k, "n")
        if got != v:
            bad.append(f"{k}={v} (got {got})")
    return bad


def compiler(arch: str) -> str:
    cc = CROSS.get(arch, "") + "gcc" if arch != _host_arch() else "gcc"
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        pkg = "gcc-aarch64-linux-gnu" if cc.startswith("aarch64") else "gcc"
        raise UsageError(f"{cc} is missing (Debian package {pkg})") from None
    return (out.splitlines() or [cc])[0]


def _host_arch() -> str:
    m = os.uname().machine
    return "arm64" if m == "aarch64" else m


# --- source ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Source:
    tree: Path
    label: str           # e.g. linux-source-7.2 7.2.13-1, or the user's directory
    version: str | None  # package version (None for a user's tree)


def _newest_source(archive: debian.Archive) -> str:
    names = [n for n in archive.names_matching(r"^linux-source-[0-9]") if n != "linux-source"]
    best = []
    for n in names:
        st = archive.show(n, "amd64")
        if st:
            best.append((tuple(int(x) for x in re.findall(r"\d+", n)), f"{n} {st.version}"))
    return max(best)[1] if best else "none"


def source_tree(spec: str | None, cache: Path) -> Source:
    """The kernel tree to build: a user's directory, or a Debian linux-source package unpacked
    once into CACHE/src (the pinned reference version when spec is None)."""
    spec = spec or REFERENCE_SOURCE
    p = Path(spec)
    if p.is_dir():
        if not (p / "Makefile").is_file() or not (p / "Kconfig").is_file():
            raise UsageError(f"--source {spec}: not a kernel tree (no Makefile and Kconfig)")
        return Source(tree=p.resolve(), label=str(p.resolve()), version=None)
    pkg = debian.parse_spec(spec)
    if pkg is None or not pkg.name.startswith("linux-source-"):
        raise UsageError(f"--source {spec}: give a kernel tree directory or "
                         "debian:SUITE/linux-source-X.Y")
    version = REFERENCE_VERSION if spec == REFERENCE_SOURCE else None
    if version:
        done = cache / "src" / f"{pkg.name}_{version}"
        if (done / ".unpacked").exists():
            return Source(tree=done / pkg.name, label=f"{pkg.name} {version}", version=version)
    archive = debian.Archive(cache, pkg.suite)
    st = archive.show(pkg.name, "amd64", version)
    if st is None:
        if version:
            raise UsageError(f"Debian {pkg.suite} no longer serves {pkg.name} {version} (the pinned "
                             f"reference source); newest there: {_newest_source(archive)}. Move "
                             f"REFERENCE_* in runners/cvmconf/refkernel.py and re-run the baselines")
        raise UsageError(f"{pkg.name} is not in Debian {pkg.suite}")
    version = st.version
    done = cache / "src" / f"{pkg.name}_{version}"
    if not (done / ".unpacked").exists():
        deb = archive.download(pkg.name, "amd64", version)
        pkgtree = debian.unpack(deb, cache / "src" / f".deb-{pkg.name}_{version}")
        tars = sorted((pkgtree / "usr" / "src").glob(f"{pkg.name}.tar.*"))
        if not tars:
            raise HarnessError(f"{deb.name} holds no usr/src/{pkg.name}.tar.*")
        if done.exists():
            shutil.rmtree(done)
        done.mkdir(parents=True)
        _say(f"unpacking {tars[0].name} ({tars[0].stat().st_size >> 20} MiB)")
        r = subprocess.run(["tar", "-C", str(done), "-xf", str(tars[0])], capture_output=True,
                           text=True, check=False)
        if r.returncode != 0:
            raise HarnessError(f"unpacking {tars[0]} failed: {r.stderr.strip()[-200:]}")
        shutil.rmtree(pkgtree)
        (done / ".unpacked").touch()
    return Source(tree=done / pkg.name, label=f"{pkg.name} {version}", version=version)


# --- build ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Built:
    image: Path
    config: Path
    key: str
    meta: dict


def _say(msg: str) -> None:
    print(f"cvmconf: {msg}", file=sys.stderr, flush=True)


def cache_key(source: Source, arch: str, flavour: str, frags: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(f"recipe {RECIPE}\n{source.label}\n{arch}\n{flavour}\n{compiler(arch)}\n".encode())
    for f in frags:
        h.update(f.read_bytes())
    return f"{arch}-{flavour}-{h.hexdigest()[:16]}"


def find_built(arch: str = "x86_64", flavour: str = "ref", cache: Path | None = None) -> Built | None:
    """The cached reference kernel for the pinned source, if it was built (no network)."""
    cache = cache or cache_root()
    src = Source(tree=Path("/nonexistent"), label=f"{debian.parse_spec(REFERENCE_SOURCE).name} "
                 f"{REFERENCE_VERSION}", version=REFERENCE_VERSION)
    key = cache_key(src, arch, flavour, fragments(arch, flavour))
    return _load_built(cache / "kernels" / key)


def _load_built(out: Path) -> Built | None:
    try:
        meta = json.loads((out / "meta.json").read_text())
        image, config = out / meta["image"], out / "config"
    except (OSError, ValueError, KeyError):
        return None
    return Built(image=image, config=config, key=out.name, meta=meta) \
        if image.is_file() and config.is_file() else None


def _first_error(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    for pat in (r"\berror:", r"\*\*\* ", r"Error \d+"):
        for l in lines:
            if re.search(pat, l):
                return l.strip()[:200]
    return (lines[-1].strip() if lines else "no output")[:200]


def _make(args: list[str], log, what: str, progress: bool = False) -> None:
    """Runs make, its output appended to log; on progress, a line every PROGRESS_EVERY s."""
    t0 = time.monotonic()
    steps, last, shown = 0, "", t0
    proc = subprocess.Popen(["make", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    try:
        assert proc.stdout
        for line in proc.stdout:
            log.write(line)
            if line.startswith("  ") and len(line.split()) >= 2:
                steps += 1
                last = " ".join(line.split()[:2])
            now = time.monotonic()
            if progress and now - shown >= PROGRESS_EVERY:
                shown = now
                m, s = divmod(int(now - t0), 60)
                _say(f"kernel build {m}m{s:02d}s: {steps} steps, now {last}")
        rc = proc.wait()
    except BaseException:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    log.flush()
    if rc != 0:
        raise HarnessError(f"{what} failed: {_first_error(Path(log.name))} (full log: {log.name})")


def build(source_spec: str | None = None, arch: str = "x86_64", flavour: str = "ref",
          jobs: int | None = None, cache: Path | None = None) -> Built:
    """Builds (or finds in the cache) the kernel; returns its image and config."""
    cache = cache or cache_root()
    frags = fragments(arch, flavour)
    user_tree = source_spec is not None and Path(source_spec).is_dir()
    if not user_tree and (source_spec in (None, REFERENCE_SOURCE)):
        hit = find_built(arch, flavour, cache)
        if hit:
            return hit
    source = source_tree(source_spec, cache)
    key = cache_key(source, arch, flavour, frags)
    if user_tree:   # a user's tree changes under us: build incrementally every time
        key = f"tree-{hashlib.sha256(str(source.tree).encode()).hexdigest()[:12]}-{arch}-{flavour}"
    out = cache / "kernels" / key
    if not user_tree:
        hit = _load_built(out)
        if hit:
            return hit
    # Objects are kept per source, architecture and flavour (not per fragment): a fragment
    # change rebuilds only what the changed options touch.
    obj = cache / "kbuild" / (key if user_tree else
                              f"{source.label.replace(' ', '_')}-{arch}-{flavour}")
    obj.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    logpath = out / "build.log"
    mk = ["-C", str(source.tree), f"O={obj}", f"ARCH={arch}"]
    if arch in CROSS and arch != _host_arch():
        mk.append(f"CROSS_COMPILE={CROSS[arch]}")
    jobs = jobs or os.cpu_count() or 1
    t0 = time.monotonic()
    _say(f"building the {flavour} {arch} kernel from {source.label} "
         f"(fragments {', '.join(str(f.relative_to(ROOT)) for f in frags)}; log {logpath})")
    with open(logpath, "w") as log:
        _make(mk + [DEFCONFIG[arch]], log, "make defconfig")
        merge = source.tree / "scripts" / "kconfig" / "merge_config.sh"
        log.flush()
        r = subprocess.run(["sh", str(merge), "-m", "-O", str(obj), str(obj / ".config"),
                            *map(str, frags)], cwd=source.tree, stdout=log,
                           stderr=subprocess.STDOUT, check=False)
        if r.returncode != 0:
            raise HarnessError(f"merging the config fragments failed (full log: {logpath})")
        _make(mk + ["olddefconfig"], log, "make olddefconfig")
        bad = unmet_options((obj / ".config").read_text(), wanted_options(frags))
        if bad:
            raise HarnessError(f"the kernel config lacks options the fragments ask for: "
                               f"{', '.join(bad[:6])} (their dependencies are not met; full log: "
                               f"{logpath})")
        _make(mk + [f"-j{jobs}", Path(IMAGE[arch]).name], log, "the kernel build", progress=True)
    image = obj / IMAGE[arch]
    shutil.copy2(image, out / image.name)
    shutil.copy2(obj / ".config", out / "config")
    rel = subprocess.run(["make", "-s", *mk, "kernelrelease"], capture_output=True, text=True,
                         check=False).stdout.strip()
    meta = {"source": source.label, "source_version": source.version, "arch": arch,
            "flavour": flavour, "fragments": [str(f.relative_to(ROOT)) for f in frags],
            "compiler": compiler(arch), "release": rel, "image": image.name,
            "build_seconds": round(time.monotonic() - t0, 1)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    m, s = divmod(int(meta["build_seconds"]), 60)
    _say(f"built {out / image.name} ({rel}) in {m}m{s:02d}s")
    return Built(image=out / image.name, config=out / "config", key=key, meta=meta)
