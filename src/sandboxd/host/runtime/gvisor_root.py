"""A gVisor sandbox's root filesystem: the usual overlay, over idmapped layers.

runsc's file server (the Gofer) runs as the host's root with no user
namespace, so it sees a file's owner as it is on disk. The image and the
writable layer are owned by the sandboxes' range (uid 100000 is root inside,
``images.py``). So the overlay is made over *idmapped* views of both, through
a user namespace whose ids ``uid_offset``.. are the host's 0..: the Sentry sees
the image owned by root, and what root inside writes lands on disk as uid
100000, exactly as under bubblewrap (a snapshot restores in either runtime).

The overlay must still read ``lowerdir=<image rootfs>`` in the host's
mountinfo: that is how the image store knows an image is in use. So it is made
by a short-lived helper (``python -m sandboxd.host.runtime.gvisor_root``) in a private
mount namespace, where the views are mounted *over* the image's and the
layer's own paths; the helper builds the overlay there with the new mount API
(``fsopen``/``fsmount``, the paths as the host knows them) and hands the
detached mount back over a socket; the host moves it onto ``layout.root``.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..images.image_store import UID_COUNT

_libc = ctypes.CDLL(None, use_errno=True)
# One table for x86_64 and aarch64 (these calls came after the unification).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_FSOPEN = 430
_SYS_FSCONFIG = 431
_SYS_FSMOUNT = 432
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = 0o2000000
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_MOUNT_ATTR_IDMAP = 0x100000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_FSOPEN_CLOEXEC = 1
_FSMOUNT_CLOEXEC = 1
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
HELPER_TIMEOUT_S = 30


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def idmapped_view(path: Path, userns_fd: int) -> int:
    """A detached, idmapped clone of the mount at ``path``; an fd to it."""
    fd = _check(
        _libc.syscall(
            _SYS_OPEN_TREE, _AT_FDCWD, str(path).encode(), _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC
        ),
        f"open_tree({path})",
    )
    attr = _MountAttr(_MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
    try:
        _check(
            _libc.syscall(
                _SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)
            ),
            f"idmapping {path}",
        )
    except OSError:
        os.close(fd)
        raise
    return fd


def move_mount(fd: int, target: Path) -> None:
    _check(
        _libc.syscall(
            _SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, str(target).encode(), _MOVE_MOUNT_F_EMPTY_PATH
        ),
        f"move_mount onto {target}",
    )


def unmapping_userns(uid_offset: int) -> int:
    """A user namespace whose ids ``uid_offset``.. are the host's 0..; an fd to it.

    As an idmapped mount's namespace it shows a file owned by ``uid_offset``
    on disk as owned by 0, and writes what 0 creates as ``uid_offset``.
    """
    holder = subprocess.Popen(
        ["unshare", "--user", "--", "sleep", "30"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    try:
        mine = os.readlink("/proc/self/ns/user")
        path = f"/proc/{holder.pid}/ns/user"
        deadline = time.monotonic() + 5
        while True:
            try:
                if os.readlink(path) != mine:
                    break
            except OSError:
                pass
            if holder.poll() is not None or time.monotonic() > deadline:
                raise OSError("could not make a user namespace (unshare --user)")
            time.sleep(0.001)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{holder.pid}/{name}", "w") as f:
                    f.write(f"{uid_offset} 0 {UID_COUNT}\n")
        except OSError:
            os.close(fd)
            raise
        return fd
    finally:
        holder.kill()
        holder.wait()


def probe(where: Path) -> None:
    """Raises OSError if idmapped mounts cannot be made on ``where``'s filesystem."""
    userns = unmapping_userns(100_000)
    try:
        os.close(idmapped_view(where, userns))
    finally:
        os.close(userns)


def mount(root: Path, lower: Path, rw: Path, upper: Path, work: Path, uid_offset: int) -> None:
    """The overlay at ``root`` (see the module doc); raises OSError with the helper's reason."""
    userns = unmapping_userns(uid_offset)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        argv = [sys.executable, "-s", "-m", __name__, str(userns), str(theirs.fileno())]
        argv += [str(p) for p in (lower, rw, upper, work)]
        # unshare(1): a private mount namespace, so the views mounted over the
        # image and the layer are seen by nobody but the helper.
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": _package_parent()}
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--", *argv],
            pass_fds=(userns, theirs.fileno()),
            capture_output=True,
            timeout=HELPER_TIMEOUT_S,
            env=env,
        )
        theirs.close()
        if proc.returncode != 0:
            lines = proc.stderr.decode(errors="replace").strip().splitlines()
            raise OSError(lines[-1] if lines else f"the helper exited with {proc.returncode}")
        mine.settimeout(5)
        _, fds, _, _ = socket.recv_fds(mine, 16, 1)
        if not fds:
            raise OSError("the root filesystem helper sent no mount")
        try:
            move_mount(fds[0], root)
        finally:
            os.close(fds[0])
    finally:
        mine.close()
        theirs.close()
        os.close(userns)


def _package_parent() -> str:
    import sandboxd

    return str(Path(sandboxd.__file__).resolve().parent.parent)


def _fsconfig(fs: int, key: str, value: str) -> None:
    _check(
        _libc.syscall(_SYS_FSCONFIG, fs, _FSCONFIG_SET_STRING, key.encode(), value.encode(), 0),
        f"overlay {key}={value}",
    )


def _helper(argv: list[str]) -> None:
    """In the private mount namespace: views over the paths, the overlay, sent back."""
    userns, sock_fd = int(argv[0]), int(argv[1])
    lower, rw, upper, work = (Path(a) for a in argv[2:6])
    for path in (lower, rw):
        view = idmapped_view(path, userns)
        try:
            move_mount(view, path)
        finally:
            os.close(view)
    fs = _check(_libc.syscall(_SYS_FSOPEN, b"overlay", _FSOPEN_CLOEXEC), "fsopen(overlay)")
    try:
        # As the bubblewrap runtime's overlay reads in mountinfo (images.in_use).
        _fsconfig(fs, "source", "overlay")
        for key, value in (("lowerdir", lower), ("upperdir", upper), ("workdir", work)):
            _fsconfig(fs, key, str(value))
        _check(
            _libc.syscall(_SYS_FSCONFIG, fs, _FSCONFIG_CMD_CREATE, None, None, 0),
            "creating the overlay",
        )
        mnt = _check(
            _libc.syscall(
                _SYS_FSMOUNT, fs, _FSMOUNT_CLOEXEC, _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
            ),
            "fsmount(overlay)",
        )
    finally:
        os.close(fs)
    with socket.socket(fileno=sock_fd) as sock:
        socket.send_fds(sock, [b"m"], [mnt])


if __name__ == "__main__":
    try:
        _helper(sys.argv[1:])
    except OSError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from None
