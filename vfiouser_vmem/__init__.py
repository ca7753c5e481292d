"""vfiouser-vmem: an out-of-process virtio-mem PCI device for QEMU's vfio-user-pci.

Layers, each depending only on the ones before it:

- ``vfu``: thin cffi binding to libvfio-user (vfio-user protocol);
- ``blocks``: the C helper of ``csrc/`` (block bitmap, discard loop);
- ``backend``: the memory backend (memfd) that the memory BAR exposes;
- ``virtio_pci`` / ``virtqueue``: the virtio 1.x modern PCI transport;
- ``device``: the virtio-mem device model (pure logic, no sockets);
- ``server`` / ``qmp``: the trio server and its QMP control plane;
- ``cli``: the command line.
"""

__version__ = "0.1.0"
