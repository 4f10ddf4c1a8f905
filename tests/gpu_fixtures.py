"""Recorded-style GPU outputs for ``egpu top``'s parsers, written from the documented formats.

NVIDIA: ``nvidia-smi --query-gpu=index,name,utilization.gpu,memory.used,memory.total,
temperature.gpu,power.draw --format=csv,noheader,nounits`` prints one comma-separated line
per GPU with the fields in the order asked, units left out (percent, MiB, degrees C, W), and
``[N/A]`` or ``[Not Supported]`` for a field a board does not report (nvidia-smi
``--help-query-gpu``). AMD: amdgpu's sysfs files under ``/sys/class/drm/cardN/device``:
``gpu_busy_percent`` (percent), ``mem_info_vram_used`` and ``mem_info_vram_total`` (bytes), and
hwmon's ``temp1_input`` (millidegrees C) and ``power1_average`` (microwatts) (Linux
``Documentation/gpu/amdgpu/thermal.rst`` and ``driver-misc.rst``). /proc/stat and /proc/meminfo
follow proc(5). The numbers are invented; the formats are not.
"""

from __future__ import annotations

# one RTX 5090 under load (power.draw has two decimals in nvidia-smi's output)
NVIDIA_ONE = "0, NVIDIA GeForce RTX 5090, 87, 30122, 32607, 71, 452.31\n"

# two boards: the second is a datacenter card without a fan-side temperature or power reading
NVIDIA_TWO = (
    "0, NVIDIA GeForce RTX 4090, 3, 1024, 24564, 38, 31.02\n"
    "1, NVIDIA A100-SXM4-40GB, 0, 0, 40960, [N/A], [Not Supported]\n"
)

# what nvidia-smi prints instead of records when the driver is not loaded, and stray lines
NVIDIA_GARBAGE = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n"
    "\n"
    "0, NVIDIA GeForce RTX 5090, 87, 30122, 32607, 71\n"  # a field short
    "x, NVIDIA GeForce RTX 5090, 87, 30122, 32607, 71, 452.31\n"  # index not a number
    "0, NVIDIA GeForce RTX 5090, 187, 30122, 32607, 71, 452.31\n"  # 187 % utilisation
    "0, NVIDIA GeForce RTX 5090, nan, 30122, 32607, 71, 452.31\n"
    "1, NVIDIA GeForce RTX 5090, 12, 2048, 32607, 45, 80.00\n"  # the one good line
)

AMD_CARD = {
    "gpu_busy_percent": b"42\n",
    "mem_info_vram_used": b"2147483648\n",  # 2 GiB
    "mem_info_vram_total": b"17163091968\n",  # 16368 MiB (a 16 GB board)
    "temp1_input": b"54000\n",  # 54.0 C
    "power1_average": b"187000000\n",  # 187 W
}

PROC_STAT_1 = (
    "cpu  1000 0 500 8000 100 0 0 0 0 0\n"
    "cpu0 500 0 250 4000 50 0 0 0 0 0\n"
    "cpu1 500 0 250 4000 50 0 0 0 0 0\n"
    "intr 12345\nctxt 999\nbtime 1764590000\nprocesses 100\n"
)
# 300 busy ticks and 100 idle ticks later: 75 % load
PROC_STAT_2 = (
    "cpu  1200 0 600 8090 110 0 0 0 0 0\n"
    "cpu0 600 0 300 4045 55 0 0 0 0 0\n"
    "cpu1 600 0 300 4045 55 0 0 0 0 0\n"
)

MEMINFO = (
    "MemTotal:        4028804 kB\n"
    "MemFree:         3000000 kB\n"
    "MemAvailable:    3500000 kB\n"
    "Buffers:           10000 kB\n"
    "Cached:           400000 kB\n"
)
MEMINFO_OLD = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 250 kB\n"
