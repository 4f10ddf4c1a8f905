"""The I/O edge of ``egpu top``: poll a running guest through its agent (parsing: gpustats).

/proc and sysfs files are read with guest-file-read; ``nvidia-smi`` is run with guest-exec
when the guest has it. Every call has a short timeout, and what the guest lacks (no NVIDIA
or amdgpu driver) is found once and reported as a note, never as a failure.
"""

from __future__ import annotations

import contextlib
import io
import posixpath

from egpu.errors import AgentError
from egpu.vm import gpustats
from egpu.vm.agent import AgentClient

POLL_TIMEOUT_S = 3.0  # one nvidia-smi run; it takes well under a second on a real card
MAX_AMD_CARDS = 8
DRM = "/sys/class/drm"
PROC_STAT = "/proc/stat"
PROC_MEMINFO = "/proc/meminfo"
NO_GPU_NOTE = ("no GPU driver answers in this guest (no nvidia-smi, no amdgpu card): "
               "CPU and memory only")


class _Capped(io.BytesIO):
    """A sink that refuses more than :data:`gpustats.MAX_TEXT` bytes from the guest."""

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.tell() + len(data) > gpustats.MAX_TEXT:
            raise AgentError(f"guest sent more than {gpustats.MAX_TEXT} bytes for one stats file")
        return super().write(data)


def read_small(client: AgentClient, path: str) -> bytes:
    """A small guest file, bounded."""
    sink = _Capped()
    client.read_file(path, sink)
    return sink.getvalue()


class Sampler:
    """Polls one guest; keeps the previous /proc/stat so each sample has a CPU load."""

    def __init__(self, client: AgentClient) -> None:
        self.client = client
        self._nvidia: bool | None = None  # unknown until the first poll
        self._amd: list[tuple[int, str, str | None]] | None = None  # card, device dir, hwmon
        self._cpu: gpustats.CpuTimes | None = None

    def _nvidia_gpus(self) -> tuple[gpustats.GpuSample, ...]:
        if self._nvidia is False:
            return ()
        try:
            result = self.client.run(list(gpustats.NVIDIA_ARGV), timeout=POLL_TIMEOUT_S)
        except AgentError:
            # guest-exec fails outright when the program does not exist
            if self._nvidia is None:
                self._nvidia = False
            return ()
        if result.exit_code != 0:
            if self._nvidia is None:
                self._nvidia = False
            return ()
        self._nvidia = True
        try:
            return gpustats.parse_nvidia_smi(result.stdout)
        except gpustats.StatsFormatError:
            return ()

    def _find_amd(self) -> list[tuple[int, str, str | None]]:
        cards = []
        for n in range(MAX_AMD_CARDS):
            device = f"{DRM}/card{n}/device"
            try:
                read_small(self.client, f"{device}/mem_info_vram_total")
            except AgentError:
                continue  # no such card, or not an amdgpu one
            hwmon = None
            try:
                listing = self.client.run(["ls", f"{device}/hwmon"], timeout=POLL_TIMEOUT_S)
                names = [x for x in listing.stdout.decode(errors="replace").split()
                         if x.startswith("hwmon") and "/" not in x]
                hwmon = f"{device}/hwmon/{names[0]}" if names else None
            except AgentError:
                pass
            cards.append((n, device, hwmon))
        return cards

    def _amd_gpus(self) -> tuple[gpustats.GpuSample, ...]:
        if self._amd is None:
            self._amd = self._find_amd()
        out = []
        for n, device, hwmon in self._amd:
            files: dict[str, bytes] = {}
            for name in gpustats.AMD_FILES:
                with contextlib.suppress(AgentError):
                    files[name] = read_small(self.client, posixpath.join(device, name))
            if hwmon is not None:
                for name in gpustats.AMD_HWMON_FILES:
                    with contextlib.suppress(AgentError):
                        files[name] = read_small(self.client, posixpath.join(hwmon, name))
            out.append(gpustats.parse_amdgpu(n, files, f"AMD card{n}"))
        return tuple(out)

    def sample(self) -> gpustats.Sample:
        """One poll: GPUs, CPU load since the previous poll, memory."""
        gpus = self._nvidia_gpus() + self._amd_gpus()
        notes: list[str] = []
        if not gpus:
            notes.append(NO_GPU_NOTE)
        cpu = None
        try:
            now = gpustats.parse_proc_stat(read_small(self.client, PROC_STAT))
            if self._cpu is not None:
                cpu = gpustats.cpu_percent(self._cpu, now)
            self._cpu = now
        except (AgentError, gpustats.StatsFormatError) as e:
            notes.append(f"no CPU load: {e}")
        memory = None
        try:
            memory = gpustats.parse_meminfo(read_small(self.client, PROC_MEMINFO))
        except (AgentError, gpustats.StatsFormatError) as e:
            notes.append(f"no memory figures: {e}")
        return gpustats.Sample(gpus=gpus, cpu_percent=cpu, memory=memory, notes=tuple(notes))
