"""vfio_user layer: the vfio-user wire format (pure) and the server that validates every client
request before a device model sees it (docs/ARCHITECTURE.md, docs/THREAT_MODEL.md).

``protocol`` is the pure codec; the server is split by role: ``dispatcher`` (checks and runs one
request), ``connection`` (framing with fds), ``remote_dma`` (server-to-client DMA), ``server``
(the listener). ``client`` is a small client for tests and tools.
"""
