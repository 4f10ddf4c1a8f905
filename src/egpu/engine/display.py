"""A VM's own screen: which display device it gets and which UI, if any, shows it (pure).

Three outcomes, from the user's words:

* ``--headless``: no display device at all (the console is the serial line).
* ``--display none``: a virtio GPU with no window, so ``egpu screenshot`` still works.
* ``--display [auto|gtk|sdl|cocoa]``: a virtio GPU in a window of the platform's UI (cocoa on
  macOS; on Linux SDL or GTK when a display server is there to draw on).

With neither flag an image whose features include ``desktop`` is shown like ``--display auto``
(or, with no display server, like ``--display none``, with a notice); anything else is headless.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from egpu.errors import UsageError

Ui = Literal["gtk", "sdl", "cocoa", "none"]
DISPLAY_CHOICES = ("auto", "gtk", "sdl", "cocoa", "none")
AUTO = "auto"
NO_WINDOW: Ui = "none"
DESKTOP_FEATURE = "desktop"
# What each host platform draws windows with. SDL before GTK on Linux: it needs none of GTK's
# data files (schemas, icon themes), so it works in a bare X server such as Xvfb.
PLATFORM_UIS: Mapping[str, tuple[Ui, ...]] = {"darwin": ("cocoa",), "linux": ("sdl", "gtk")}
# Linux display servers a window can open on, by the variable that names them.
DISPLAY_SERVER_VARS = ("WAYLAND_DISPLAY", "DISPLAY")
# aarch64 virt has no VGA; on q35 virtio-vga is the same GPU plus the legacy VGA window, so the
# firmware's and the early kernel's text is on screen before any guest driver binds.
DEVICES = {"aarch64": "virtio-gpu-pci", "x86_64": "virtio-vga"}
# UIs that QEMU builds as loadable modules (Debian's qemu-system-gui); cocoa is built in.
MODULE_UIS: frozenset[Ui] = frozenset({"gtk", "sdl"})


@dataclass(frozen=True)
class DisplayPlan:
    """A VM's screen: its device, the UI that shows it (``none``: no window), and why."""

    device: str
    ui: Ui
    notice: str | None = None

    @property
    def needs_ui_modules(self) -> bool:
        return self.ui in MODULE_UIS

    def qemu_args(self) -> list[str]:
        """The ``-device`` and ``-display`` arguments (the device has no user-given part)."""
        return ["-device", self.device, "-display", self.ui]

    def to_json(self) -> dict[str, str]:
        return {"device": self.device, "ui": self.ui}


def has_display_server(platform: str, environ: Mapping[str, str]) -> bool:
    """Whether a window can open here: always on macOS, with a display server on Linux."""
    if platform == "darwin":
        return True
    return any(environ.get(v) for v in DISPLAY_SERVER_VARS)


def choose_display(
    requested: str | None, *, headless: bool, arch: str, features: Iterable[str],
    platform: str, environ: Mapping[str, str],
) -> DisplayPlan | None:
    """The VM's screen for ``--display REQUESTED`` / ``--headless``; None means no device.

    ``requested`` is None when ``--display`` was not given. UsageError for a UI this host
    cannot show, before anything starts.
    """
    if headless:
        if requested is not None:
            raise UsageError("give --display or --headless, not both")
        return None
    device = DEVICES[arch]
    if requested is None:
        if DESKTOP_FEATURE not in features:
            return None
        if not has_display_server(platform, environ):
            return DisplayPlan(device, NO_WINDOW, notice=(
                "the image has a desktop but there is no display server here (DISPLAY is "
                "unset): its screen has no window; `egpu screenshot` shows it"))
        requested = AUTO
    if requested not in DISPLAY_CHOICES:
        raise UsageError(f"--display {requested!r} is not one of {', '.join(DISPLAY_CHOICES)}")
    if requested == NO_WINDOW:
        return DisplayPlan(device, NO_WINDOW)
    uis = PLATFORM_UIS.get(platform, ())
    if requested != AUTO and requested not in uis:
        offered = ", ".join((*uis, NO_WINDOW))
        raise UsageError(f"--display {requested} does not exist on {platform} hosts "
                         f"(offered: {offered})")
    if not uis:
        raise UsageError(f"egpu knows no window system on {platform} hosts",
                         hint="use --display none and `egpu screenshot`")
    if not has_display_server(platform, environ):
        raise UsageError(
            f"--display {requested}: no display server to open a window on (DISPLAY and "
            "WAYLAND_DISPLAY are unset)",
            hint="use --display none for a screen without a window, or --headless")
    ui: Ui = uis[0] if requested == AUTO else requested  # type: ignore[assignment]
    return DisplayPlan(device, ui)
