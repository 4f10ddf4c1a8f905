"""vfio_user layer (see DESIGN.md).

``protocol`` is the pure codec; the server is split by role: ``dispatcher`` (checks and runs one
request), ``connection`` (framing with fds), ``remote_dma`` (server-to-client DMA), ``server``
(the listener). ``client`` is a small client for tests and tools.
"""
