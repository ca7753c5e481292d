"""``qemu-args --format libvirt`` (cli/_libvirt.py): the domain XML; a real
libvirt defines and runs it in integration/test_libvirt.py."""

from __future__ import annotations

import json
import re
import subprocess
import xml.etree.ElementTree as ET

import pytest

from proc_util import EXE
from vfiouser_vmem.cli._config import build_configs, device_spec, object_spec, qemu_args
from vfiouser_vmem.cli._libvirt import QEMU_NS, libvirt_domain

GiB = 1 << 30
Q = f"{{{QEMU_NS}}}"


def configs(*devices: str):
    objects = [object_spec(f"memory-backend-memfd,id=m{i},size={size}") for i, (size, _) in enumerate(devices)]
    specs = [device_spec(f"id=vm{i},memdev=m{i},socket=/run/vm{i}.sock{extra}")
             for i, (_, extra) in enumerate(devices)]
    return build_configs(objects, specs, qmp_path=None, need_directories=False)


def device_args(domain: ET.Element) -> list[str]:
    return [a.get("value") for a in domain.find(f"{Q}commandline").findall(f"{Q}arg")]


def test_one_device_a_whole_valid_domain_with_what_the_device_needs():
    text, notes = libvirt_domain(configs(("8G", "")), 2 * GiB, name="g1", vcpus=4)
    domain = ET.fromstring(text)
    assert domain.tag == "domain" and domain.get("type") == "kvm"
    assert domain.findtext("name") == "g1" and domain.findtext("vcpu") == "4"
    assert domain.find("memory").get("unit") == "KiB" and int(domain.findtext("memory")) == 2 * GiB // 1024
    assert domain.find("memoryBacking/source").get("type") == "memfd"
    assert domain.find("memoryBacking/access").get("mode") == "shared"
    assert domain.find("features/acpi") is not None
    assert domain.find("os/type").get("machine") == "q35"
    assert domain.find("cpu") is None and notes == []  # no NUMA node, small BAR: nothing to say
    # The same -device as the shell and json formats.
    argv, _ = qemu_args(configs(("8G", "")), 2 * GiB)
    assert device_args(domain) == argv[argv.index("-device"):]
    assert json.loads(device_args(domain)[1]) == {"driver": "vfio-user-pci",
                                                  "socket": {"type": "unix", "path": "/run/vm0.sock"}}


def test_devices_in_order_with_numa_cells_and_phys_bits():
    text, notes = libvirt_domain(configs(("512G", ",node=2"), ("8G", ",node=1")), 3 * GiB, vcpus=2)
    domain = ET.fromstring(text)
    cells = domain.findall("cpu/numa/cell")
    assert [c.get("id") for c in cells] == ["0", "1", "2"]
    assert all(c.get("memAccess") == "shared" and c.get("unit") == "KiB" for c in cells)
    assert sum(int(c.get("memory")) for c in cells) == 3 * GiB // 1024
    # Two vCPUs over three cells: the last has none (libvirt allows a cell without CPUs).
    assert [c.get("cpus") for c in cells] == ["0", "1", None]
    assert domain.find("cpu/maxphysaddr").attrib == {"mode": "emulate", "bits": "46"}
    paths = [json.loads(a)["socket"]["path"] for a in device_args(domain)[1::2]]
    assert paths == ["/run/vm0.sock", "/run/vm1.sock"]
    assert any("NUMA cells 0-2" in n for n in notes) and any("maxphysaddr" in n for n in notes)


@pytest.mark.parametrize("vcpus, cells, expected", [
    (4, 2, ["0-1", "2-3"]), (3, 2, ["0-1", "2"]), (1, 3, ["0", None, None]), (5, 3, ["0-1", "2-3", "4"]),
])
def test_vcpus_are_spread_over_the_cells_contiguously(vcpus, cells, expected):
    text, _ = libvirt_domain(configs(("1G", f",node={cells - 1}")), cells * GiB, vcpus=vcpus)
    assert [c.get("cpus") for c in ET.fromstring(text).findall("cpu/numa/cell")] == expected


def test_text_that_xml_would_misread_is_escaped():
    objects = [object_spec("memory-backend-memfd,id=m0,size=1G")]
    path = "/run/a&b<c>'\"--x---.sock"
    devices = [device_spec(f"id=vm--0,memdev=m0,socket={path}")]
    text, _ = libvirt_domain(build_configs(objects, devices, qmp_path=None, need_directories=False), GiB,
                             name="x&y")
    domain = ET.fromstring(text)  # well-formed
    assert domain.findtext("name") == "x&y"
    assert json.loads(device_args(domain)[1])["socket"]["path"] == path
    # XML 1.0: a comment holds no "--" (ElementTree would write one without a word).
    comments = re.findall(r"<!--(.*?)-->", text, re.S)
    assert len(comments) == 2 and all("--" not in c and not c.endswith("-") for c in comments)


def test_the_command_prints_the_domain_and_the_notes_apart():
    result = subprocess.run([*EXE, "qemu-args", "--format", "libvirt", "--socket", "/run/v.sock", "--size", "512G",
                             "--ram", "1G", "--name", "vm-a"], capture_output=True, text=True, check=True)
    assert ET.fromstring(result.stdout).findtext("name") == "vm-a"
    assert result.stderr.startswith("note: memory BARs of 512G")
