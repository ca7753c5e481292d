"""Benchmarks: vfiouser-vmem against QEMU's own virtio-mem-pci (bench/README.md)."""
