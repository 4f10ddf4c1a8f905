"""A VM's own screen: the choice of device and UI (pure), and real VMs with one under Xvfb."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from conftest import Cli, InProcessCli
from egpu.devices.display import is_blank
from egpu.engine.display import DISPLAY_CHOICES, DisplayPlan, choose_display
from egpu.engine.provision import provision_ui, ui_root
from egpu.engine.qemu import MARKER, Engine, private_engine
from egpu.errors import EngineError, UsageError
from egpu.vm.screen import check_png
from guest_helpers import shell_command

X11 = {"DISPLAY": ":9"}
NO_X: dict[str, str] = {}


def choose(requested: str | None, *, headless: bool = False, arch: str = "x86_64",
           features: tuple[str, ...] = (), platform: str = "linux",
           environ: dict[str, str] | None = None) -> DisplayPlan | None:
    return choose_display(requested, headless=headless, arch=arch, features=features,
                          platform=platform, environ=X11 if environ is None else environ)


def test_headless_and_plain_images_have_no_display_device() -> None:
    assert choose(None) is None
    assert choose(None, headless=True, features=("desktop",)) is None


def test_a_desktop_image_gets_a_window_where_one_can_open() -> None:
    assert choose(None, features=("docker", "desktop")) == DisplayPlan("virtio-vga", "sdl")
    assert choose(None, features=("desktop",), platform="darwin", arch="aarch64",
                  environ=NO_X) == DisplayPlan("virtio-gpu-pci", "cocoa")


def test_a_desktop_image_without_a_display_server_keeps_its_screen_without_a_window() -> None:
    plan = choose(None, features=("desktop",), environ=NO_X)
    assert plan is not None and plan.ui == "none" and plan.device == "virtio-vga"
    assert plan.notice is not None and "DISPLAY" in plan.notice


@pytest.mark.parametrize(("requested", "ui"), [("auto", "sdl"), ("sdl", "sdl"), ("gtk", "gtk"),
                                               ("none", "none")])
def test_explicit_choices_on_linux(requested: str, ui: str) -> None:
    plan = choose(requested, arch="aarch64")
    assert plan == DisplayPlan("virtio-gpu-pci", ui)  # type: ignore[arg-type]
    assert plan.qemu_args() == ["-device", "virtio-gpu-pci", "-display", ui]


def test_wayland_counts_as_a_display_server() -> None:
    assert choose("gtk", environ={"WAYLAND_DISPLAY": "wayland-0"}) == DisplayPlan("virtio-vga",
                                                                                   "gtk")


@pytest.mark.parametrize(("requested", "platform", "environ", "words"), [
    ("gtk", "linux", NO_X, "no display server"),
    ("auto", "linux", NO_X, "no display server"),
    ("cocoa", "linux", X11, "does not exist on linux"),
    ("sdl", "darwin", NO_X, "does not exist on darwin"),
    ("vnc", "linux", X11, "is not one of"),
    ("auto", "freebsd", X11, "no window system"),
])
def test_a_window_this_host_cannot_show_is_refused(
    requested: str, platform: str, environ: dict[str, str], words: str
) -> None:
    with pytest.raises(UsageError, match=words):
        choose(requested, platform=platform, environ=environ)


def test_display_and_headless_together_are_refused() -> None:
    with pytest.raises(UsageError, match="not both"):
        choose("none", headless=True)


@given(st.sampled_from(DISPLAY_CHOICES), st.sampled_from(("aarch64", "x86_64")),
       st.sampled_from(("linux", "darwin")), st.booleans())
def test_a_plan_always_names_a_device_of_its_arch(
    requested: str, arch: str, platform: str, has_x: bool
) -> None:
    try:
        plan = choose(requested, arch=arch, platform=platform, environ=X11 if has_x else NO_X)
    except UsageError:
        return
    assert plan is not None
    assert plan.device == ("virtio-gpu-pci" if arch == "aarch64" else "virtio-vga")
    assert plan.ui in ("none", "sdl", "gtk", "cocoa")


def test_check_png_refuses_what_is_not_a_bounded_png(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (4, 3), "red").save(good)
    assert check_png(good) == (4, 3)
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    jpeg = tmp_path / "photo.png"
    Image.new("RGB", (4, 3)).save(jpeg, format="JPEG")
    for bad in (fake, jpeg, tmp_path / "missing.png"):
        with pytest.raises(Exception, match="not a readable PNG"):
            check_png(bad)


# --- the command line, no VM started ---


def test_an_explicit_window_without_display_server_fails_before_anything_starts(
    cli: Cli,
) -> None:
    env = {k: v for k, v in cli.env.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    proc = Cli(env=env, home=cli.home)("run", "--name", "win", "--display", "gtk")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") <= 2 and "no display server" in proc.stderr
    assert not (cli.home / "data" / "vms" / "win").exists()


def test_dry_run_shows_the_screen_device(inproc: InProcessCli) -> None:
    argv = inproc.json("run", "--dry-run", "--arch", "x86_64", "--display", "none")["argv"]
    at = argv.index("virtio-vga")
    assert argv[at - 1] == "-device" and argv[argv.index("-display") + 1] == "none"
    plain = inproc.json("run", "--dry-run", "--arch", "aarch64", "--headless")["argv"]
    assert not any("virtio-gpu" in a or "virtio-vga" in a for a in plain)
    assert plain[plain.index("-display") + 1] == "none"


# --- real VMs ---


@dataclass
class XServer:
    display: str
    framebuffer: Path  # Xvfb's screen 0 as an XWD file (-fbdir)

    def windows(self) -> str:
        return subprocess.run(["xwininfo", "-display", self.display, "-root", "-tree"],
                              capture_output=True, text=True, check=True).stdout

    def screen(self) -> Image.Image:
        """The root window, read from Xvfb's XWD framebuffer (X11's documented XWD format)."""
        data = self.framebuffer.read_bytes()
        # XWDFileHeader: 25 big-endian CARD32s; then the window name, then the colormap
        header = struct.unpack(">25I", data[:100])
        header_size, width, height = header[0], header[4], header[5]
        bytes_per_line, ncolors = header[12], header[19]
        start = header_size + ncolors * 12
        pixels = data[start:start + bytes_per_line * height]
        return Image.frombytes("RGB", (width, height), pixels, "raw", "BGRX", bytes_per_line)


@pytest.fixture
def xserver() -> Iterator[XServer]:
    fbdir = Path(tempfile.mkdtemp(prefix="egpu-xvfb"))
    number = 90 + os.getpid() % 500
    display = f":{number}"
    proc = subprocess.Popen(["Xvfb", display, "-screen", "0", "1024x768x24", "-fbdir",
                             str(fbdir), "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socket_path = Path(f"/tmp/.X11-unix/X{number}")
    deadline = time.monotonic() + 30
    while not socket_path.exists():
        assert proc.poll() is None, "Xvfb exited"
        assert time.monotonic() < deadline, "Xvfb did not start"
        time.sleep(0.1)
    try:
        yield XServer(display, fbdir / "Xvfb_screen0")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(fbdir, ignore_errors=True)


def wait_until(pred: object, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


MARK = "EGPU-SCREEN-CHECK"


@pytest.mark.qemu
def test_a_window_under_xvfb_shows_the_guest(cli: Cli, xserver: XServer, tmp_path: Path) -> None:
    x = Cli(env={**cli.env, "DISPLAY": xserver.display}, home=cli.home)
    proc = x("run", "--name", "win", "--arch", "x86_64", "--accel", "tcg", "--gpu", "none",
             "--display", "sdl", "--detach", timeout=600)
    assert proc.returncode == 0, proc.stderr
    status = x.wait_for("win", lambda s: s["guest_ready"], timeout=300)
    assert status["display"] == {"device": "virtio-vga", "ui": "sdl"}
    wait_until(lambda: '"QEMU' in xserver.windows(), "the QEMU window")
    vm = cli.home / "data" / "vms" / "win"
    # text on the guest's first virtual terminal: what a person at the window would see
    shell_command(vm, f"echo {MARK} > /dev/tty1; echo done-$((6*7))\n".encode(), "done-42")
    shot = tmp_path / "win.png"
    wait_until(lambda: x("screenshot", "win", "-o", str(shot)).returncode == 0 and not is_blank(
        Image.open(shot)), "a screenshot with something on it")
    assert check_png(shot)[0] >= 640
    # the X server's own picture of its screen: QEMU's window is drawn there, not blank
    low, high = xserver.screen().convert("L").getextrema()
    assert low != high
    x("stop", "win", "--force", check=True)


@pytest.mark.qemu
def test_screen_without_window_and_headless(cli: Cli, tmp_path: Path) -> None:
    env = {k: v for k, v in cli.env.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    bare = Cli(env=env, home=cli.home)
    assert bare("run", "--name", "nowin", "--accel", "tcg", "--gpu", "none", "--display", "none",
                "--detach", timeout=600).returncode == 0
    assert bare("run", "--name", "nodev", "--accel", "tcg", "--gpu", "none", "--headless",
                "--detach", timeout=600).returncode == 0
    bare.wait_for("nowin", lambda s: s["guest_ready"], timeout=300)
    vm = cli.home / "data" / "vms" / "nowin"
    # aarch64 virt: no VGA, so this is the guest's own virtio_gpu driver with fbcon on it
    shell_command(vm, f"echo {MARK} > /dev/tty1; echo done-$((6*7))\n".encode(), "done-42")
    shot = tmp_path / "nowin.png"
    wait_until(lambda: bare("screenshot", "nowin", "-o", str(shot)).returncode == 0
               and not is_blank(Image.open(shot)), "a screenshot with something on it")
    proc = bare("screenshot", "nodev", "-o", str(tmp_path / "nodev.png"))
    assert proc.returncode == 2 and "has no display" in proc.stderr
    assert not (tmp_path / "nodev.png").exists()
    assert not (vm / "screendump.png").exists()
    for name in ("nowin", "nodev"):
        bare("stop", name, "--force", check=True)


# --- the engine's window UIs ---


def test_an_engine_with_ui_modules_finds_them_after_its_own_libraries(tmp_path: Path) -> None:
    base, ui = tmp_path / "root", tmp_path / "ui-root"
    engine = Engine("private", base / "usr/bin", root=base)
    with_ui = replace(engine, ui_root=ui)
    libs = with_ui.program("qemu-img")[2].split(":")
    own = engine.program("qemu-img")[2].split(":")
    assert libs[:len(own)] == own and all(p.startswith(str(ui)) for p in libs[len(own):])
    assert any(p.endswith("/pulseaudio") for p in libs[len(own):])
    assert with_ui.env()["QEMU_MODULE_DIR"].startswith(str(ui))
    assert engine.env()["QEMU_MODULE_DIR"].startswith(str(base))


def test_ui_modules_of_another_qemu_build_are_refused(egpu_home: Path, tmp_path: Path) -> None:
    real = private_engine()
    if real is None:
        pytest.fail("no private engine: run ./run-tests, which provisions it")
    fake_root = tmp_path / "root"
    fake_root.mkdir()
    (fake_root / MARKER).write_text(json.dumps(
        {"packages": ["qemu-system-common_1.0.0+ds-1_amd64.deb"]}))
    ui_marker = ui_root() / MARKER
    before = ui_marker.read_bytes() if ui_marker.exists() else None
    with pytest.raises(EngineError, match="do not match the private engine"):
        provision_ui(replace(real, root=fake_root))
    assert (ui_marker.read_bytes() if ui_marker.exists() else None) == before
    assert not (ui_root().parent / "ui-root.partial").exists()
