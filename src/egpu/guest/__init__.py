"""guest layer: the built-in guest (a Debian kernel and a busybox initramfs built from Debian
packages), its self-checks and its serial-console protocol with the host (docs/ARCHITECTURE.md).
"""
