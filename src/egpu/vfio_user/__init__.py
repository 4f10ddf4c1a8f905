"""vfio_user layer: the vfio-user wire format (pure) and the server that validates every client
request before a device model sees it (docs/ARCHITECTURE.md, docs/THREAT_MODEL.md).
"""
