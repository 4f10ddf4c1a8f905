"""Screenshots of a VM's own display (its virtio GPU), through QEMU's QMP ``screendump``.

QEMU writes the PNG inside the VM directory; egpu then reads it as untrusted input (a PNG of
bounded size) and only then replaces the user's file, atomically, so a failed screenshot never
leaves a half-written or foreign file where the user asked for one.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from egpu import atomic
from egpu.devices.display import SCREENSHOT_MODE, replaceable
from egpu.errors import VMError
from egpu.vm import qmp, store

# QEMU's own display limits are far below these; a bigger picture is not one QEMU wrote.
MAX_SCREEN_PIXELS = 16384 * 16384
MAX_SCREEN_BYTES = 256 << 20
SCREENDUMP_TIMEOUT_S = 20.0


def check_png(path: Path) -> tuple[int, int]:
    """The size of the PNG at ``path``; VMError if it is not one within the limits."""
    from PIL import Image, UnidentifiedImageError  # only when a screenshot is taken

    try:
        if path.stat().st_size > MAX_SCREEN_BYTES:
            raise VMError(f"the screendump {path} is larger than {MAX_SCREEN_BYTES} bytes")
        with Image.open(path, formats=["PNG"]) as image:
            width, height = image.size
            if width * height > MAX_SCREEN_PIXELS:
                raise VMError(f"the screendump is {width}x{height}: too large")
            image.load()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as e:
        raise VMError(f"QEMU's screendump is not a readable PNG: {e}") from e
    return width, height


def replace_file(source: Path, dest: Path) -> None:
    """Copy ``source`` over ``dest`` through a fresh name beside it, renamed in when complete."""
    with atomic.replacing(dest, mode=SCREENSHOT_MODE) as out, source.open("rb") as src:
        shutil.copyfileobj(src, out)
        if not replaceable(dest):  # something else appeared there meanwhile
            raise VMError(f"{dest} is not a regular file; screenshots replace only those")


def screendump(vm: store.VmDir, out: Path) -> tuple[int, int]:
    """Write what the VM's display shows to ``out`` (PNG); returns its width and height."""
    dump = vm.file(store.SCREENDUMP)
    with contextlib.suppress(FileNotFoundError):
        dump.unlink()
    try:
        qmp.execute(vm.qmp_socket, "screendump", {"filename": str(dump), "format": "png"},
                    timeout=SCREENDUMP_TIMEOUT_S)
        size = check_png(dump)
        try:
            replace_file(dump, out)
        except OSError as e:
            raise VMError(f"cannot write {out}: {e.strerror or e}") from e
        return size
    finally:
        with contextlib.suppress(FileNotFoundError):
            dump.unlink()
