"""The vfio-user server: framing, fds, validation and dispatch to a DeviceBackend.

Threat model (the whole of it, with tests: docs/THREAT_MODEL.md). Trust zones and where each
crossing is checked:

- guest (runs arbitrary code from its first instruction) -> device model: every address the guest
  programs (DMA targets, queue bases) goes through :class:`egpu.dma.GuestMemory`, which refuses
  anything outside what the client mapped; indices and sizes in guest-written registers are the
  device model's to check (devices/*.py), masked rather than honoured when out of range.
- vfio-user client (QEMU, or anything that can open the 0600 socket in its 0700 directory) ->
  this server: untrusted for every byte and fd it sends; checked here, below.
- device server -> host: the server holds only its socket, the client's mapped memory and the
  files the host tool gave it (backing files, shared memory it created).

Each client request is checked in
:meth:`Dispatcher.handle`'s per-command decoder, in one place and in this order, before any
allocation or device call: message length >= struct size; count <= negotiated maximum; payload
length == count; index < number (strictly); offset + count <= size; then device state. Unknown
flag bits are rejected; unknown commands get ENOSYS. Framing faults (a size smaller than the
header or larger than the largest legal message) close the connection. The device sees only
validated, in-range requests. Residual risk: a client that shrinks the file behind a DMA_MAP after
mapping it can make a later access raise SIGBUS; QEMU seals its memfd RAM against that.
"""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import logging
import os
import select
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from egpu.devices.base import (
    DeviceBackend,
    DeviceDescription,
    Interrupts,
    IrqIndex,
    is_eventfd,
)
from egpu.dma import DmaAccessError, DmaMapError, DmaProt, GuestMemory
from egpu.errors import ConflictError, DeviceServerError
from egpu.vfio_user import protocol as p

log = logging.getLogger("egpu.vfio_user")

SERVER_CAPABILITIES = p.Capabilities(
    max_msg_fds=16,
    max_data_xfer_size=1 << 20,
    max_dma_maps=4096,
    pgsizes=4096,
    write_multiple=True,
)
REMOTE_DMA_TIMEOUT_S = 10.0
_FD_SIZE = array.array("i").itemsize
_READ_REPLY_BASE = p.HEADER_SIZE + p.REGION_ACCESS.size
_NO_FDS: list[int] = []  # shared, never mutated
_CMD_REGION_READ = int(p.Command.REGION_READ)  # enum member lookups cost on the hot path
_CMD_REGION_WRITE = int(p.Command.REGION_WRITE)
_HEADER_PACK = p.HEADER.pack
_HEADER_UNPACK_FROM = p.HEADER.unpack_from
_HEADER_SIZE = p.HEADER_SIZE
_ACCESS_UNPACK_FROM = p.REGION_ACCESS.unpack_from
_ACCESS_SIZE = p.REGION_ACCESS.size
_BAD_COMMAND_FLAGS = ~p.KNOWN_HEADER_FLAGS | p.FLAG_ERROR
_FLAG_TYPE_MASK = p.FLAG_TYPE_MASK
_FLAG_NO_REPLY = p.FLAG_NO_REPLY
_TYPE_REPLY = p.TYPE_REPLY
# Plain ints: socket's IntFlag members cost an enum call per use on the hot path.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)


@dataclass
class _Session:
    """Per-connection negotiated state; a new client starts from scratch."""

    negotiated: bool = False
    client: p.Capabilities = field(default_factory=p.Capabilities)
    write_multiple: bool = False


Reply = tuple[bytes, list[int]]  # whole reply message, fds to send with it (borrowed)
Payload = memoryview | bytes  # a view into the receive buffer, or a copy of it


class Dispatcher:
    """Validates and executes one request at a time against a device (no socket I/O)."""

    def __init__(
        self,
        device: DeviceBackend,
        memory: GuestMemory,
        interrupts: Interrupts,
        description: DeviceDescription,
        capabilities: p.Capabilities = SERVER_CAPABILITIES,
    ) -> None:
        self.device = device
        self.memory = memory
        self.interrupts = interrupts
        self.description = description
        self.caps = capabilities
        self.session = _Session()
        self._negotiated = False  # mirrors session.negotiated for the hot path
        self._max_xfer = capabilities.max_data_xfer_size
        self.max_message = p.HEADER_SIZE + p.REGION_ACCESS.size + capabilities.max_data_xfer_size
        # Region table flattened for the hot path: index -> (size, readable, writable).
        self._regions: list[tuple[int, bool, bool] | None] = [
            None if r is None else (r.size, r.readable, r.writable)
            for r in (description.region(i) for i in range(description.num_regions))
        ]
        self._handlers: dict[int, Callable[[int, Payload, list[int]], Reply]] = {
            p.Command.VERSION: self._version,
            p.Command.DMA_MAP: self._dma_map,
            p.Command.DMA_UNMAP: self._dma_unmap,
            p.Command.DEVICE_GET_INFO: self._device_get_info,
            p.Command.DEVICE_GET_REGION_INFO: self._get_region_info,
            p.Command.DEVICE_GET_REGION_IO_FDS: self._get_region_io_fds,
            p.Command.DEVICE_GET_IRQ_INFO: self._get_irq_info,
            p.Command.DEVICE_SET_IRQS: self._set_irqs,
            p.Command.REGION_READ: self._region_read,
            p.Command.REGION_WRITE: self._region_write,
            p.Command.DEVICE_RESET: self._device_reset,
            p.Command.REGION_WRITE_MULTI: self._region_write_multi,
            p.Command.DEVICE_FEATURE: self._device_feature,
            p.Command.MIG_DATA_READ: self._migration,
            p.Command.MIG_DATA_WRITE: self._migration,
        }

    # -- entry point ----------------------------------------------------------------------------

    def handle(self, msg_id: int, command: int, flags: int, payload: Payload,
               fds: list[int]) -> Reply:
        """Execute one command message; returns the reply. Fds still in ``fds`` afterwards are
        closed by the caller (handlers that keep an fd replace it with -1)."""
        try:
            handler = self._handlers.get(command)
            if flags & _BAD_COMMAND_FLAGS or handler is None or not self._negotiated:
                self._check_envelope(command, flags, handler)
            assert handler is not None
            return handler(msg_id, payload, fds)
        except p.ProtocolError as e:
            log.debug("command %d refused: %s", command, e)
            return p.error_header(msg_id, command, e.errno), []
        except DmaMapError as e:
            log.debug("command %d refused: %s", command, e)
            return p.error_header(msg_id, command, e.errno), []
        except (DmaAccessError, DeviceServerError) as e:
            log.warning("device failed command %d: %s", command, e)
            return p.error_header(msg_id, command, errno.EIO), []
        except Exception:
            # A device-model bug must not take the server down with it; the client sees EIO.
            log.exception("device raised on command %d", command)
            return p.error_header(msg_id, command, errno.EIO), []

    def _check_envelope(self, command: int, flags: int, handler: object) -> None:
        """Refuse bad header flags, unknown commands, and anything before VERSION."""
        if flags & _BAD_COMMAND_FLAGS:
            raise p.ProtocolError(errno.EINVAL, "unknown or invalid header flags")
        if handler is None:
            raise p.ProtocolError(errno.ENOSYS, f"unsupported command {command}")
        if not self.session.negotiated and command != p.Command.VERSION:
            raise p.ProtocolError(errno.EINVAL, "VERSION must come first")

    # -- shared checks (the one place, in the order the module docstring gives) -----------------

    @staticmethod
    def _need(payload: Payload, size: int) -> None:
        if len(payload) < size:
            raise p.ProtocolError(errno.EINVAL, f"message payload {len(payload)} < {size} bytes")

    def _check_count(self, count: int) -> None:
        if count > self.caps.max_data_xfer_size:
            raise p.ProtocolError(errno.E2BIG, f"count {count} exceeds max_data_xfer_size")

    def _check_region(self, index: int, offset: int, count: int, write: bool) -> None:
        if index >= len(self._regions):
            raise p.ProtocolError(errno.EINVAL, f"region index {index} out of range")
        info = self._regions[index]
        if info is None:
            raise p.ProtocolError(errno.EINVAL, f"region {index} does not exist")
        size, readable, writable = info
        if offset + count > size:
            raise p.ProtocolError(errno.ERANGE, f"access {offset:#x}+{count} beyond region {index}")
        if not (writable if write else readable):
            raise p.ProtocolError(errno.EACCES, f"region {index} is not "
                                  f"{'writable' if write else 'readable'}")

    # -- commands -----------------------------------------------------------------------------

    def _version(self, msg_id: int, payload: Payload, fds: list[int]) -> Reply:
        self._need(payload, p.VERSION.size)
        if self.session.negotiated:
            raise p.ProtocolError(errno.EINVAL, "VERSION already negotiated")
        major, _minor = p.VERSION.unpack_from(payload)
        if major != p.PROTOCOL_MAJOR:
            raise p.ProtocolError(errno.ENOTSUP, f"protocol major {major} not supported")
        client = p.parse_capabilities(bytes(payload[p.VERSION.size :]))
        ours = p.Capabilities(
            max_msg_fds=self.caps.max_msg_fds,
            max_data_xfer_size=self.caps.max_data_xfer_size,
            max_dma_maps=self.caps.max_dma_maps,
            pgsizes=self.caps.pgsizes,
            write_multiple=self.caps.write_multiple and client.write_multiple,
        )
        self.session = _Session(True, client, ours.write_multiple)
        self._negotiated = True
        body = p.VERSION.pack(p.PROTOCOL_MAJOR, p.PROTOCOL_MINOR) + ours.to_json()
        return p.reply_header(msg_id, p.Command.VERSION, len(body)) + body, []

    def _dma_map(self, msg_id: int, payload: Payload, fds: list[int]) -> Reply:
        self._need(payload, p.DMA_MAP.size)
        _argsz, flags, offset, address, size = p.DMA_MAP.unpack_from(payload)
        if flags & ~p.DMA_MAP_KNOWN_FLAGS:
            raise p.ProtocolError(errno.EINVAL, f"unknown DMA_MAP flags {flags:#x}")
        if len(fds) > 1:
            raise p.ProtocolError(errno.EINVAL, "DMA_MAP carries at most one fd")
        if size == 0 or address + size > 1 << 64:
            raise p.ProtocolError(errno.EINVAL, "DMA_MAP range is empty or wraps")
        if len(self.memory.ranges()) >= self.caps.max_dma_maps:
            raise p.ProtocolError(errno.ENOSPC, "too many DMA maps")
        prot = DmaProt(flags & (p.DMA_FLAG_READ | p.DMA_FLAG_WRITE))
        rng = self.memory.add(address, size, prot, fds[0] if fds else None, offset)
        self.device.dma_mapped(rng)
        return p.reply_header(msg_id, p.Command.DMA_MAP, 0), []

    def _dma_unmap(self, msg_id: int, payload: Payload, fds: list[int]) -> Reply:
        self._need(payload, p.DMA_UNMAP.size)
        _argsz, flags, address, size = p.DMA_UNMAP.unpack_from(payload)
        if flags & ~p.DMA_UNMAP_FLAG_ALL:
            raise p.ProtocolError(errno.EINVAL, f"unknown DMA_UNMAP flags {flags:#x}")
        body = bytes(payload[: p.DMA_UNMAP.size])
        if flags & p.DMA_UNMAP_FLAG_ALL:
            # QEMU's vfio-user container sends this when it drops every mapping; as in the
            # kernel, the range fields must then be zero.
            if address or size:
                raise p.ProtocolError(errno.EINVAL, "DMA_UNMAP of all with a range")
            for rng in self.memory.ranges():
                self.device.dma_unmapped(rng)
                self.memory.remove(rng.iova, rng.size)
            return p.reply_header(msg_id, p.Command.DMA_UNMAP, len(body)) + body, []
        match = [r for r in self.memory.ranges() if r.iova == address and r.size == size]
        if not match:
            raise p.ProtocolError(errno.ENOENT, f"no DMA map is exactly {address:#x}+{size:#x}")
        # The device stops using the range first; remove() then waits for pinned views, so no
        # reference is left when the reply goes out (vfio-user.rst, VFIO_USER_DMA_UNMAP).
        self.device.dma_unmapped(match[0])
        self.memory.remove(address, size)
        return p.reply_header(msg_id, p.Command.DMA_UNMAP, len(body)) + body, []

    def _device_get_info(self, msg_id: int, payload: Payload, fds: list[int]) -> Reply:
        self._need(payload, p.DEVICE_INFO.size)
        argsz = p.DEVICE_INFO.unpack_from(payload)[0]
        if argsz < p.DEVICE_INFO.size:
            raise p.ProtocolError(errno.EINVAL, f"argsz {argsz} too small")
        flags = p.DEVICE_FLAGS_PCI | (p.DEVICE_FLAGS_RESET if self.description.resettable else 0)
        body = p.DEVICE_INFO.pack(p.DEVICE_INFO.size, flags, self.description.num_regions,
                                  self.description.num_irqs)
        return p.reply_header(msg_id, p.Command.DEVICE_GET_INFO, len(body)) + body, []

    def _get_region_info(self, msg_id: int, payload: Payload, fds: list[int]) -> Reply:
        self._need(payload, p.REGION_INFO.size)
        argsz, _flags, index, _cap, _size, _offset = p.REGION_INFO.unpack_from(payload)
        if argsz < p.REGION_INFO.size:
            raise p.ProtocolError(errno.EINVAL, f"argsz {argsz} too small")
        if index >= self.description.num_regions:
            raise p.ProtocolError(errno.EINVAL, f"region index {index} out of range")
        region = self.description.region(index)
        if region is None:
            body = p.REGION_INFO.pack(p.REGION_INFO.size, 0, index, 0, 0, 0)
            return p.reply_header(msg_id, p.Command.DEVICE_GET_REGION_INFO, len(body)) + body, []
        flags = (p.REGION_FLAG_READ if region.readable else 0) | (
            p.REGION_FLAG_WRITE if region.writable else 0
        )
        areas: tuple[tuple[int, int], ...] = ()
        send: list[int] = []
        if region.shm_fd is not None:
            flags |= p.REGION_FLAG_MMAP
            if region.mmap_areas:
                areas = tuple((a.offset, a.size) for a in region.mmap_areas)
        body, complete = p.pack_region_info(index, flags, region.size, region.shm_offset, areas,
                                            argsz)
        if region.shm_fd is not None and complete:
            send = [region.shm_fd]
        return p.reply_header(msg_id, p.Command.DEVICE_GET_REGION_INFO, len(body)) + body, send

    def _get_region_io_fds(self, msg_id: int, payload: Payload, fds: list[int]) -> Reply:
        self._need(payload, p.REGION_IO_FDS.size)
        argsz, flags, index, _count = p.REGION_IO_FDS.unpack_from(payload)
        if argsz < p.REGION_IO_FDS.size or flags:
            raise p.ProtocolError(errno.EINVAL, "bad argsz or flags")
        if index >= self.description.num_regions:
            raise p.ProtocolError(errno.EINVAL, f"region index {index} out of range")
        # No region offers ioeventfds: every trapped access goes through REGION_WRITE.
        body = p.REGION_IO_FDS.pack(p.REGION_IO_FDS.size, 0, index, 0)
        return p.reply_header(msg_id, p.Command.DEVICE_GET_REGION_IO_FDS, len(body)) + body, []

    def _get_irq_info(self, msg_id: int, payload: Payload, fds: list[int]) -> Reply:
        self._need(payload, p.IRQ_INFO.size)
        argsz, _flags, index, _count = p.IRQ_INFO.unpack_from(payload)
        if argsz < p.IRQ_INFO.size:
            raise p.ProtocolError(errno.EINVAL, f"argsz {argsz} too small")
        if index >= self.description.num_irqs:
            raise p.ProtocolError(errno.EINVAL, f"IRQ index {index} out of range")
        count = self.description.irq_count(index)
        flags = p.IRQ_INFO_EVENTFD if count else 0
        if index == IrqIndex.INTX and count:
            flags |= p.IRQ_INFO_MASKABLE | p.IRQ_INFO_AUTOMASKED
        elif index == IrqIndex.MSI and count:
            flags |= p.IRQ_INFO_NORESIZE
        body = p.IRQ_INFO.pack(p.IRQ_INFO.size, flags, index, count)
        return p.reply_header(msg_id, p.Command.DEVICE_GET_IRQ_INFO, len(body)) + body, []

    def _set_irqs(self, msg_id: int, payload: Payload, fds: list[int]) -> Reply:
        self._need(payload, p.IRQ_SET.size)
        _argsz, flags, index, start, count = p.IRQ_SET.unpack_from(payload)
        if flags & ~(p.IRQ_SET_DATA_MASK | p.IRQ_SET_ACTION_MASK_ALL):
            raise p.ProtocolError(errno.EINVAL, f"unknown SET_IRQS flags {flags:#x}")
        data, action = flags & p.IRQ_SET_DATA_MASK, flags & p.IRQ_SET_ACTION_MASK_ALL
        if data.bit_count() != 1 or action.bit_count() != 1:
            raise p.ProtocolError(errno.EINVAL, "SET_IRQS needs exactly one data and one action")
        if data == p.IRQ_SET_DATA_BOOL and len(payload) != p.IRQ_SET.size + count:
            raise p.ProtocolError(errno.EINVAL, "SET_IRQS bool array length != count")
        if data != p.IRQ_SET_DATA_BOOL and len(payload) != p.IRQ_SET.size:
            raise p.ProtocolError(errno.EINVAL, "SET_IRQS carries unexpected data")
        if data == p.IRQ_SET_DATA_EVENTFD and len(fds) not in (0, count):
            raise p.ProtocolError(errno.EINVAL, f"SET_IRQS has {len(fds)} fds for {count}")
        if index >= self.description.num_irqs:
            raise p.ProtocolError(errno.EINVAL, f"IRQ index {index} out of range")
        vectors = self.interrupts.count(index)
        disable_all = count == 0 and data == p.IRQ_SET_DATA_NONE
        if disable_all and (start or action != p.IRQ_SET_ACTION_TRIGGER):
            raise p.ProtocolError(errno.EINVAL, "count 0 is only for disabling an index")
        if start + count > vectors:
            raise p.ProtocolError(errno.ERANGE, f"vectors {start}+{count} beyond {vectors}")
        if data == p.IRQ_SET_DATA_EVENTFD:
            if action != p.IRQ_SET_ACTION_TRIGGER:
                raise p.ProtocolError(errno.EINVAL, "mask/unmask eventfds are not supported")
            if any(not is_eventfd(fd) for fd in fds):
                raise p.ProtocolError(errno.EINVAL, "SET_IRQS fd is not an eventfd")
            kept = list(fds) if fds else [None] * count
            for fd in self.interrupts.set_fds(index, start, kept):
                os.close(fd)
            fds[:] = [-1] * len(fds)  # owned by the interrupt table now
        else:
            if disable_all:
                for fd in self.interrupts.set_fds(index, 0, [None] * vectors):
                    os.close(fd)
            selected = (
                [i for i in range(count) if payload[p.IRQ_SET.size + i]]
                if data == p.IRQ_SET_DATA_BOOL
                else list(range(count))
            )
            for i in selected:
                if action == p.IRQ_SET_ACTION_TRIGGER:
                    self.interrupts.trigger(index, start + i)
                else:
                    self.interrupts.set_masked(index, start + i, 1,
                                               action == p.IRQ_SET_ACTION_MASK)
        self.device.irqs_changed(index)
        return p.reply_header(msg_id, p.Command.DEVICE_SET_IRQS, 0), []

    def _region_read(self, msg_id: int, payload: Payload, fds: list[int]) -> Reply:
        # The hot path (config-space reads while a guest probes): the same checks as
        # _check_count/_check_region, inlined, in the same order.
        if len(payload) != _ACCESS_SIZE:
            self._need(payload, _ACCESS_SIZE)
            raise p.ProtocolError(errno.EINVAL, "REGION_READ carries data")
        offset, index, count = _ACCESS_UNPACK_FROM(payload)
        if count > self._max_xfer:
            raise p.ProtocolError(errno.E2BIG, f"count {count} exceeds max_data_xfer_size")
        regions = self._regions
        info = regions[index] if index < len(regions) else None
        if info is None or offset + count > info[0] or not info[1]:
            self._check_region(index, offset, count, write=False)
        data = self.device.region_read(index, offset, count)
        if len(data) != count:
            raise DeviceServerError(f"device returned {len(data)} bytes for {count}")
        return _HEADER_PACK(msg_id, _CMD_REGION_READ, _READ_REPLY_BASE + count,
                            _TYPE_REPLY, 0) + payload + data, _NO_FDS

    def _region_write(self, msg_id: int, payload: Payload, fds: list[int]) -> Reply:
        # Hot path too (doorbells): _check_count/_check_region inlined, same order.
        if len(payload) < _ACCESS_SIZE:
            self._need(payload, _ACCESS_SIZE)
        offset, index, count = _ACCESS_UNPACK_FROM(payload)
        if count > self._max_xfer:
            raise p.ProtocolError(errno.E2BIG, f"count {count} exceeds max_data_xfer_size")
        if len(payload) != _ACCESS_SIZE + count:
            raise p.ProtocolError(errno.EINVAL, "REGION_WRITE data length != count")
        regions = self._regions
        info = regions[index] if index < len(regions) else None
        if info is None or offset + count > info[0] or not info[2]:
            self._check_region(index, offset, count, write=True)
        self.device.region_write(index, offset, bytes(payload[_ACCESS_SIZE:]))
        return _HEADER_PACK(msg_id, _CMD_REGION_WRITE, _READ_REPLY_BASE, _TYPE_REPLY, 0
                            ) + payload[:_ACCESS_SIZE], _NO_FDS

    def _region_write_multi(self, msg_id: int, payload: Payload, fds: list[int]) -> Reply:
        if not self.session.write_multiple:
            raise p.ProtocolError(errno.ENOSYS, "write_multiple was not negotiated")
        self._need(payload, p.WRITE_MULTI_COUNT.size)
        (n,) = p.WRITE_MULTI_COUNT.unpack_from(payload)
        if n * p.WRITE_MULTI_ENTRY.size > self.caps.max_data_xfer_size:
            raise p.ProtocolError(errno.E2BIG, f"{n} coalesced writes exceed the maximum")
        if len(payload) != p.WRITE_MULTI_COUNT.size + n * p.WRITE_MULTI_ENTRY.size:
            raise p.ProtocolError(errno.EINVAL, "REGION_WRITE_MULTI length != wr_cnt entries")
        writes = [
            p.WRITE_MULTI_ENTRY.unpack_from(payload, p.WRITE_MULTI_COUNT.size
                                            + i * p.WRITE_MULTI_ENTRY.size)
            for i in range(n)
        ]
        for offset, index, count, _data in writes:  # all checked before any is applied
            if count > p.WRITE_MULTI_MAX_DATA:
                raise p.ProtocolError(errno.EINVAL, f"coalesced write of {count} > 8 bytes")
            self._check_region(index, offset, count, write=True)
        for offset, index, count, data in writes:
            self.device.region_write(index, offset, data[:count])
        body = p.WRITE_MULTI_COUNT.pack(n)
        return p.reply_header(msg_id, p.Command.REGION_WRITE_MULTI, len(body)) + body, []

    def _device_reset(self, msg_id: int, payload: Payload, fds: list[int]) -> Reply:
        if not self.description.resettable:
            raise p.ProtocolError(errno.ENOTSUP, "device does not support reset")
        self.device.reset()
        return p.reply_header(msg_id, p.Command.DEVICE_RESET, 0), []

    def _device_feature(self, msg_id: int, payload: Payload, fds: list[int]) -> Reply:
        self._need(payload, p.DEVICE_FEATURE.size)
        _argsz, flags = p.DEVICE_FEATURE.unpack_from(payload)
        if flags & ~p.FEATURE_KNOWN_FLAGS:
            raise p.ProtocolError(errno.EINVAL, f"unknown DEVICE_FEATURE flags {flags:#x}")
        # No feature is offered: migration and DMA logging are refused the way the kernel
        # refuses an unknown feature, which QEMU reads as "not migratable".
        raise p.ProtocolError(errno.ENOTTY, f"feature {flags & p.FEATURE_INDEX_MASK} unsupported")

    def _migration(self, msg_id: int, payload: Payload, fds: list[int]) -> Reply:
        raise p.ProtocolError(errno.ENOTTY, "migration is not supported")

    # -- connection end -----------------------------------------------------------------------

    def client_gone(self) -> None:
        """Drop the client's DMA maps and IRQ fds; device state stays."""
        # as QEMU docs/interop/vfio-user.rst, "Client Disconnection", asks
        for rng in self.memory.ranges():
            try:
                self.device.dma_unmapped(rng)
            except Exception:
                log.exception("device failed to release DMA range")
        self.memory.clear()
        for fd in self.interrupts.clear():
            os.close(fd)
        for index in range(self.description.num_irqs):
            try:
                self.device.irqs_changed(index)
            except Exception:
                log.exception("device failed on IRQ teardown")
        try:
            self.device.client_disconnected()
        except Exception:
            log.exception("device failed on disconnect")
        self.session = _Session()
        self._negotiated = False


# One framed message: msg_id, command, flags, errno, payload (may alias the receive buffer),
# fds, fds-truncated. A plain tuple: this is built once per request on the hot path.
_Message = tuple[int, int, int, int, Payload, list[int], bool]


class _Connection:
    """One client socket: reads framed messages, runs the dispatcher, sends replies.

    Reads are buffered: one recvmsg takes whatever the client has sent, so a request usually
    costs one receive and one send. Linux ends a stream read right after the segment that
    carried SCM_RIGHTS fds, so the fds of a read belong to the message holding its last byte
    (clients attach fds to the sendmsg that starts a message, as QEMU does).
    """

    BUFFER_SIZE = 64 * 1024

    def __init__(self, sock: socket.socket, dispatcher: Dispatcher) -> None:
        self.sock = sock
        self.dispatcher = dispatcher
        self._send_lock = threading.Lock()
        self._cmsg_space = socket.CMSG_SPACE(dispatcher.caps.max_msg_fds * _FD_SIZE)
        self._loop_thread = threading.get_ident()
        self._next_id = 0
        self._buf = bytearray(self.BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        # (buffer position of the last byte of a read, its fds, truncated) in arrival order
        self._fd_marks: collections.deque[tuple[int, list[int], bool]] = collections.deque()
        self._deferred: collections.deque[_Message] = collections.deque()
        self._max_message = dispatcher.max_message
        self._waiters: dict[int, tuple[threading.Event, list[tuple[p.Header, bytes]]]] = {}
        self._closed = False

    # -- framing --------------------------------------------------------------------------------

    def _make_room(self, need: int) -> None:
        """Ensure ``need`` bytes fit from the current message start; keeps buffered bytes."""
        avail = self._end - self._start
        if self._start + need <= len(self._buf):
            return
        if need > len(self._buf):
            # A new buffer: payload views handed out earlier keep the old one alive.
            new = bytearray(max(need, self.BUFFER_SIZE))
            new[:avail] = self._view[self._start : self._end]
            self._buf, self._view = new, memoryview(new)
        else:
            self._buf[:avail] = self._buf[self._start : self._end]
        shift = self._start
        self._fd_marks = collections.deque((pos - shift, f, t) for pos, f, t in self._fd_marks)
        self._start, self._end = 0, avail

    def _fill(self) -> None:
        if self._start == self._end and not self._fd_marks:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            self._make_room(self._end - self._start + 1)
        n, ancdata, msg_flags, _ = self.sock.recvmsg_into(
            [self._view[self._end :]], self._cmsg_space, _MSG_CMSG_CLOEXEC
        )
        fds: list[int] = []
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fa = array.array("i")
                fa.frombytes(cdata[: len(cdata) - len(cdata) % _FD_SIZE])
                fds.extend(fa)
        if n == 0:
            _close_all(fds)
            raise EOFError
        self._end += n
        truncated = bool(msg_flags & _MSG_CTRUNC)
        if fds or truncated:
            self._fd_marks.append((self._end - 1, fds, truncated))
            # Fds wait here until their message is complete; a client that keeps sending fds
            # with fragments of one endless message would otherwise exhaust our fd table.
            if sum(len(m[1]) for m in self._fd_marks) > 2 * self.dispatcher.caps.max_msg_fds:
                raise p.ConnectionFault("too many fds pending for incomplete messages")

    def next_message(self) -> _Message:
        """The next whole message from the socket (raises EOFError, ConnectionFault, OSError)."""
        while True:
            first = self._start
            avail = self._end - first
            if avail >= _HEADER_SIZE:
                msg_id, command, size, flags, error = _HEADER_UNPACK_FROM(self._buf, first)
                if not _HEADER_SIZE <= size <= self._max_message:
                    raise p.ConnectionFault(f"message size {size} out of bounds")
                if avail >= size:
                    self._start = end = first + size
                    payload = self._view[first + _HEADER_SIZE : end]
                    marks = self._fd_marks
                    if not marks or marks[0][0] >= end:
                        return msg_id, command, flags, error, payload, _NO_FDS, False
                    fds: list[int] = []
                    truncated = False
                    while marks and marks[0][0] < end:
                        _pos, mark_fds, mark_trunc = marks.popleft()
                        fds.extend(mark_fds)
                        truncated |= mark_trunc
                    return msg_id, command, flags, error, payload, fds, truncated
                self._make_room(size)
            self._fill()

    def send(self, message: bytes, fds: list[int]) -> None:
        """Send one whole message (fds borrowed) under the send lock."""
        with self._send_lock:
            if fds:
                self.sock.sendmsg(
                    [message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
            else:
                self.sock.sendall(message)

    # -- loop -----------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until the client disconnects or the stream breaks."""
        self._loop_thread = threading.get_ident()
        handle = self.dispatcher.handle
        send_lock, sendall = self._send_lock, self.sock.sendall
        try:
            while True:
                msg = self._deferred.popleft() if self._deferred else self.next_message()
                msg_id, command, flags, _error, payload, fds, truncated = msg
                if flags & _FLAG_TYPE_MASK or fds or truncated:
                    self._process_unusual(msg)
                    continue
                # Hot path: a plain command without fds.
                reply, out_fds = handle(msg_id, command, flags, payload, fds)
                if flags & _FLAG_NO_REPLY:
                    continue
                if out_fds:
                    self.send(reply, out_fds)
                else:
                    with send_lock:
                        sendall(reply)
        except (EOFError, ConnectionError):
            log.info("client disconnected")
        except p.ConnectionFault as e:
            log.warning("closing connection: %s", e)
        except OSError as e:
            log.info("connection ended: %s", e)
        finally:
            self._closed = True
            for event, _box in self._waiters.values():
                event.set()
            for msg in self._deferred:
                _close_all(msg[5])
            self._deferred.clear()
            for _pos, fds, _trunc in self._fd_marks:
                _close_all(fds)
            self._fd_marks.clear()

    def _process_unusual(self, msg: _Message) -> None:
        """Replies, unknown message types, and commands that came with fds."""
        msg_id, command, flags, error, payload, fds, truncated = msg
        kind = flags & p.FLAG_TYPE_MASK
        if kind == p.TYPE_REPLY:
            _close_all(fds)
            self._route_reply(p.Header(msg_id, command, 0, flags, error), bytes(payload))
            return
        if kind != p.TYPE_COMMAND:
            _close_all(fds)
            reply: Reply = (p.error_header(msg_id, command, errno.EINVAL), [])
        elif truncated:
            # More fds than max_msg_fds: the kernel dropped the excess, so refuse the request.
            _close_all(fds)
            reply = (p.error_header(msg_id, command, errno.E2BIG), [])
        else:
            try:
                reply = self.dispatcher.handle(msg_id, command, flags, payload, fds)
            finally:
                _close_all(fds)
        if not flags & p.FLAG_NO_REPLY:
            self.send(*reply)

    # -- server-to-client DMA (guest memory that came without an fd) ----------------------------

    def _route_reply(self, header: p.Header, payload: bytes) -> None:
        waiter = self._waiters.get(header.msg_id)
        if waiter is None:
            log.debug("unexpected reply %d ignored", header.msg_id)
            return
        waiter[1].append((header, payload))
        waiter[0].set()

    def request(self, command: int, body: bytes) -> bytes:
        """Send a command to the client and return its reply payload (raises DmaAccessError)."""
        if self._closed:
            raise DmaAccessError("client is gone")
        with self._send_lock:
            self._next_id = (self._next_id + 1) & 0xFFFF
            msg_id = self._next_id
        event = threading.Event()
        box: list[tuple[p.Header, bytes]] = []
        self._waiters[msg_id] = (event, box)
        try:
            self.send(p.command_header(msg_id, command, len(body)) + body, [])
            if threading.get_ident() == self._loop_thread:
                # Called from a device callback on the loop thread: read until our reply comes,
                # keeping commands that arrive meanwhile (copied out of the buffer) for later.
                while not box:
                    msg_id_, command, flags, error, payload, fds, trunc = self.next_message()
                    if flags & p.FLAG_TYPE_MASK == p.TYPE_REPLY:
                        _close_all(fds)
                        self._route_reply(p.Header(msg_id_, command, 0, flags, error),
                                          bytes(payload))
                    else:
                        self._deferred.append(
                            (msg_id_, command, flags, error, bytes(payload), fds, trunc))
            elif not event.wait(REMOTE_DMA_TIMEOUT_S) or not box:
                raise DmaAccessError("client did not answer a DMA request")
        except (OSError, EOFError, p.ConnectionFault) as e:
            raise DmaAccessError(f"DMA request failed: {e}") from e
        finally:
            self._waiters.pop(msg_id, None)
        reply_hdr, reply_payload = box[0]
        if reply_hdr.flags & p.FLAG_ERROR:
            raise DmaAccessError(f"client refused DMA: {os.strerror(reply_hdr.error)}")
        return reply_payload


class _RemoteDma:
    """DMA_READ / DMA_WRITE over the current connection, chunked by the client's limit."""

    def __init__(self) -> None:
        self.connection: _Connection | None = None
        self.dispatcher: Dispatcher | None = None

    @property
    def max_xfer(self) -> int:
        """The client's max_data_xfer_size: our DMA_READ/WRITE must not exceed it."""
        # QEMU docs/interop/vfio-user.rst, "Message sizes"
        if self.dispatcher is None:
            return p.DEFAULT_MAX_DATA_XFER_SIZE
        return self.dispatcher.session.client.max_data_xfer_size

    def _conn(self) -> _Connection:
        if self.connection is None:
            raise DmaAccessError("no client connected")
        return self.connection

    def dma_read(self, address: int, count: int) -> bytes:
        out = bytearray()
        conn = self._conn()
        while len(out) < count:
            n = min(count - len(out), self.max_xfer)
            reply = conn.request(p.Command.DMA_READ, p.DMA_ACCESS.pack(address + len(out), n))
            if len(reply) != p.DMA_ACCESS.size + n:
                raise DmaAccessError("malformed DMA_READ reply")
            out.extend(reply[p.DMA_ACCESS.size :])
        return bytes(out)

    def dma_write(self, address: int, data: bytes) -> None:
        conn = self._conn()
        for pos in range(0, len(data), self.max_xfer):
            chunk = data[pos : pos + self.max_xfer]
            conn.request(p.Command.DMA_WRITE, p.DMA_ACCESS.pack(address + pos, len(chunk))
                         + chunk)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
    fds[:] = []


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
        self._remote = _RemoteDma()
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
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.socket_path))
            os.chmod(self.socket_path, 0o600)
            sock.listen(1)
        except OSError as e:
            sock.close()
            raise DeviceServerError(f"cannot listen on {self.socket_path}: {e}") from e
        self._listener = sock

    def serve_connection(self, sock: socket.socket) -> None:
        """Serve one already-connected client until it disconnects (tests use socketpair)."""
        conn = _Connection(sock, self.dispatcher)
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
