"""A stand-in for the qemu-vfio-apple host app bundle, for tests on a host without a Mac.

The layout is the one contrib/apple-vfio/scripts/embed-qemu.sh builds (scottjg/qemu-vfio-apple):
``X.app/Contents/MacOS/qemu-system-aarch64`` and ``qemu-img``, dylibs in ``Contents/MacOS/lib``,
firmware and data in ``Contents/Resources/share/qemu``, pci.ids in ``Contents/Resources``, and
the app's bundle id in ``Contents/Info.plist``. Its QEMU is a script that answers what egpu
asks a QEMU (``--version``, ``-accel help``, ``-device help``, ``-device NAME,help``, and
``query-machines`` over ``-qmp stdio``) the way
QEMU prints it; two builds of ``vfio-apple-pci`` differ as the launcher's versions do.
"""

from __future__ import annotations

import plistlib
import sys
from pathlib import Path
from typing import Literal

Build = Literal["old", "new", "homebrew"]
APP_BUNDLE_ID = "com.example.VFIOUserHostApp"

# `-device vfio-apple-pci,help` of two launcher versions: the older one has dma-companion on by
# default and neither host-root nor dma-bounce-size; the newer one turns the companion off by
# default and adds both.
_PROPERTIES: dict[str, str] = {
    "old": """vfio-apple-pci options:
  addr=<int32>           - Slot and optional function number, example: 06.0 or 06 (default: -1)
  dma-companion=<bool>   -  (default: true)
  host=<str>
  multifunction=<bool>   - on/off (default: false)
  rombar=<uint32>        -  (default: 1)
""",
    "new": """vfio-apple-pci options:
  addr=<int32>           - Slot and optional function number, example: 06.0 or 06 (default: -1)
  dma-bounce-size=<size> - Bounce pool for the guest (restricted-dma-pool) (default: 64 MiB)
  dma-companion=<bool>   -  (default: false)
  host=<str>
  host-root=<str>        - Registry name of the host root port, e.g. pcic1-bridge
  multifunction=<bool>   - on/off (default: false)
  rombar=<uint32>        -  (default: 1)
""",
}

_SCRIPT = '''#!{python}
import sys
args = sys.argv[1:]
VERSION = {version!r}
DEVICES = {devices!r}
PROPERTIES = {properties!r}
if "--version" in args:
    print("QEMU emulator version " + VERSION)
    print("Copyright (c) 2003-2026 Fabrice Bellard and the QEMU Project developers")
elif "-accel" in args and args[args.index("-accel") + 1] == "help":
    print("Accelerators supported in QEMU binary:")
    print("tcg")
    print("hvf")
elif "-device" in args and args[args.index("-device") + 1] == "help":
    print("Storage devices:")
    print('name "virtio-blk-pci", bus PCI, alias "virtio-blk"')
    print()
    print("Misc devices:")
    for d in DEVICES:
        print('name "' + d + '", bus PCI')
elif "-device" in args and args[args.index("-device") + 1] == "vfio-apple-pci,help":
    if PROPERTIES is None:
        print("qemu-system-aarch64: 'vfio-apple-pci' is not a valid device model name",
              file=sys.stderr)
        sys.exit(1)
    sys.stdout.write(PROPERTIES)
elif "-qmp" in args and args[args.index("-qmp") + 1] == "stdio":
    # QMP on stdio, as QEMU answers it: a greeting, then one reply per command read
    import json
    print(json.dumps({{"QMP": {{"version": {{}}, "capabilities": []}}}}))
    for line in sys.stdin:
        command = json.loads(line).get("execute")
        if command == "query-machines":
            print(json.dumps({{"return": [{{"name": "virt-10.0", "alias": "virt",
                                          "cpu-max": 512}}]}}))
        else:
            print(json.dumps({{"return": {{}}}}))
        if command == "quit":
            break
else:
    print("qemu-system-aarch64: this stand-in only answers probes", file=sys.stderr)
    sys.exit(1)
'''


def make_qemu_dir(bindir: Path, build: Build, version: str) -> Path:
    """Write a stand-in ``qemu-system-aarch64`` and ``qemu-img`` into ``bindir``."""
    bindir.mkdir(parents=True, exist_ok=True)
    devices = ["vfio-pci", "vfio-user-pci"] if build == "homebrew" else [
        "vfio-pci", "vfio-apple-pci", "apple-dma-pci"]
    props = None if build == "homebrew" else _PROPERTIES[build]
    qemu = bindir / "qemu-system-aarch64"
    qemu.write_text(_SCRIPT.format(python=sys.executable, version=version, devices=devices,
                                   properties=props))
    qemu.chmod(0o755)
    img = bindir / "qemu-img"
    img.write_text(f"#!{sys.executable}\nprint('qemu-img version {version}')\n")
    img.chmod(0o755)
    return bindir


def make_app(parent: Path, build: Build = "new", *, name: str = "VFIOUserHostApp",
             version: str = "10.2.50", bundle_id: str = APP_BUNDLE_ID) -> Path:
    """A host app bundle ``parent/NAME.app`` whose QEMU is the ``build`` stand-in."""
    app = parent / f"{name}.app"
    contents = app / "Contents"
    make_qemu_dir(contents / "MacOS", build, version)
    (contents / "MacOS" / "lib").mkdir(exist_ok=True)
    (contents / "MacOS" / "lib" / "libglib-2.0.0.dylib").write_bytes(b"")
    share = contents / "Resources" / "share" / "qemu"
    share.mkdir(parents=True, exist_ok=True)
    (share / "edk2-aarch64-code.fd").write_bytes(bytes(4096))
    (share / "edk2-arm-vars.fd").write_bytes(bytes(4096))
    (contents / "Resources" / "pci.ids").write_text("10de  NVIDIA Corporation\n")
    (contents / "Info.plist").write_bytes(plistlib.dumps({
        "CFBundleIdentifier": bundle_id, "CFBundleName": name,
        "CFBundleExecutable": "VFIOUserHostApp",
    }))
    return app
