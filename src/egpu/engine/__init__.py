"""engine layer: find or provision QEMU, probe it, and build the QEMU command for each GPU
path (apple, vfio, user, none); pure argv builders over host discovery (docs/ARCHITECTURE.md).
"""
