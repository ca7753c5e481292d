"""``vfiouser-vmem qemu-args --format libvirt``: the devices of a
configuration as a libvirt domain (docs/libvirt.md).

libvirt has no device XML for vfio-user, so each device is a ``-device``
argument in ``<qemu:commandline>`` (libvirt's escape hatch; the domain is
then "tainted: custom-argv", which libvirt logs and which changes nothing
else).  What the devices need of the rest of the domain is said in libvirt's
own elements, so that libvirt keeps managing it:

- ``<memoryBacking>`` memfd, shared: the server reads the virtqueues in guest
  RAM (QEMU's ``memory-backend-memfd,share=on`` of the shell format);
- ``<features><acpi/>``: without it libvirt 9.0 passes ``-no-acpi``, which
  QEMU 11 refuses for q35, and virtio-mem's NUMA node is an ACPI proximity
  domain anyway;
- ``<cpu><numa>`` cells, ``memAccess='shared'``, when a device has a node
  (the rule of ``guest_layout``);
- ``<cpu><maxphysaddr>`` when the memory BARs need more than 40 address bits.

The output is a whole domain, valid XML, that a user completes (disks,
network, console: a comment marks the place) or whose parts they paste into
their own domain.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from vfiouser_vmem.cli._config import guest_layout, phys_bits_note, vfio_user_device

__all__ = ["QEMU_NS", "libvirt_domain"]

#: libvirt's namespace of QEMU pass-through elements (formatdomain, "QEMU command-line passthrough").
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def _comment_text(text: str) -> str:
    """``text`` as an XML comment may hold it: no ``--`` (XML 1.0 section
    2.5; ElementTree does not check), padded with spaces."""
    while "--" in text:
        text = text.replace("--", "- -")
    return f" {text} "


def _cpus_of_cell(cell: int, cells: int, vcpus: int) -> str | None:
    """vCPUs ``cell`` gets when ``vcpus`` are spread over ``cells`` in
    contiguous ranges (as QEMU's round robin would give each a share); None
    for a cell left without (more cells than vCPUs)."""
    if cell >= vcpus:
        return None
    per, extra = divmod(vcpus, min(cells, vcpus))
    first = cell * per + min(cell, extra)
    last = first + per + (1 if cell < extra else 0) - 1
    return str(first) if first == last else f"{first}-{last}"


def libvirt_domain(configs: list, ram_bytes: int, *, name: str = "vmem-guest", vcpus: int = 2,
                   domain_type: str = "kvm") -> tuple[str, list[str]]:
    """The domain XML for a guest of ``configs`` and the notes for people."""
    layout = guest_layout(configs, ram_bytes)
    ET.register_namespace("qemu", QEMU_NS)
    domain = ET.Element("domain", {"type": domain_type})
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="KiB").text = str(ram_bytes // 1024)
    ET.SubElement(domain, "vcpu").text = str(vcpus)
    backing = ET.SubElement(domain, "memoryBacking")
    ET.SubElement(backing, "source", type="memfd")
    ET.SubElement(backing, "access", mode="shared")
    os_ = ET.SubElement(domain, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="q35").text = "hvm"
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if layout.numa_ram is not None or layout.phys_bits is not None:
        cpu = ET.SubElement(domain, "cpu")
        if layout.phys_bits is not None:
            ET.SubElement(cpu, "maxphysaddr", mode="emulate", bits=str(layout.phys_bits))
        if layout.numa_ram is not None:
            numa = ET.SubElement(cpu, "numa")
            for node, part in layout.numa_ram:
                cell = {"id": str(node), "memory": str(part // 1024), "unit": "KiB", "memAccess": "shared"}
                cpus = _cpus_of_cell(node, len(layout.numa_ram), vcpus)
                if cpus is not None:
                    cell["cpus"] = cpus
                ET.SubElement(numa, "cell", cell)
    devices = ET.SubElement(domain, "devices")
    devices.append(ET.Comment(" the guest's disks, network and console go here "))
    commandline = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
    for c in configs:
        commandline.append(ET.Comment(_comment_text(f"virtio-mem device {c.id}: the server's socket {c.socket}")))
        ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value="-device")
        ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=vfio_user_device(c))
    ET.indent(domain)
    notes = []
    if layout.numa_ram is not None and len(layout.numa_ram) > 1:
        notes.append(f"guest RAM is split over NUMA cells 0-{len(layout.numa_ram) - 1} so that the guest knows "
                     "them, with the vCPUs spread over them (cpus=)")
    if layout.phys_bits is not None:
        notes.append(phys_bits_note(layout, f"<cpu><maxphysaddr mode='emulate' bits='{layout.phys_bits}'/> (with "
                                            "KVM: mode='passthrough')"))
    return ET.tostring(domain, encoding="unicode") + "\n", notes
