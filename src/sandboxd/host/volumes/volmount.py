"""Mount a volume into a running sandbox, or take it out: a one-shot helper process.

Run by the host as ``python -I volmount.py attach|detach ...`` (this file
alone: it imports nothing of sandboxd) with two inherited descriptors: the sandbox's user namespace and its mount
namespace (opened by :func:`sandboxd.host.volumes.volume_store.sandbox_namespaces`, never
through a pid looked up later). A fresh process because ``setns`` into a user
namespace needs a single-threaded caller, which the host's event loop is not.

**attach** (``attach USERNS_FD MNTNS_FD SOURCE TARGET ro|rw``):

1. ``unshare(CLONE_NEWNS)`` as the host's root, every mount made private: a
   mount namespace of the helper's own, so nothing below reaches the host's.
2. A bind of ``SOURCE`` (the volume's data dir) onto itself, remounted
   ``nosuid,nodev`` (and ``ro`` for a read-only mount).
3. ``setns`` into the sandbox's user namespace, then ``unshare(CLONE_NEWNS)``
   again: the kernel copies the mount tree into a namespace owned by a less
   privileged user namespace, and so *locks* the flags of every mount it
   copies (``MNT_LOCK_READONLY``, ``MNT_LOCK_NOSUID``, ``MNT_LOCK_NODEV``).
4. ``open_tree(OPEN_TREE_CLONE)`` of that bind: a detached copy that keeps the
   locked flags (a bind copies its source's flags).
5. ``setns`` into the sandbox's mount namespace; the helper becomes the
   sandbox's root (uid 0 of its namespace, so a mount point it makes is root's
   there); the target is resolved from the sandbox's ``/`` one component at a
   time with ``openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)``, missing
   directories made on the way: a symlink the sandbox planted is refused, and
   nothing resolves outside the sandbox's own tree.
6. ``move_mount`` of the detached copy onto that directory's descriptor.

So root inside the sandbox cannot make a read-only volume writable: ``mount -o
remount,rw`` on it is ``EPERM`` (the flag is locked), a new bind of it
inherits the lock, and the new mount API is closed by the sandbox's seccomp
filter anyway. It can unmount the volume (its own loss) or cover it.

**detach** (``detach USERNS_FD MNTNS_FD TARGET DEV INO``): enters both
namespaces, resolves ``TARGET`` the same way, and unmounts what is mounted
there until the directory seen is no longer the volume's root (``DEV``,
``INO``), or nothing more is mounted.

Exit status 0 on success; otherwise 2 and one line on stderr,
``CODE: message``, that the host turns into the request's answer.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
AT_FDCWD = -100
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
# x86_64 and aarch64 share these (the generic table; x86_64 adopted them at 424+).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_OPENAT2 = 437

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class Refused(Exception):
    """A refusal with the code the host answers with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def _setns(fd: int, kind: int, what: str) -> None:
    _check(_libc.setns(fd, kind), f"setns {what}")


def _mount(src: str | None, dst: str, flags: int) -> None:
    s = src.encode() if src is not None else None
    _check(_libc.mount(s, dst.encode(), None, ctypes.c_ulong(flags), None), f"mount {dst}")


def _openat2(dirfd: int, name: str, flags: int) -> int:
    how = struct.pack(
        "QQQ",
        flags | os.O_CLOEXEC,
        0,
        RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_BENEATH,
    )
    buf = ctypes.create_string_buffer(how, len(how))
    rc = _libc.syscall(
        ctypes.c_long(SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(name.encode()),
        buf,
        ctypes.c_size_t(len(how)),
    )
    return int(_check(int(rc), f"open {name!r}"))


def _components(target: str) -> list[str]:
    parts = [p for p in target.split("/") if p]
    if not target.startswith("/") or not parts or any(p in (".", "..") for p in parts):
        raise Refused("INVALID_MOUNT_PATH", f"{target!r} is not a normalized absolute path")
    return parts


def resolve_dir(target: str, make: bool) -> int:
    """An O_PATH descriptor of ``target`` under this process's ``/``, no symlink followed.

    ``make``: missing directories are made (mode 0755, owned by the caller).
    """
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in _components(target):
            try:
                nxt = _openat2(fd, name, os.O_PATH | os.O_DIRECTORY)
            except OSError as exc:
                if exc.errno == errno.ENOENT and make:
                    try:
                        os.mkdir(name, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                    except OSError as mk:
                        raise Refused(
                            "MOUNT_PATH_UNUSABLE",
                            f"cannot make {target!r} in the sandbox: {mk.strerror}",
                        ) from mk
                    nxt = _openat2(fd, name, os.O_PATH | os.O_DIRECTORY)
                elif exc.errno in (errno.ELOOP, errno.EXDEV):
                    raise Refused(
                        "MOUNT_PATH_SYMLINK",
                        f"{target!r} goes through a symbolic link in the sandbox: "
                        "mount on a real directory",
                    ) from exc
                elif exc.errno == errno.ENOTDIR:
                    raise Refused(
                        "MOUNT_PATH_NOT_DIRECTORY",
                        f"{target!r} is a file in the sandbox: mount on a directory",
                    ) from exc
                elif exc.errno == errno.ENOENT:
                    raise Refused("MOUNT_PATH_NOT_FOUND", f"{target!r} does not exist") from exc
                else:
                    raise Refused(
                        "MOUNT_PATH_UNUSABLE", f"{target!r} in the sandbox: {exc.strerror}"
                    ) from exc
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _become_sandbox_root() -> None:
    # uid/gid 0 of the sandbox's namespace (the host's UID_OFFSET): a mount
    # point made here is owned by the sandbox's root, as if it had made it.
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def attach(userns: int, mntns: int, source: str, target: str, read_only: bool) -> None:
    _components(target)
    _check(_libc.unshare(CLONE_NEWNS), "unshare")
    _mount(None, "/", MS_REC | MS_PRIVATE)
    _mount(source, source, MS_BIND)
    _mount(
        None, source, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
    )
    _setns(userns, CLONE_NEWUSER, "user")
    # Copied into a namespace of the sandbox's user namespace: flags locked.
    _check(_libc.unshare(CLONE_NEWNS), "unshare (locked copy)")
    tree = int(
        _check(
            int(
                _libc.syscall(
                    ctypes.c_long(SYS_OPEN_TREE),
                    ctypes.c_int(AT_FDCWD),
                    ctypes.c_char_p(source.encode()),
                    ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
                )
            ),
            "open_tree",
        )
    )
    _setns(mntns, CLONE_NEWNS, "mnt")
    _become_sandbox_root()
    dest = resolve_dir(target, make=True)
    rc = _libc.syscall(
        ctypes.c_long(SYS_MOVE_MOUNT),
        ctypes.c_int(tree),
        ctypes.c_char_p(b""),
        ctypes.c_int(dest),
        ctypes.c_char_p(b""),
        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
    )
    _check(int(rc), f"move_mount onto {target}")


def detach(userns: int, mntns: int, target: str, dev: int, ino: int) -> None:
    _setns(userns, CLONE_NEWUSER, "user")
    _setns(mntns, CLONE_NEWNS, "mnt")
    _become_sandbox_root()
    for _ in range(16):  # what the sandbox stacked on top goes too, within reason
        try:
            fd = resolve_dir(target, make=False)
        except Refused:
            return  # gone or replaced by something that is no mount of ours
        try:
            st = os.fstat(fd)
            os.fchdir(fd)
        finally:
            os.close(fd)
        mine = (st.st_dev, st.st_ino) == (dev, ino)
        if _libc.umount2(b".", MNT_DETACH) != 0:
            return  # not a mount point (any more): nothing of ours is there
        os.chdir("/")
        if mine:
            return


def main(argv: list[str]) -> int:
    try:
        if argv[0] == "attach":
            attach(int(argv[1]), int(argv[2]), argv[3], argv[4], argv[5] == "ro")
        elif argv[0] == "detach":
            detach(int(argv[1]), int(argv[2]), argv[3], int(argv[4]), int(argv[5]))
        else:
            raise Refused("INVALID_REQUEST", f"unknown action {argv[0]!r}")
    except Refused as exc:
        sys.stderr.write(f"{exc.code}: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"MOUNT_FAILED: {exc.strerror or exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
