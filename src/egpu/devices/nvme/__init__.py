"""Function 1 of the virtual eGPU: an NVMe controller that moves all its data by DMA (part of the
devices layer, docs/ARCHITECTURE.md).

Linux's in-tree ``nvme`` driver binds it (class 0x010802). It stands in for GPU DMA traffic: every
byte read or written goes between the backing file and guest memory through the server's
guest-memory table, zero-copy (``os.preadv``/``os.pwritev`` into views of the mapped guest RAM).

Threat model: the guest programs everything the controller reads — register values, queue bases
and sizes, doorbell values, submission entries, PRP entries and lists. All of it is decoded here,
in one place each (registers in :meth:`NvmeController.bar0_write`, commands in the ``_admin_*`` and
``_io_*`` handlers, data pointers in :meth:`NvmeController.prp_segments`), checked against what
the controller offered (CAP.MQES, the queue count granted, the MSI-X vectors, MDTS, the namespace
size), and either answered with an NVMe error status or masked and logged. Guest memory is reached
only through :class:`~egpu.dma.GuestMemory`, which refuses any address outside the mapped ranges;
a queue in unmapped memory makes the controller fatal (CSTS.CFS), as real hardware does on a
master abort, until the driver resets it.

By role: :mod:`.spec` (wire formats), :mod:`.backing` (the namespace's file), :mod:`.falloc`
(hole punching), :mod:`.controller` (registers, queues, commands; no PCI), :mod:`.function`
(the PCI function and its factory).
"""

from egpu.devices.nvme.backing import NvmeBacking
from egpu.devices.nvme.controller import NvmeController
from egpu.devices.nvme.function import NvmeFunction, create

__all__ = ["NvmeBacking", "NvmeController", "NvmeFunction", "create"]
