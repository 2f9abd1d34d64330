"""OCI image layouts: the config an image carries, and its unpacking (with umoci).

Every image that does not come from mmdebstrap passes through an OCI layout
dir: ``skopeo copy`` (registry.py) turns a registry image, a ``docker save``
tarball or another layout into one, resolving a manifest list for this
machine's architecture and converting Docker v2 manifests, and ``umoci
unpack`` applies its layers in order (gzip or zstd, whiteouts included) into
a root filesystem. Neither format is parsed by hand beyond reading the image
config (JSON) out of the layout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

UMOCI = "umoci"
SKOPEO = "skopeo"
INDEX_MEDIA = "application/vnd.oci.image.index.v1+json"
REF_ANNOTATION = "org.opencontainers.image.ref.name"


class FormatError(Exception):
    """A tool failed or an archive is not what it should be; ``code`` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """What an image asks of the processes started in it (OCI image config ``config``).

    ``entrypoint`` and ``cmd`` are the sandbox's entrypoint when a create names
    none (``entrypoint.of_image``).
    """

    env: tuple[str, ...] = ()
    working_dir: str | None = None
    user: str | None = None
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()

    @classmethod
    def from_oci(cls, config: dict[str, Any]) -> ImageConfig:
        c = config.get("config") or {}

        def strings(key: str) -> tuple[str, ...]:
            v = c.get(key) or []
            return tuple(str(x) for x in v) if isinstance(v, list) else ()

        return cls(
            env=tuple(e for e in strings("Env") if "=" in e),
            working_dir=str(c["WorkingDir"]) if c.get("WorkingDir") else None,
            user=str(c["User"]) if c.get("User") else None,
            entrypoint=strings("Entrypoint"),
            cmd=strings("Cmd"),
        )

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImageConfig:
        return cls(
            env=tuple(d.get("env") or ()),
            working_dir=d.get("working_dir"),
            user=d.get("user"),
            entrypoint=tuple(d.get("entrypoint") or ()),
            cmd=tuple(d.get("cmd") or ()),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "env": list(self.env),
            "working_dir": self.working_dir,
            "user": self.user,
            "entrypoint": list(self.entrypoint),
            "cmd": list(self.cmd),
        }

    def env_pairs(self) -> list[tuple[str, str]]:
        out = []
        for e in self.env:
            k, _, v = e.partition("=")
            if k:
                out.append((k, v))
        return out


def check_tools(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise FormatError("TOOL_MISSING", f"{tool} is not installed: apt-get install -y {tool}")


def run_tool(argv: Sequence[str], log: int | None) -> str:
    """Run a tool to the end; its output goes to ``log`` (progress) and is returned.

    Whatever interrupts the caller (Ctrl-C, SIGTERM turned into an exception,
    a cancelled thread's host stopping) ends the tool first, so nothing keeps
    writing into a temporary dir that is being removed.
    """
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out: list[bytes] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if log is not None:
                os.write(log, line)
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    text = b"".join(out).decode(errors="replace")
    if proc.returncode != 0:
        raise FormatError("TOOL_FAILED", f"{argv[0]} failed ({proc.returncode}): {text[-2000:]}")
    return text


def _blob(layout: Path, digest: str) -> dict[str, Any]:
    algo, _, hexd = digest.partition(":")
    data = json.loads((layout / "blobs" / algo / hexd).read_text())
    if not isinstance(data, dict):
        raise FormatError("UNSUPPORTED_MEDIA_TYPE", f"blob {digest} is not a JSON object")
    return data


def read_config(layout: Path, tag: str) -> ImageConfig:
    """The image config of ``layout:tag`` (a layout skopeo wrote: one manifest per tag)."""
    index = json.loads((layout / "index.json").read_text())
    for desc in index.get("manifests", []):
        if (desc.get("annotations") or {}).get(REF_ANNOTATION) != tag:
            continue
        manifest = _blob(layout, desc["digest"])
        return ImageConfig.from_oci(_blob(layout, manifest["config"]["digest"]))
    raise FormatError("IMAGE_NOT_FOUND", f"no image tagged {tag!r} in {layout}")


def layout_tags(layout: Path) -> list[str]:
    """The tags of an OCI layout dir (empty if it is not one)."""
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError):
        return []
    tags = []
    for desc in index.get("manifests", []) if isinstance(index, dict) else []:
        ref = (desc.get("annotations") or {}).get(REF_ANNOTATION)
        if isinstance(ref, str):
            tags.append(ref)
    return tags


def unpack(layout: Path, tag: str, bundle: Path, log: int | None) -> Path:
    """Apply the layers of ``layout:tag`` into ``bundle/rootfs`` (owners as in the layers)."""
    check_tools(UMOCI)
    try:
        run_tool([UMOCI, "unpack", "--image", f"{layout}:{tag}", str(bundle)], log)
    except FormatError as exc:
        media = "mediatype" in str(exc).lower() or "media type" in str(exc).lower()
        code = "UNSUPPORTED_MEDIA_TYPE" if media else "IMAGE_UNPACK_FAILED"
        raise FormatError(code, str(exc)) from None
    return bundle / "rootfs"


def is_docker_archive(path: Path) -> bool:
    """A ``docker save`` tarball has a manifest.json at its top."""
    import tarfile

    if not path.is_file():
        return False
    try:
        with tarfile.open(path) as tar:
            return any(m.name.lstrip("./") == "manifest.json" for m in tar)
    except (tarfile.TarError, OSError):
        return False
