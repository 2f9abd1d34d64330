"""Images built from a Dockerfile, with buildah (Debian's package).

``buildah bud`` does the Dockerfile (FROM, RUN, COPY, ENV, WORKDIR, USER,
ARG...) with chroot isolation, in a storage of its own inside the store
(``<images>/.buildah``, overlay driver). A FROM that names an image of the
store (``FROM default``) is handed to buildah as ``localhost/NAME`` first:
its rootfs copied with owners shifted back to 0-based and its config kept,
once per version of that image. A FROM that is a registry reference is pulled
by buildah (loopback and ``SANDBOXD_INSECURE_REGISTRIES`` registries over
plain HTTP, credentials from ``--registry-auth``). The result is pushed to an
OCI layout and imported like any other (images.py), so it is whole or absent.

A build whose every base is in the store needs no registry; its RUN steps
reach whatever network the machine has (``apt-get install`` needs a mirror).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import registry
from .oci import FormatError, check_tools, run_tool

if TYPE_CHECKING:
    from .image_store import Image, ImageStore

BUILDAH = "buildah"
_FROM = re.compile(r"^\s*FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", re.I | re.M)


def bases(dockerfile: str) -> list[str]:
    """The images the Dockerfile's stages start from (not ``scratch``, not earlier stages)."""
    out: list[str] = []
    stages: set[str] = set()
    for m in _FROM.finditer(dockerfile):
        base, alias = m[1], m[2]
        if base.lower() != "scratch" and base not in stages and "$" not in base:
            out.append(base)
        if alias:
            stages.add(alias)
    return out


class Builder:
    def __init__(self, store: ImageStore) -> None:
        self.store = store
        from .image_store import BUILDAH_CACHE

        self.home = store.root / BUILDAH_CACHE

    def _argv(self, *args: str) -> list[str]:
        return [
            BUILDAH,
            "--root",
            str(self.home / "root"),
            "--runroot",
            str(self.home / "run"),
            "--storage-driver",
            "overlay",
            *args,
        ]

    def build(
        self,
        name: str,
        dockerfile: Path,
        context: Path,
        build_args: list[str],
        log: int | None,
        authfile: Path | None = None,
    ) -> Image:
        from .image_store import ImageError, check_name

        check_name(name)
        try:
            check_tools(BUILDAH)
            text = dockerfile.read_text()
        except OSError as exc:
            raise ImageError(f"cannot read {dockerfile}: {exc}", "DOCKERFILE_UNREADABLE") from None
        except FormatError as exc:
            raise ImageError(str(exc), exc.code) from None
        if not context.is_dir():
            raise ImageError(f"the build context {context} is not a dir", "CONTEXT_NOT_FOUND")
        self.store.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.store.root, 0o700)
        insecure = False
        for base in bases(text):
            ref = registry.parse(base) if registry.is_reference(base) else None
            if ref is not None:
                insecure = insecure or ref.insecure
                continue
            if self.store.get(base) is None:
                raise ImageError(self.store.missing_hint(base), "UNKNOWN_IMAGE")
            try:
                self._offer(base, log)
            except FormatError as exc:
                raise ImageError(str(exc), "BUILD_FAILED") from None
        tag = f"localhost/sandboxd-build/{name}:{os.getpid()}-{time.monotonic_ns()}"
        out = self.store.root / f".build-df-{os.getpid()}-{time.monotonic_ns()}"
        argv = self._argv("bud", "--isolation", "chroot", "-f", str(dockerfile), "-t", tag)
        for arg in build_args:
            argv += ["--build-arg", arg]
        if insecure:
            argv.append("--tls-verify=false")
        if authfile is not None:
            argv += ["--authfile", str(authfile)]
        argv.append(str(context))
        try:
            t0 = time.monotonic()
            try:
                run_tool(argv, log)
                run_tool(self._argv("push", "-q", tag, f"oci:{out}:image"), log)
            except FormatError as exc:
                raise ImageError(str(exc), "BUILD_FAILED") from None
            image = self.store._copy_in(name, f"oci:{out}:image", f"dockerfile {dockerfile}", log)
            if log is not None:
                os.write(log, f"built {name} in {time.monotonic() - t0:.1f} s\n".encode())
            return image
        finally:
            shutil.rmtree(out, ignore_errors=True)
            with contextlib.suppress(FormatError):
                run_tool(self._argv("rmi", "-f", tag), None)

    def _offer(self, base: str, log: int | None) -> None:
        """Make the store's image ``base`` buildah's ``localhost/base`` (unless it already is)."""
        from .image_store import UID_OFFSET

        image = self.store.get(base)
        assert image is not None
        marker = self.home / "bases" / f"{base}.json"
        stamp = json.dumps({"created_at": image.created_at, "source": image.source})
        try:
            present = run_tool(self._argv("images", "-q", f"localhost/{base}:latest"), None)
        except FormatError:
            present = ""  # "image not known"
        with contextlib.suppress(OSError):
            if present.strip() and marker.read_text() == stamp:
                return
        if log is not None:
            os.write(log, f"handing the store's image {base} to buildah ...\n".encode())
        ctr = f"sandboxd-base-{base}-{os.getpid()}"
        run_tool(self._argv("from", "--name", ctr, "scratch"), None)
        try:
            mnt = Path(run_tool(self._argv("mount", ctr), None).strip())
            run_tool(["cp", "-a", "--", f"{image.rootfs}/.", str(mnt)], None)
            unshift_owners(mnt, UID_OFFSET)
            config = []
            for k, v in image.config.env_pairs():
                config += ["--env", f"{k}={v}"]
            if image.config.working_dir:
                config += ["--workingdir", image.config.working_dir]
            if image.config.user:
                config += ["--user", image.config.user]
            if config:
                run_tool(self._argv("config", *config, ctr), None)
            run_tool(self._argv("commit", "-q", ctr, f"localhost/{base}:latest"), None)
        finally:
            with contextlib.suppress(FormatError):
                run_tool(self._argv("rm", ctr), None)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(stamp)


def unshift_owners(root: Path, offset: int) -> None:
    """The reverse of images.shift_owners: owners ≥ offset go back to 0-based."""

    def unshift(path: str) -> None:
        st = os.lstat(path)
        if st.st_uid < offset and st.st_gid < offset:
            return
        uid = st.st_uid - offset if st.st_uid >= offset else st.st_uid
        gid = st.st_gid - offset if st.st_gid >= offset else st.st_gid
        os.lchown(path, uid, gid)
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            os.chmod(path, stat.S_IMODE(st.st_mode))

    unshift(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            unshift(os.path.join(dirpath, n))
