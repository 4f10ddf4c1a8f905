"""Minimal Python server speaking the vfio-user header: the baseline for server_roundtrip.py.

It reads a header and its payload and answers with a reply header, echoing the payload plus
``count`` zero bytes when the payload looks like a region access: no validation, no dispatch.
"""

from __future__ import annotations

import socket
import struct
import sys

HEADER = struct.Struct("<HHIII")
ACCESS = struct.Struct("<QII")
REPLY = 1


def main(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    print("LISTENING", flush=True)
    conn, _ = listener.accept()
    head = bytearray(HEADER.size)
    view = memoryview(head)
    while True:
        got = 0
        while got < HEADER.size:
            n = conn.recv_into(view[got:])
            if not n:
                return
            got += n
        msg_id, command, size, _flags, _err = HEADER.unpack(head)
        payload = conn.recv(size - HEADER.size, socket.MSG_WAITALL) if size > HEADER.size else b""
        data = payload
        if len(payload) == ACCESS.size:
            data = payload + bytes(ACCESS.unpack(payload)[2])
        conn.sendall(HEADER.pack(msg_id, command, HEADER.size + len(data), REPLY, 0) + data)


if __name__ == "__main__":
    main(sys.argv[1])
