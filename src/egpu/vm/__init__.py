"""vm layer: one directory per VM, its supervisor, the QEMU and device-server processes, QMP and
the console; status is derived from the directory (docs/ARCHITECTURE.md).
"""
