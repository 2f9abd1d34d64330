"""The image store: named root filesystems that sandboxes start from, read-only.

An image is ``<images>/<name>/rootfs`` plus ``<images>/<name>/image.json``.
Images are built from the Debian archive with ``mmdebstrap`` (``sandboxd image
build``) or imported from any root filesystem tree (``sandboxd image import``,
e.g. what ``umoci unpack`` or ``docker export | tar x`` gives).

Every file of an image is owned by ``UID_OFFSET`` + its uid: sandboxes run in a
user namespace that maps their 0..65535 onto host 100000..165535, so root
inside owns the image's root files (and may change them: the overlay copies
them up into the sandbox's own layer), while the image on disk, and every host
file, stays out of its reach. Shifting once at build time keeps the image
shared by every sandbox without a per-sandbox chown (idmapped mounts would
allow a range per sandbox; see docs/self-hosted.md).

A build or import is made in a temporary dir beside the store and renamed into
place, so an image is either whole or absent.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import mounts

UID_OFFSET = 100_000
UID_COUNT = 65_536
DEFAULT_IMAGE = "default"
# What the default image holds beyond Debian's essential set (which has bash,
# coreutils, dash, util-linux, findutils, grep, sed, tar, gzip...).
DEFAULT_PACKAGES = ("python3", "ca-certificates", "procps", "iproute2")
DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
MMDEBSTRAP = "mmdebstrap"
META = "image.json"

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class ImageError(Exception):
    """An image could not be built, imported or found; the message says why."""


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ImageError(
            f"image name {name!r}: 1-63 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class Image:
    name: str
    rootfs: Path
    uid_offset: int
    created_at: float
    source: str  # "mmdebstrap bookworm +python3,..." or "import /path"

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "rootfs": str(self.rootfs),
            "uid_offset": self.uid_offset,
            "created_at": self.created_at,
            "source": self.source,
        }


class ImageStore:
    def __init__(self, root: Path) -> None:
        # Absolute: it ends up in overlay mount options.
        self.root = root.absolute()

    def get(self, name: str) -> Image | None:
        if not _NAME.match(name):
            return None
        d = self.root / name
        try:
            meta = json.loads((d / META).read_text())
        except (OSError, ValueError):
            return None
        if not (d / "rootfs").is_dir():
            return None
        return Image(
            name=name,
            rootfs=d / "rootfs",
            uid_offset=int(meta.get("uid_offset", UID_OFFSET)),
            created_at=float(meta.get("created_at", 0)),
            source=str(meta.get("source", "")),
        )

    def names(self) -> list[str]:
        with contextlib.suppress(OSError):
            return sorted(p.name for p in self.root.iterdir() if self.get(p.name) is not None)
        return []

    # -- making images (blocking; the CLI runs these, never the host's loop) --

    def build(
        self,
        name: str,
        packages: tuple[str, ...] = DEFAULT_PACKAGES,
        suite: str = DEFAULT_SUITE,
        mirror: str = DEFAULT_MIRROR,
        log: int | None = None,
    ) -> Image:
        check_name(name)
        if shutil.which(MMDEBSTRAP) is None:
            raise ImageError("mmdebstrap is not installed: apt-get install -y mmdebstrap")
        for p in packages:
            if not re.match(r"^[a-z0-9][a-z0-9+.-]*$", p):
                raise ImageError(f"{p!r} is not a Debian package name")
        tmp = self._tmpdir(name)
        try:
            argv = [MMDEBSTRAP, "--variant=essential", "--mode=root"]
            if packages:
                argv.append("--include=" + ",".join(packages))
            argv += [suite, str(tmp / "rootfs"), mirror]
            r = subprocess.run(argv, stdout=log, stderr=log if log is not None else subprocess.PIPE)
            if r.returncode != 0:
                err = (r.stderr or b"").decode(errors="replace").strip()[-2000:]
                raise ImageError(f"mmdebstrap failed ({r.returncode}): {err}")
            source = f"mmdebstrap {suite} +{','.join(packages)}"
            return self._finish(name, tmp, source)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def import_tree(self, name: str, src: Path) -> Image:
        """Copy a root filesystem tree (owners and modes kept) into the store."""
        check_name(name)
        if not (src / "bin").exists() and not (src / "usr").is_dir():
            raise ImageError(f"{src} does not look like a root filesystem (no /usr, no /bin)")
        tmp = self._tmpdir(name)
        try:
            r = subprocess.run(
                ["cp", "-a", "--", f"{src}/.", str(tmp / "rootfs")], capture_output=True
            )
            if r.returncode != 0:
                raise ImageError(f"copying {src} failed: {r.stderr.decode(errors='replace')}")
            return self._finish(name, tmp, f"import {src}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def remove(self, name: str) -> bool:
        """Remove an image that no sandbox runs on; False if there is no such image."""
        image = self.get(name)
        if image is None:
            return False
        if in_use(image.rootfs):
            # Changing an overlay's lower dir under it is undefined behaviour.
            raise ImageError(f"image {name!r} is in use by a running sandbox")
        trash = self.root / f".rm-{name}-{os.getpid()}-{time.monotonic_ns()}"
        (self.root / name).rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _tmpdir(self, name: str) -> Path:
        current = self.get(name)
        if current is not None and in_use(current.rootfs):
            raise ImageError(f"image {name!r} is in use by a running sandbox; cannot replace it")
        self.root.mkdir(parents=True, exist_ok=True)
        # Traversable by the sandboxes' uid range (the overlay's lower dir is
        # reached through it), not listable.
        os.chmod(self.root, 0o711)
        tmp = self.root / f".build-{name}-{os.getpid()}-{time.monotonic_ns()}"
        (tmp / "rootfs").mkdir(parents=True)
        return tmp

    def _finish(self, name: str, tmp: Path, source: str) -> Image:
        rootfs = tmp / "rootfs"
        shift_owners(rootfs, UID_OFFSET)
        os.chmod(tmp, 0o755)
        meta = {"uid_offset": UID_OFFSET, "created_at": time.time(), "source": source}
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        dest = self.root / name
        if dest.exists():
            self.remove(name)
        tmp.rename(dest)
        image = self.get(name)
        assert image is not None
        return image


def in_use(rootfs: Path) -> bool:
    """Whether a mounted overlay has ``rootfs`` as its lower dir."""
    lower = f"lowerdir={rootfs}"
    return any(m.source == "overlay" and lower in m.options.split(",") for m in mounts.table())


def shift_owners(root: Path, offset: int) -> int:
    """Add ``offset`` to every owner below ``root`` (ids already ≥ offset stay).

    chown clears set-uid/set-gid bits, so they are put back. Returns how many
    entries were changed.
    """
    changed = 0

    def shift(path: str) -> None:
        nonlocal changed
        st = os.lstat(path)
        if st.st_uid >= offset and st.st_gid >= offset:
            return
        uid = st.st_uid if st.st_uid >= offset else st.st_uid + offset
        gid = st.st_gid if st.st_gid >= offset else st.st_gid + offset
        os.lchown(path, uid, gid)
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            os.chmod(path, stat.S_IMODE(st.st_mode))
        changed += 1

    shift(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            shift(os.path.join(dirpath, n))
    return changed
