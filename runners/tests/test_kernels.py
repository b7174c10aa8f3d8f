"""Kernel sources without the network: Debian package specs and stanzas, following 7.x's split
image packages through real .deb files built here (dpkg-deb -b), compressed modules in the
initramfs, and the reference kernel's config fragments against the catalogue."""
import lzma
import re
import subprocess
from pathlib import Path

import pytest

import conftest

from cvmconf import catalogue, debian, refkernel
from cvmconf.errors import UsageError
from cvmconf.qemu import initramfs, kernel

REPO = Path(__file__).resolve().parents[2]


def test_package_specs():
    assert debian.parse_spec("debian:sid/linux-image-amd64") == \
        debian.PackageSpec(name="linux-image-amd64", suite="sid")
    assert debian.parse_spec("debian:bookworm-security/linux-source-6.12").suite == \
        "bookworm-security"
    assert debian.parse_spec("linux-image-cloud-amd64") == \
        debian.PackageSpec(name="linux-image-cloud-amd64", suite=None)
    assert debian.parse_spec("/boot/vmlinuz") is None
    with pytest.raises(UsageError, match="expected debian:SUITE/PACKAGE"):
        debian.parse_spec("debian:sid")


def test_stanza_depends_drop_versions_alternatives_and_arch():
    st = debian.parse_stanza(
        "Package: linux-image-7.2.13+deb14-amd64\nVersion: 7.2.13-1\nArchitecture: amd64\n"
        "Pre-Depends: linux-base\n"
        "Depends: dracut | initramfs-tools,\n linux-base-7.2.13+deb14-amd64 (= 7.2.13-1),\n"
        " linux-binary-7.2.13+deb14-amd64:amd64 (= 7.2.13-1)\n\nPackage: other\nVersion: 1\n")
    assert st.package == "linux-image-7.2.13+deb14-amd64" and st.version == "7.2.13-1"
    assert st.depends == ["linux-base", "dracut", "linux-base-7.2.13+deb14-amd64",
                          "linux-binary-7.2.13+deb14-amd64"]
    assert debian.deb_filename("x", "1:2.0-1", "amd64") == "x_1%3a2.0-1_amd64.deb"


def test_private_apt_configuration_never_names_the_system_sources(tmp_path):
    a = debian.Archive(tmp_path, "sid")
    opts = " ".join(a._options())
    assert f"Dir::Etc::SourceList={tmp_path}/apt/sid/sources.list" in opts
    assert "Dir::Etc::SourceParts=/dev/null" in opts
    assert f"Dir::State::Lists={tmp_path}/apt/sid/lists" in opts
    assert debian.Archive(tmp_path)._options() == []   # a bare name: the system's sources


REL = "7.2.99+test-amd64"


def make_deb(tmp: Path, name: str, files: dict[str, bytes], depends: list[str]) -> Path:
    root = tmp / f"src-{name}"
    (root / "DEBIAN").mkdir(parents=True)
    ctl = f"Package: {name}\nVersion: 1.0\nArchitecture: amd64\nMaintainer: t <t@t>\n" \
          f"Description: test\n"
    if depends:
        ctl += f"Depends: {', '.join(depends)}\n"
    (root / "DEBIAN" / "control").write_text(ctl)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    out = tmp / debian.deb_filename(name, "1.0", "amd64")
    subprocess.run(["dpkg-deb", "-Zgzip", "-b", str(root), str(out)], check=True,
                   capture_output=True)
    return out


class FakeArchive:
    """debian.Archive over .deb files made here: show() reads their control, download() returns
    them; nothing reaches the network."""
    debs: dict[str, Path] = {}

    def __init__(self, cache, suite=None):
        self.suite = suite

    def show(self, name, deb_arch, version=None):
        deb = self.debs.get(name)
        if not deb:
            return None
        ctl = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True).stdout
        return debian.parse_stanza(ctl)

    def download(self, name, deb_arch, version=None):
        return self.debs[name]


@pytest.fixture
def split_packages(tmp_path, monkeypatch):
    """A 7.x-style meta -> image -> binary/modules/base set, modules xz-compressed."""
    kvm = b"\x7fELF fake kvm module"
    mods = f"usr/lib/modules/{REL}"
    debs = {
        "linux-image-amd64": make_deb(tmp_path, "linux-image-amd64", {},
                                      ["linux-base-amd64", f"linux-image-{REL}"]),
        f"linux-image-{REL}": make_deb(tmp_path, f"linux-image-{REL}", {},
                                       ["linux-base", f"linux-base-{REL}", f"linux-binary-{REL}",
                                        f"linux-modules-{REL}"]),
        f"linux-binary-{REL}": make_deb(tmp_path, f"linux-binary-{REL}",
                                        {f"{mods}/vmlinuz": b"kernel"}, []),
        f"linux-modules-{REL}": make_deb(tmp_path, f"linux-modules-{REL}", {
            f"{mods}/kernel/arch/x86/kvm/kvm.ko.xz": lzma.compress(kvm, format=lzma.FORMAT_XZ),
            f"{mods}/kernel/arch/x86/kvm/kvm-amd.ko.xz": lzma.compress(b"amd", format=lzma.FORMAT_XZ),
        }, []),
        f"linux-base-{REL}": make_deb(tmp_path, f"linux-base-{REL}", {
            f"{mods}/config": b"CONFIG_KVM=m\n", f"{mods}/modules.builtin": b"",
        }, []),
    }
    FakeArchive.debs = debs
    monkeypatch.setattr(debian, "Archive", FakeArchive)
    return kvm


def test_meta_package_is_followed_through_the_7x_split(tmp_path, split_packages):
    b = kernel.resolve("debian:sid/linux-image-amd64", "x86_64", tmp_path / "cache")
    assert b.image.name == "vmlinuz" and b.image.read_bytes() == b"kernel"
    assert b.release == REL
    assert b.modules_dir is not None and (b.modules_dir / "kernel").is_dir()
    assert b.config is not None and b.config.read_text() == "CONFIG_KVM=m\n"
    assert b.source == "debian:sid/linux-image-amd64"
    assert len(b.packages) == 5   # meta, image, binary, then modules and base


def test_compressed_modules_reach_the_initramfs_decompressed(tmp_path, split_packages):
    b = kernel.resolve("debian:sid/linux-image-amd64", "x86_64", tmp_path / "cache")
    dst = tmp_path / "stage" / "lib" / "modules" / REL
    loaded = initramfs.stage_modules(b.modules_dir, ["kvm_amd", "kvm", "virtio_pci"], dst)
    assert loaded == ["kvm_amd", "kvm"]   # virtio_pci: not a module of this kernel (built in)
    assert (dst / "kernel/arch/x86/kvm/kvm.ko").read_bytes() == split_packages
    assert not list(dst.rglob("*.xz"))


def test_modules_option_takes_a_7x_modules_package(tmp_path, split_packages):
    img = conftest.fake_bzimage(tmp_path / "bzImage")
    b = kernel.resolve(str(img), "x86_64", tmp_path / "cache",
                       modules=str(FakeArchive.debs[f"linux-modules-{REL}"]))
    assert b.release == REL and (b.modules_dir / "kernel" / "arch").is_dir()


def test_unknown_package_is_a_one_line_usage_error(tmp_path, split_packages):
    with pytest.raises(UsageError, match="linux-image-nope .*is not in Debian sid"):
        kernel.resolve("debian:sid/linux-image-nope", "x86_64", tmp_path)


def test_reference_kernel_is_asked_for_when_no_kernel_is_given(tmp_path):
    img, cfg = tmp_path / "bzImage", tmp_path / "config"
    img.write_bytes(b"k")
    cfg.write_text("CONFIG_KVM=y\n")
    asked = []
    b = kernel.resolve(None, "x86_64", tmp_path,
                       build_reference=lambda arch: asked.append(arch) or (img, cfg))
    assert asked == ["x86_64"] and b.image == img and b.config == cfg and b.source == "ref"
    kernel.resolve("ref", "x86_64", tmp_path, build_reference=lambda arch: (img, cfg))


# --- config fragments ---------------------------------------------------------------------------
def fragment_files():
    return sorted((REPO / "arch").glob("*/kconfig/*.config"))


def test_every_fragment_option_names_the_requirements_that_need_it():
    ids = {r.id for r in catalogue.load(REPO / "suites" / "requirements.yaml").requirements}
    assert fragment_files(), "no config fragments"
    for f in fragment_files():
        comment: list[str] = []
        after_option = False
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if re.match(r"^(CONFIG_\w+=|# CONFIG_\w+ is not set)", line):
                after_option = True
                text = " ".join(comment)
                named = re.findall(r"\b([A-Z]+-\d{3})\b", text)
                assert named or "every requirement" in text or "no requirement" in text, \
                    f"{f.name}:{n}: {line} has no comment naming its requirements"
                for rid in named:
                    assert rid in ids, f"{f.name}:{n}: unknown requirement {rid}"
            elif line.startswith("#"):
                comment = [line] if after_option else comment + [line]
                after_option = False
            else:
                comment, after_option = [], False


def test_unmet_options_are_found():
    frag = refkernel.wanted_options(refkernel.fragments("x86_64", "debug"))
    assert frag["CONFIG_KVM_SW_PROTECTED_VM"] == "y" and frag["CONFIG_MODULES"] == "n"
    assert frag["CONFIG_KASAN"] == "y"    # the debug fragment adds to ref
    cfg = "CONFIG_KVM=y\nCONFIG_MODULES=y\n# CONFIG_GUP_TEST is not set\n"
    bad = refkernel.unmet_options(cfg, {"CONFIG_KVM": "y", "CONFIG_MODULES": "n",
                                        "CONFIG_GUP_TEST": "y"})
    assert bad == ["CONFIG_MODULES=n (got y)", "CONFIG_GUP_TEST=y (got n)"]


def test_cache_lives_outside_the_clone(monkeypatch, tmp_path):
    monkeypatch.delenv("CVMCONF_CACHE", raising=False)
    assert not refkernel.cache_root().resolve().is_relative_to(REPO)
    monkeypatch.setenv("CVMCONF_CACHE", str(tmp_path))
    assert refkernel.cache_root() == tmp_path


def test_a_tree_that_is_not_a_kernel_is_refused(tmp_path):
    with pytest.raises(UsageError, match="not a kernel tree"):
        refkernel.source_tree(str(tmp_path), tmp_path)
    with pytest.raises(UsageError, match="linux-source"):
        refkernel.source_tree("debian:sid/linux-image-amd64", tmp_path)
