"""The vfio-user listener: a private UNIX socket, one client at a time, served until stopped.

The roles live beside it: :mod:`~egpu.vfio_user.dispatcher` checks and runs requests (its
docstring holds the threat model), :mod:`~egpu.vfio_user.connection` frames messages with fds,
:mod:`~egpu.vfio_user.remote_dma` carries server-to-client DMA.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
import threading
from pathlib import Path

from egpu.devices.base import DeviceBackend, Interrupts
from egpu.dma import GuestMemory
from egpu.errors import ConflictError, DeviceServerError
from egpu.vfio_user import protocol as p
from egpu.vfio_user.connection import Connection
from egpu.vfio_user.dispatcher import SERVER_CAPABILITIES, Dispatcher
from egpu.vfio_user.remote_dma import RemoteDma

log = logging.getLogger("egpu.vfio_user")


def prepare_socket_dir(path: Path) -> None:
    """Make sure the socket's directory exists and is private (0700, ours)."""
    # The protocol leaves AF_UNIX access control to the socket file's permissions
    # (QEMU docs/interop/vfio-user.rst, "Authentication").
    parent = path.parent
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = parent.stat()
    if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise DeviceServerError(
            f"socket directory {parent} is not private",
            hint="use a directory only you can open (chmod 700)",
        )
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise DeviceServerError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket of a server that is gone
        else:
            raise ConflictError(f"a server is already listening on {path}")
        finally:
            probe.close()


class VfioUserServer:
    """Serves one device (one PCI function) on a UNIX socket, one client at a time.

    ``serve_forever()`` blocks until ``stop()`` (callable from any thread or a signal handler).
    """

    def __init__(
        self,
        device: DeviceBackend,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        capabilities: p.Capabilities = SERVER_CAPABILITIES,
    ) -> None:
        self.device = device
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.description = device.describe()
        self._remote = RemoteDma()
        self.memory = GuestMemory(self._remote)
        self.interrupts = Interrupts(self.description)
        device.attach(self.memory, self.interrupts)
        self.dispatcher = Dispatcher(device, self.memory, self.interrupts, self.description,
                                     capabilities)
        self._remote.dispatcher = self.dispatcher
        self._listener: socket.socket | None = None
        self._client: socket.socket | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self.clients_served = 0

    def listen(self) -> None:
        """Bind the private socket (0600 in a 0700 directory); idempotent."""
        if self._listener is not None:
            return
        if self.socket_path is None:
            raise DeviceServerError("no socket path to listen on")
        prepare_socket_dir(self.socket_path)
        # Bound under a dot name, renamed once listening: whoever waits for the path to exist
        # (the supervisor, then QEMU) could otherwise connect between bind and listen and be
        # refused. One byte longer than the final path, within the VM store's socket margin.
        staging = self.socket_path.with_name("." + self.socket_path.name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()  # left by a server that died mid-listen; the dir is ours
            sock.bind(str(staging))
            os.chmod(staging, 0o600)
            sock.listen(1)
            os.rename(staging, self.socket_path)
        except OSError as e:
            sock.close()
            with contextlib.suppress(OSError):
                staging.unlink()
            raise DeviceServerError(f"cannot listen on {self.socket_path}: {e}") from e
        self._listener = sock

    def serve_connection(self, sock: socket.socket) -> None:
        """Serve one already-connected client until it disconnects (tests use socketpair)."""
        conn = Connection(sock, self.dispatcher, self._remote)
        self._client = sock
        self._remote.connection = conn
        try:
            if not self._stop.is_set():
                conn.run()
        finally:
            self._remote.connection = None
            self._client = None
            self.dispatcher.client_gone()
            self.clients_served += 1

    def serve_forever(self) -> None:
        """Accept and serve clients one after another until :meth:`stop`."""
        self.listen()
        assert self._listener is not None
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([self._listener.fileno(), self._wake_r], [], [])
                if self._wake_r in ready or self._stop.is_set():
                    break
                try:
                    client, _addr = self._listener.accept()
                except OSError:
                    continue
                log.info("client connected")
                try:
                    self.serve_connection(client)
                finally:
                    client.close()
        finally:
            self.close()

    def stop(self) -> None:
        """Ask the server to finish: the current client is cut off and serve_forever returns."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        client = self._client
        if client is not None:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Remove the socket file and release the listener."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self.socket_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.socket_path.unlink()

    def start_thread(self) -> threading.Thread:
        """Listen now, then serve in a daemon thread; call :meth:`stop` and join to end it."""
        self.listen()
        thread = threading.Thread(target=self.serve_forever, name="vfio-user", daemon=True)
        thread.start()
        return thread
