"""qemu_configs/libvirt/teeio-domain.xml says what the launcher says: its QEMU arguments
(the qemu:commandline) are the launcher's for the same VM (qemu_configs/launcher.py
qemu_argv with qemu_configs/tee_stack.py vm_options), and what libvirt expresses natively
(memfd shared memory, kernel boot, 9p shares, serial file) matches the rest of that
command line.  With libvirt's virt-xml-validate installed, the file also validates
against libvirt's domain schema."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from qemu_configs.launcher import CONFIG_FILE, VmOptions, qemu_argv
from qemu_configs.tee_stack import StackOptions, TeeStack

DOMAIN_XML = Path(__file__).resolve().parents[2] / "qemu_configs" / "libvirt" / "teeio-domain.xml"
QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
WD = "/var/lib/teeio/vm0"                 # the VM's work folder in the XML
IMAGE = Path("/var/lib/teeio/image")
SHARE = Path("/var/lib/teeio/guest-share")


@dataclass(frozen=True)
class _Image:
    """The launcher's view of the guest image, at the XML's paths."""
    sysroot: Path = IMAGE / "sysroot"
    kernel: Path = IMAGE / "vmlinuz"
    initramfs: Path = IMAGE / "initramfs.cpio.gz"

    def qemu_argv0(self) -> list[str]:
        return ["qemu-system-x86_64"]


@pytest.fixture(scope="module")
def domain() -> ET.Element:
    return ET.parse(DOMAIN_XML).getroot()


@pytest.fixture
def launcher_argv(tmp_path: Path) -> list[str]:
    """The tee stack's QEMU command line for VM vm0, its work folder renamed to WD."""
    stack = TeeStack(StackOptions(workdir=tmp_path))
    stack.identity_dir, stack.firmware = tmp_path / "identity", tmp_path / "fw.elf"
    opts: VmOptions = stack.vm_options()
    argv = qemu_argv(_Image(), opts, tmp_path, tmp_path / "vfio-user.sock",   # type: ignore[arg-type]
                     tmp_path / "qmp.sock", "tcg", project=SHARE)
    return [a.replace(str(tmp_path), WD) for a in argv]


def _pairs(argv: list[str], *options: str) -> list[tuple[str, str]]:
    return [(o, v) for o, v in zip(argv, argv[1:], strict=False) if o in options]


def _props(text: str) -> dict[str, str]:
    """QEMU's ``driver,key=value,...`` as a dict (the leading word under ``driver``)."""
    out = {}
    for i, kv in enumerate(text.split(",")):
        key, sep, value = kv.partition("=")
        if not sep and i == 0:
            key, value = "driver", kv
        out[key] = value
    return out


def test_qemu_commandline_is_the_launchers(domain: ET.Element,
                                           launcher_argv: list[str]) -> None:
    args = [a.attrib["value"] for a in domain.iter(f"{QEMU_NS}arg")]
    xml_pairs = list(zip(args[::2], args[1::2], strict=True))
    # The root port: teeio-q35.cfg's rp0, with a chassis libvirt's own ports do not use.
    (opt, root_port), *rest = xml_pairs
    cfg = configparser.ConfigParser()
    cfg.read_string(CONFIG_FILE.read_text())
    rp0 = {k: v.strip('"') for k, v in cfg['device "rp0"'].items()}
    props = _props(root_port)
    assert opt == "-device" and props.pop("chassis") != rp0.pop("chassis")
    assert props == {"id": "rp0", **rp0}
    # Everything else: the vfio-user device, the GHCx port, the secret and the VM id,
    # exactly as the launcher passes them.
    wanted = [p for p in _pairs(launcher_argv, "-device", "-chardev", "-fw_cfg")
              if not p[1].startswith("virtio-9p-pci")]
    assert rest == wanted
    assert any('"vfio-user-pci"' in v for _, v in rest)
    assert [o for o, _ in rest].count("-fw_cfg") == 2


def test_native_parts_match(domain: ET.Element, launcher_argv: list[str]) -> None:
    argv = launcher_argv
    # memfd, shared, of the launcher's size
    backing = domain.find("memoryBacking")
    assert backing is not None
    assert backing.find("source").attrib["type"] == "memfd"            # type: ignore[union-attr]
    assert backing.find("access").attrib["mode"] == "shared"           # type: ignore[union-attr]
    mem = domain.find("memory")
    assert mem is not None and mem.attrib["unit"] == "MiB"
    backend = _props(argv[argv.index("-object") + 1])
    assert backend["driver"] == "memory-backend-memfd" and backend["share"] == "on"
    assert backend["size"] == f"{mem.text}M" == argv[argv.index("-m") + 1]
    assert domain.findtext("vcpu") == argv[argv.index("-smp") + 1]
    # q35, kernel boot, the kernel command line
    os_ = domain.find("os")
    assert os_ is not None
    assert os_.find("type").attrib["machine"] == "q35"                 # type: ignore[union-attr]
    assert 'type = "q35"' in CONFIG_FILE.read_text()
    assert os_.findtext("kernel") == argv[argv.index("-kernel") + 1]
    assert os_.findtext("initrd") == argv[argv.index("-initrd") + 1]
    assert os_.findtext("cmdline") == argv[argv.index("-append") + 1]
    # TCG, the cpu model max, no reboot
    assert domain.attrib["type"] == "qemu" and argv[argv.index("-accel") + 1] == "tcg"
    assert domain.find("cpu").attrib["mode"] == "maximum"              # type: ignore[union-attr]
    assert argv[argv.index("-cpu") + 1] == "max"
    assert "-no-reboot" in argv and domain.findtext("on_reboot") == "destroy"
    # 9p shares: tag, folder, read-only, security_model=none (libvirt's accessmode squash)
    fsdevs = {}
    for _, value in _pairs(argv, "-fsdev"):
        p = _props(value)
        assert p["driver"] == "local"
        fsdevs[p["id"]] = (p["path"], p.get("readonly") == "on", p["security_model"])
    shares = {}
    for fs in domain.iter("filesystem"):
        assert fs.attrib["accessmode"] == "squash"
        shares[fs.find("target").attrib["dir"]] = (                    # type: ignore[union-attr]
            fs.find("source").attrib["dir"], fs.find("readonly") is not None, "none")  # type: ignore[union-attr]
    assert shares == fsdevs
    # the serial console to a file
    serial = domain.find("devices/serial")
    assert serial is not None and serial.attrib["type"] == "file"
    assert f"file:{serial.find('source').attrib['path']}" == argv[argv.index("-serial") + 1]  # type: ignore[union-attr]


def test_validates_against_libvirts_schema() -> None:
    tool = shutil.which("virt-xml-validate")
    if tool is None:
        pytest.skip("virt-xml-validate (libvirt-clients) is not installed: the schema check "
                    "needs libvirt's own schemas")
    proc = subprocess.run([tool, str(DOMAIN_XML), "domain"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
