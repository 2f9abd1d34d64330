"""The desktop image (issue 17): the SDK's ``connect_desktop()`` through the host's tunnel.

The image (images/desktop: Xvfb, openbox, xterm, x11vnc on 5901) is built from
its Dockerfile over the default image by ``make image``; this test builds it
into the same store if it is missing (a few minutes, from the Debian mirror).
"""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import skip_with_reason, wait_for
from .test_host import Host, _cleanup, make_state_root, start_host
from .test_host_images import DEFAULT_STORE

ROOT = Path(__file__).resolve().parent.parent
DESKTOP = ROOT / "images" / "desktop"


def _ensure_desktop_image() -> None:
    if (DEFAULT_STORE / "desktop" / "image.json").exists():
        return
    if not (DEFAULT_STORE / "default" / "image.json").exists():
        skip_with_reason(f"no default image in {DEFAULT_STORE}: make image")
    r = subprocess.run(
        [
            *(sys.executable, "-m", "sandboxd", "image", "--images", str(DEFAULT_STORE)),
            *("build", "desktop", str(DESKTOP), "--dockerfile", str(DESKTOP / "Dockerfile")),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    gen = make_state_root("sbdk")
    root = next(gen)
    h = None
    try:
        _ensure_desktop_image()
        h = start_host(
            root / "s",
            warm=0,
            extra_args=["--no-net", "--no-build-default", "--images", str(DEFAULT_STORE)],
        )
        yield h
    finally:
        if h is not None:
            _cleanup(h)
            h.stop()
        next(gen, None)


def _png_pixels(png: bytes) -> tuple[int, int, set[bytes]]:
    """Width, height and a sample of the distinct RGB colours of an 8-bit PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", data[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    prev = bytearray(stride)
    seen: set[bytes] = set()
    for y in range(height):
        f, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for x in range(stride):
            a = line[x - channels] if x >= channels else 0
            b, c = prev[x], prev[x - channels] if x >= channels else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[x] = (line[x] + pred) & 255
        if y % 8 == 0:
            for x in range(0, stride, channels * 8):
                seen.add(bytes(line[x : x + 3]))
        prev = line
    return width, height, seen


def test_connect_desktop_screenshots_and_drives_an_application(host: Host) -> None:
    from tensorlake.sandbox import Sandbox

    sbx = Sandbox.create(image="desktop", api_url=host.url, api_key=None, memory_mb=1024)
    try:
        sbx.start_process("start-desktop")

        def terminal_shown() -> bool:
            # VNC on 5901 (0x170D) and the xterm's window mapped on the display.
            r = sbx.run(
                "sh",
                args=[
                    "-c",
                    "grep -qi ':170D ' /proc/net/tcp /proc/net/tcp6 && "
                    "xwininfo -root -tree | grep -q '\"xterm\"'",
                ],
            )
            return r.exit_code == 0

        wait_for(terminal_shown, timeout=30, interval=0.2)
        desktop = sbx.connect_desktop()
        try:
            assert (desktop.width, desktop.height) == (1024, 768)
            width, height, colours = _png_pixels(desktop.screenshot())
            assert (width, height) == (1024, 768)
            # The root window's colour, the terminal's background and its text.
            assert len(colours) >= 3, colours
            # Focus follows the mouse: off the terminal, then onto it (at +40+40).
            desktop.move_mouse(900, 700)
            desktop.click(200, 150)

            def focused() -> bool:
                r = sbx.run("xprop", args=["-root", "_NET_ACTIVE_WINDOW"])
                return "window id # 0x" in r.stdout and not r.stdout.strip().endswith("0x0")

            wait_for(focused, timeout=10, interval=0.1)  # openbox's focus delay
            desktop.type_text("echo typed-through-vnc > /tmp/typed.txt")
            desktop.press("enter")

            def typed() -> bool:
                r = sbx.run("cat", args=["/tmp/typed.txt"])
                return r.stdout.strip() == "typed-through-vnc"

            wait_for(typed, timeout=15, interval=0.2)
        finally:
            desktop.close()
    finally:
        sbx.terminate()
