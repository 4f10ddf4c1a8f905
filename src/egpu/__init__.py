"""egpu: use a GPU that lives outside your machine's OS, through a Linux VM.
Its layers (cli -> vm -> engine/host, images, guest, vfio_user -> devices -> pci, dma), what
each owns and where a change goes: docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
