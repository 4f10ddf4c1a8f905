"""A full memory barrier for memory shared with another process (guest RAM under QEMU).

Shadow doorbells are a store-then-load handshake on both sides (the guest stores its doorbell
value and loads our EventIdx; we store the EventIdx and load its doorbell value): without a
full barrier between the store and the load each side can miss the other's update.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
from collections.abc import Callable, Iterator

_SEQ_CST = 5  # __ATOMIC_SEQ_CST


def _lock_round_trip() -> Callable[[], None]:
    # A lock's atomic read-modify-write: a full barrier on x86 (lock-prefixed), the common host.
    lock = threading.Lock()

    def fence() -> None:
        with lock:
            pass

    return fence


def _library_names() -> Iterator[str]:
    yield "libatomic.so.1"
    # Only if the soname is not there: find_library runs ldconfig, a subprocess.
    found = ctypes.util.find_library("atomic")
    if found is not None:
        yield found


def _make_fence() -> tuple[Callable[[], None], str]:
    for name in _library_names():
        try:
            fn = ctypes.CDLL(name).atomic_thread_fence
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], None
        return functools.partial(fn, _SEQ_CST), "atomic_thread_fence"
    return _lock_round_trip(), "lock"


full_fence, FENCE_KIND = _make_fence()
"""``full_fence()``: a sequentially consistent fence (libatomic's, else a lock round trip)."""
