"""host layer: PCI device discovery (macOS IORegistry dumps, Linux sysfs), slot resolution,
doctor checks and vfio-pci rebinding; the bottom of the engine side (docs/ARCHITECTURE.md).
"""
