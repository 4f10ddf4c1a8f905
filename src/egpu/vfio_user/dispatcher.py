"""The vfio-user dispatcher: validates one request and runs it against a DeviceBackend.

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

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from egpu.devices.base import (
    DeviceBackend,
    DeviceDescription,
    Interrupts,
    IrqIndex,
    is_eventfd,
)
from egpu.dma import DmaAccessError, DmaMapError, DmaProt, GuestMemory
from egpu.errors import DeviceServerError
from egpu.vfio_user import protocol as p

log = logging.getLogger("egpu.vfio_user")

SERVER_CAPABILITIES = p.Capabilities(
    max_msg_fds=16,
    max_data_xfer_size=1 << 20,
    max_dma_maps=4096,
    pgsizes=4096,
    write_multiple=True,
)
_READ_REPLY_BASE = p.HEADER_SIZE + p.REGION_ACCESS.size
NO_FDS: list[int] = []  # shared, never mutated
_CMD_REGION_READ = int(p.Command.REGION_READ)  # enum member lookups cost on the hot path
_CMD_REGION_WRITE = int(p.Command.REGION_WRITE)
_HEADER_PACK = p.HEADER.pack
_ACCESS_UNPACK_FROM = p.REGION_ACCESS.unpack_from
_ACCESS_SIZE = p.REGION_ACCESS.size
_BAD_COMMAND_FLAGS = ~p.KNOWN_HEADER_FLAGS | p.FLAG_ERROR
_TYPE_REPLY = p.TYPE_REPLY


@dataclass
class Session:
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
        self.session = Session()
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
        self.session = Session(True, client, ours.write_multiple)
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
                            _TYPE_REPLY, 0) + payload + data, NO_FDS

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
                            ) + payload[:_ACCESS_SIZE], NO_FDS

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
        self.session = Session()
        self._negotiated = False

