"""The image store: named root filesystems that sandboxes start from, read-only.

An image is ``<images>/<dir>/rootfs`` plus ``<images>/<dir>/image.json``.
Images are built from the Debian archive with ``mmdebstrap`` (``sandboxd image
build``), pulled from a registry (``sandboxd image pull REF``, registry.py),
or imported from a root filesystem tree, a ``docker save`` tarball or an OCI
layout dir (``sandboxd image import``, oci.py). A local name (``default``) is
its own dir; a reference (``127.0.0.1:5000/team/app:1``) lives in a dir named
from it (``ref-…-<hash>``) and image.json keeps the name as asked, with the
image's config (Env, WorkingDir, User, Entrypoint, Cmd).

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
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import mounts
from . import oci, registry
from .oci import FormatError, ImageConfig

DEFAULT_STORE = "/var/lib/sandboxd-host/images"
UID_OFFSET = 100_000
UID_COUNT = 65_536
DEFAULT_IMAGE = "default"
# What the default image holds beyond Debian's essential set (which has bash,
# coreutils, dash, util-linux, findutils, grep, sed, tar, gzip...): enough to
# install more (apt, pip, venv) and fetch code (git, curl).
DEFAULT_PACKAGES = (
    "python3",
    "python3-pip",
    "python3-venv",
    "apt",
    "git",
    "curl",
    "ca-certificates",
    "procps",
    "iproute2",
    "passwd",
    "less",
)
DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_USER = "user"  # uid 1000, for ``user=`` examples
SECURITY_MIRROR = "http://deb.debian.org/debian-security"


def default_hooks(suite: str, mirror: str) -> tuple[str, ...]:
    """Shell run by mmdebstrap in the finished tree (``$1``), after the packages.

    apt gets the updates and security suites (from the default mirror only: a
    private mirror may carry neither), pip may install into the system's
    Python as in the Python images of Docker Hub (PEP 668 would refuse), and a
    non-root user exists where ``useradd`` does.
    """
    hooks = []
    if mirror == DEFAULT_MIRROR:
        lines = f"deb {mirror} {suite}-updates main\ndeb {SECURITY_MIRROR} {suite}-security main\n"
        hooks.append(f'printf {shlex.quote(lines)} > "$1/etc/apt/sources.list.d/updates.list"')
    hooks.append("printf '[global]\\nbreak-system-packages = true\\n' > \"$1/etc/pip.conf\"")
    hooks.append(
        'if [ -x "$1/usr/sbin/useradd" ]; then chroot "$1" /usr/sbin/useradd --create-home '
        f"--uid 1000 --user-group --shell /bin/bash {DEFAULT_USER}; fi"
    )
    return tuple(hooks)


MMDEBSTRAP = "mmdebstrap"
META = "image.json"
TMP_PREFIXES = (".build-", ".rm-")
BUILDAH_CACHE = ".buildah"

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class ImageError(Exception):
    """An image could not be built, imported or found; the message says why.

    ``code`` names the failure for API answers (``IMAGE_NOT_FOUND``,
    ``REGISTRY_AUTH_REQUIRED``, ``UNSUPPORTED_MEDIA_TYPE``...).
    """

    def __init__(self, message: str, code: str = "IMAGE_ERROR") -> None:
        super().__init__(message)
        self.code = code


def dir_name(name: str) -> str | None:
    """The store dir of an image name (None: not a name an image can have)."""
    if _NAME.match(name):
        return name
    ref = registry.parse(name)
    if ref is None or not registry.is_reference(name):
        return None
    key = ref.key
    readable = re.sub(r"[^a-z0-9_.-]+", "-", key.lower()).strip("-.")[:40]
    return f"ref-{readable}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def store_key(name: str) -> str:
    """The name image.json keeps: a reference with its implied ``:latest``."""
    ref = registry.parse(name) if registry.is_reference(name) else None
    return ref.key if ref is not None else name


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
    source: str  # "mmdebstrap bookworm +python3,...", "pull REF", "import /path"
    config: ImageConfig = field(default_factory=ImageConfig)
    size: int = 0  # bytes of the rootfs when it was made (0: not measured)

    @property
    def cwd(self) -> str:
        """Where processes start: the image's WorkingDir, else /root if it has one, else /."""
        if self.config.working_dir:
            return self.config.working_dir
        return "/root" if (self.rootfs / "root").is_dir() else "/"

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "rootfs": str(self.rootfs),
            "uid_offset": self.uid_offset,
            "created_at": self.created_at,
            "source": self.source,
            "size": self.size,
            "config": self.config.to_json(),
        }


class ImageStore:
    def __init__(self, root: Path) -> None:
        # Absolute: it ends up in overlay mount options.
        self.root = root.absolute()
        if self.root.is_dir() and os.geteuid() == 0:
            # A store made by an older version was open to everyone (see _tmpdir).
            with contextlib.suppress(OSError):
                os.chmod(self.root, 0o700)

    def get(self, name: str) -> Image | None:
        d = dir_name(name)
        return None if d is None else self._load(d)

    def _load(self, dirname: str) -> Image | None:
        d = self.root / dirname
        try:
            meta = json.loads((d / META).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or not (d / "rootfs").is_dir():
            return None
        return Image(
            name=str(meta.get("name") or dirname),
            rootfs=d / "rootfs",
            uid_offset=int(meta.get("uid_offset", UID_OFFSET)),
            created_at=float(meta.get("created_at", 0)),
            source=str(meta.get("source", "")),
            config=ImageConfig.from_json(meta.get("config") or {}),
            size=int(meta.get("size", 0)),
        )

    def all(self) -> list[Image]:
        out = []
        with contextlib.suppress(OSError):
            for p in self.root.iterdir():
                if not p.name.startswith("."):
                    img = self._load(p.name)
                    if img is not None:
                        out.append(img)
        return sorted(out, key=lambda i: i.name)

    def names(self) -> list[str]:
        return [i.name for i in self.all()]

    def missing_hint(self, name: str) -> str:
        """Why ``name`` cannot be used, what this host has, and the command that gets it."""
        have = ", ".join(self.names()) or "none yet"
        store = f"--images {self.root} " if self.root != Path(DEFAULT_STORE) else ""
        if registry.is_reference(name):
            how = f"pull it with `sandboxd image {store}pull {name}`"
        elif name == DEFAULT_IMAGE:
            how = f"build it with `sandboxd image {store}build`"
        else:
            how = (
                f"build it with `sandboxd image {store}build {name}`, import a root "
                f"filesystem, docker-save tarball or OCI layout with `sandboxd image {store}"
                f"import {name} PATH`, or name a registry image (REGISTRY/REPO:TAG)"
            )
        return f"no image {name!r} on this host (it has: {have}); {how}"

    # -- making images (blocking; the CLI runs these, never the host's loop) --

    def build(
        self,
        name: str,
        packages: tuple[str, ...] = DEFAULT_PACKAGES,
        suite: str = DEFAULT_SUITE,
        mirror: str = DEFAULT_MIRROR,
        log: int | None = None,
        hooks: tuple[str, ...] | None = None,
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
            for hook in default_hooks(suite, mirror) if hooks is None else hooks:
                argv.append("--customize-hook=" + hook)
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

    def import_path(self, name: str, src: Path, log: int | None = None) -> Image:
        """Import a root filesystem tree, a ``docker save`` tarball or an OCI layout dir.

        An OCI layout may be given as ``DIR:TAG``; with one tag, ``DIR`` is enough.
        """
        check_name(name)
        path, tag = src, None
        if not src.exists() and ":" in str(src):
            head, _, tail = str(src).rpartition(":")
            path, tag = Path(head), tail
        if oci.layout_tags(path):
            tags = oci.layout_tags(path)
            if tag is None and len(tags) != 1:
                raise ImageError(
                    f"{path} is an OCI layout with tags {', '.join(tags)}: name one as {path}:TAG",
                    "IMAGE_TAG_REQUIRED",
                )
            tag = tag or tags[0]
            return self._copy_in(name, f"oci:{path}:{tag}", f"import oci {path}:{tag}", log)
        if oci.is_docker_archive(path):
            return self._copy_in(
                name, f"docker-archive:{path}", f"import docker-archive {path}", log
            )
        if path.is_dir():
            return self.import_tree(name, path)
        raise ImageError(
            f"{src} is neither a root filesystem dir, an OCI layout dir nor a docker-save tarball",
            "UNSUPPORTED_ARCHIVE",
        )

    def pull(self, name: str, log: int | None = None, authfile: Path | None = None) -> Image:
        """Fetch a registry image into the store (whole, or not at all)."""
        ref = registry.parse(name) if registry.is_reference(name) else None
        if ref is None:
            raise ImageError(
                f"{name!r} is not an image reference (REGISTRY[:PORT]/REPO[:TAG] or REPO:TAG)",
                "INVALID_REFERENCE",
            )
        return self._copy_in(
            ref.key,
            f"docker://{ref.key}",
            f"pull {ref.key}",
            log,
            insecure=ref.insecure,
            authfile=registry.auth_file(authfile),
        )

    def _copy_in(
        self,
        name: str,
        source: str,
        label: str,
        log: int | None,
        *,
        insecure: bool = False,
        authfile: Path | None = None,
    ) -> Image:
        """skopeo copies ``source`` into an OCI layout in the temp dir; umoci unpacks it."""
        tmp = self._tmpdir(name)
        try:
            t0 = time.monotonic()
            _say(log, f"fetching {source} ...")
            registry.copy(
                source, tmp / "layout", "image", log, src_insecure=insecure, authfile=authfile
            )
            config = oci.read_config(tmp / "layout", "image")
            _say(log, f"fetched in {time.monotonic() - t0:.1f} s; unpacking ...")
            rootfs = oci.unpack(tmp / "layout", "image", tmp / "bundle", log)
            rootfs.rename(tmp / "rootfs")
            shutil.rmtree(tmp / "bundle")
            shutil.rmtree(tmp / "layout")
            if config.working_dir:
                # Docker makes a missing WorkingDir; processes start there.
                wd = tmp / "rootfs" / config.working_dir.lstrip("/")
                with contextlib.suppress(OSError):
                    wd.mkdir(parents=True, exist_ok=True)
            image = self._finish(name, tmp, label, config)
            _say(log, f"image {image.name} ready in {time.monotonic() - t0:.1f} s")
            return image
        except FormatError as exc:
            raise ImageError(str(exc), exc.code) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def remove(self, name: str) -> bool:
        """Remove an image that no sandbox runs on; False if there is no such image."""
        image = self.get(name)
        d = dir_name(name)
        if image is None or d is None:
            return False
        if in_use(image.rootfs):
            # Changing an overlay's lower dir under it is undefined behaviour.
            raise ImageError(f"image {name!r} is in use by a running sandbox", "IMAGE_IN_USE")
        trash = self.root / f".rm-{d}-{os.getpid()}-{time.monotonic_ns()}"
        (self.root / d).rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def prune(self, keep: set[str], dry_run: bool = False) -> list[str]:
        """Remove every image not in ``keep`` and not mounted, and leftovers of dead builds.

        ``keep``: names some snapshot, pool or sandbox record still refers to
        (the caller reads them from the host's state). Returns what went.
        """
        gone: list[str] = []
        keep_dirs = {d for d in (dir_name(k) for k in keep) if d is not None}
        for image in self.all():
            d = image.rootfs.parent.name
            if d in keep_dirs or image.name in keep or in_use(image.rootfs):
                continue
            if not dry_run:
                self.remove(image.name)
            gone.append(image.name)
        building = False
        with contextlib.suppress(OSError):
            for p in self.root.iterdir():
                if not p.name.startswith(TMP_PREFIXES):
                    continue
                if _maker_alive(p.name):
                    building = True
                    continue
                if not dry_run:
                    shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
        # Dockerfile builds' cache (dockerfile.py): bases handed to buildah.
        cache = self.root / BUILDAH_CACHE
        mounted = any(m.point.startswith(f"{cache}/") for m in mounts.table())
        if cache.is_dir() and not building and not mounted:
            if not dry_run:
                shutil.rmtree(cache, ignore_errors=True)
            gone.append(BUILDAH_CACHE)
        return gone

    def _tmpdir(self, name: str) -> Path:
        d = dir_name(name)
        if d is None:
            raise ImageError(f"{name!r} is not an image name", "INVALID_IMAGE_NAME")
        current = self.get(name)
        if current is not None and in_use(current.rootfs):
            raise ImageError(
                f"image {name!r} is in use by a running sandbox; cannot replace it", "IMAGE_IN_USE"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        # Root's alone: an image holds setuid files owned by the sandboxes' uid
        # range, which no user of the machine may run. Overlays reach their
        # lower dirs with the mounter's (root's) credentials.
        os.chmod(self.root, 0o700)
        tmp = self.root / f".build-{d}-{os.getpid()}-{time.monotonic_ns()}"
        (tmp / "rootfs").mkdir(parents=True)
        return tmp

    def _finish(
        self, name: str, tmp: Path, source: str, config: ImageConfig | None = None
    ) -> Image:
        rootfs = tmp / "rootfs"
        shift_owners(rootfs, UID_OFFSET)
        os.chmod(tmp, 0o755)
        meta = {
            "name": store_key(name),
            "uid_offset": UID_OFFSET,
            "created_at": time.time(),
            "source": source,
            "size": tree_size(rootfs),
            "config": (config or ImageConfig()).to_json(),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        dest = self.root / str(dir_name(name))
        if dest.exists():
            self.remove(name)
        tmp.rename(dest)
        image = self.get(name)
        assert image is not None
        return image


def _say(log: int | None, line: str) -> None:
    if log is not None:
        os.write(log, f"sandboxd image: {line}\n".encode())


def _maker_alive(tmp_name: str) -> bool:
    """Whether the process that made a ``.build-…-PID-NS`` dir still runs."""
    parts = tmp_name.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    return Path(f"/proc/{parts[1]}").exists()


def tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def build_default_if_empty(root: Path, log: int | None = None) -> Image | None:
    """On a first start (an empty store) build the default image; None if not needed.

    Raises ImageError if the build fails (no mmdebstrap, no mirror): the host
    then says so and that ``--no-build-default`` skips it.
    """
    store = ImageStore(root)
    if store.all():
        return None
    _say(log, f"the image store {store.root} is empty: building the default image (about 1-2 min)")
    return store.build(DEFAULT_IMAGE, log=log)


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
