"""The fork server of pre-imported daemons (a zygote): a cold sandbox without the daemon's imports.

A sandbox's daemon used to start a fresh interpreter in the sandbox and import
aiohttp, pydantic and its models there: most of a cold create, and the whole
cost of a burst of them on a small machine. A zygote imports all of that once;
per sandbox it forks a daemon that joins the sandbox's namespaces and cgroups
(``sandboxd/zygote_child.py``) and serves, with the sandbox's uid, its seccomp
filter and ``no_new_privs``, like a daemon started by exec.

What stays as it was (``runtime.py``): bubblewrap still makes the sandbox (its
user namespace made by the host, the overlay, /proc, /dev, tmpfs, the runtime's
read-only binds, cgroup binds), and its launcher is still the process the host
holds by pidfd. It is only told (``--block-fd``) to wait before running a
command of its own: it waits on a pipe whose one writer is the daemon, so the
sandbox's init ends when its daemon does, and the launcher with it (death
detection and recovery after a host restart are unchanged).

The zygote itself is a dedicated process, not the host: started with the
launch's fixed environment, in a mount namespace of its own whose root is the
image's root read-only with the daemon's runtime under ``/run/sandboxd-rt``
(the paths a sandbox sees), network, IPC and UTS namespaces of its own, and no
descriptor but its socket to the host. It keeps the host's root (joining a
sandbox's namespaces needs it); its children drop it for the sandbox's before
they fork the daemon. One zygote per image root (a daemon's loaded libraries
come from it), at most ``MAX_ZYGOTES``. ``SANDBOXD_HOST_ZYGOTE=0`` turns it
off; a zygote that cannot start or dies makes creates fall back to the exec
path, with a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..images.image_store import Image

log = logging.getLogger("sandboxd.host.zygote")

ENV_SWITCH = "SANDBOXD_HOST_ZYGOTE"
MAX_ZYGOTES = 4
READY_TIMEOUT_S = 60.0
SPAWN_TIMEOUT_S = 15.0
# A zygote that failed this many times in a row is not started again.
MAX_FAILURES = 3


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


class ZygoteError(Exception):
    """The zygote could not make this sandbox's daemon; the message says why.

    ``unsettled``: a daemon may be running (the zygote did not answer in
    time): the sandbox must be torn down, not retried on the exec path.
    """

    def __init__(self, message: str, unsettled: bool = False) -> None:
        super().__init__(message)
        self.unsettled = unsettled


class Zygote:
    """One zygote process (under bubblewrap) and the host's end of its socket."""

    def __init__(self, image: Image, argv: list[str]) -> None:
        self.image = image
        self._argv = argv
        self.proc: asyncio.subprocess.Process | None = None
        self.sock: socket.socket | None = None
        self.ready = asyncio.Event()
        self.error: str | None = None

    @property
    def usable(self) -> bool:
        return self.ready.is_set() and self.error is None and self.sock is not None

    async def start(self) -> None:
        """Start it and wait for its ``ready`` (its imports done); sets ``error`` on failure."""
        from .bubblewrap import LAUNCH_ENV

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [a.replace("{FD}", str(theirs.fileno())) for a in self._argv]
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                env=LAUNCH_ENV,
                pass_fds=[theirs.fileno()],
                start_new_session=True,
                # The limit a sandbox's daemon starts with (runtime._enter), not the host's
                # raised one; and the zygote dies with the host (_with_the_host).
                preexec_fn=_with_the_host(os.getpid()),
            )
        except OSError as exc:
            ours.close()
            self._fail(f"could not start: {exc}")
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            got = await asyncio.wait_for(loop.sock_recv(ours, 16), READY_TIMEOUT_S)
        except (TimeoutError, OSError) as exc:
            got = f"{exc!r}".encode()
        if got != b"ready":
            ours.close()
            self.stop()
            self._fail(f"did not become ready: {got.decode(errors='replace') or 'it exited'}")
            return
        self.sock = ours
        # Its end closes when it dies: from then on, creates take the exec path.
        loop.add_reader(ours.fileno(), self._gone)
        self.ready.set()
        log.info("zygote for image %s ready (pid %d)", self.image.name, self.proc.pid)

    def _gone(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self._fail("it exited")

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
            log.warning(
                "zygote for image %s unavailable (%s): sandboxes start their daemon by exec",
                self.image.name,
                why,
            )
        self.ready.set()

    async def spawn(self, header: dict[str, Any], fds: dict[str, int]) -> None:
        """Have it make one sandbox's daemon; returns once the daemon runs ``serve``.

        ``fds`` are the host's: sent, not closed. Raises :class:`ZygoteError`.
        """
        if not self.usable or self.sock is None:
            raise ZygoteError(f"the zygote is unavailable: {self.error or 'not ready'}")
        status_r, status_w = os.pipe()
        try:
            msg = json.dumps({**header, "fds": ["status", *fds]}).encode()
            try:
                socket.send_fds(self.sock, [msg], [status_w, *fds.values()])
            except BlockingIOError as exc:
                raise ZygoteError("the zygote is not reading its requests") from exc
            except OSError as exc:
                self._fail(f"its socket failed: {exc}")
                raise ZygoteError(f"the zygote is gone: {exc}") from exc
            finally:
                os.close(status_w)
            text = await _read_to_end(status_r, SPAWN_TIMEOUT_S)
        finally:
            os.close(status_r)
        if text == "ok":
            return
        if text.startswith("error: "):  # reported before the child or the daemon exited
            raise ZygoteError(f"the zygote could not make the daemon: {text[7:]}")
        # No answer: nothing says no daemon runs; and a zygote that hangs is not used again.
        self._fail(f"it did not answer a request ({text or 'no answer'})")
        raise ZygoteError(f"the zygote did not answer: {text or 'no answer'}", unsettled=True)

    def stop(self) -> None:
        """End the zygote (the daemons it made are the sandboxes' and live on)."""
        if self.sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


PR_SET_PDEATHSIG = 1


def _with_the_host(host_pid: int) -> Callable[[], None]:
    """What the zygote's bubblewrap runs before its exec (everything looked up here, first).

    bwrap's ``--die-with-parent`` takes effect only once bwrap runs: a host that
    exits between the fork and that point (a start that fails at once, such as a
    node that cannot join its fleet) left the zygote behind, holding the host's
    stdout and stderr. The death signal is set before the exec instead, and a
    host already gone by then is noticed at once.
    """
    from ...edge.connections import STARTED_WITH_NOFILE

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def before_exec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, STARTED_WITH_NOFILE)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != host_pid:
            os._exit(1)

    return before_exec


async def _read_to_end(fd: int, timeout_s: float) -> str:
    """What a pipe holds until every writer closed it (bounded by ``timeout_s``)."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            chunks.append(data)
        elif not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(done, timeout_s)
    except TimeoutError:
        return "no answer within the timeout"
    finally:
        loop.remove_reader(fd)
    return b"".join(chunks).decode(errors="replace").strip()


class Zygotes:
    """The host's zygotes, one per image root, started on first use."""

    def __init__(self, argv_for: Any, on: bool | None = None) -> None:
        # argv_for(image) -> the zygote's command line ("{FD}": its socket).
        self._argv_for = argv_for
        self.on = enabled() if on is None else on
        self._by_root: dict[Path, Zygote] = {}
        self._failures: dict[Path, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.started_at = time.monotonic()

    def warm(self, image: Image) -> None:
        """Start the image's zygote in the background (the host's start does it for the default)."""
        self._ensure(image)

    def _ensure(self, image: Image) -> Zygote | None:
        if not self.on:
            return None
        key = image.rootfs
        z = self._by_root.get(key)
        if z is not None and z.error is not None:
            z.stop()
            self._failures[key] = self._failures.get(key, 0) + 1
            del self._by_root[key]
            z = None
        if z is None:
            if len(self._by_root) >= MAX_ZYGOTES or self._failures.get(key, 0) >= MAX_FAILURES:
                return None
            z = self._by_root[key] = Zygote(image, self._argv_for(image))
            task = asyncio.ensure_future(self._start(key, z))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return z

    async def _start(self, key: Path, z: Zygote) -> None:
        await z.start()
        if z.error is None:
            self._failures.pop(key, None)

    async def get(self, image: Image) -> Zygote | None:
        """The image's zygote once ready; None (exec path) when off or unavailable."""
        z = self._ensure(image)
        if z is None:
            return None
        if not z.ready.is_set() and self._failures.get(image.rootfs, 0) > 0:
            # A replacement still importing: this create does not wait for it.
            log.debug("zygote for image %s restarting: exec path", image.name)
            return None
        # The first one (the host just started): waiting costs less than a second import.
        await z.ready.wait()
        return z if z.usable else None

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for z in self._by_root.values():
            z.stop()
        self._by_root.clear()

    def pids(self) -> list[int]:
        """The zygotes' bwrap pids (tests look for the zygote by them)."""
        return [z.proc.pid for z in self._by_root.values() if z.proc is not None]
