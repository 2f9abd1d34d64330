"""Image references and copies from registries and archives (with skopeo).

A reference is Docker's: ``[HOST[:PORT]/]PATH[:TAG][@DIGEST]``; the first
component is a registry host when it has a ``.`` or a ``:`` or is
``localhost`` (else the image is on Docker Hub, as Docker reads it). A bare
name with neither ``/`` nor ``:`` (``default``, ``myimage``) is a name of the
local store, never fetched.

``skopeo copy`` does the registry protocol (auth, manifest lists resolved for
this machine's architecture, Docker v2 and OCI manifests, gzip and zstd
layers) and writes an OCI layout that oci.py unpacks. Registries on loopback,
and those named in ``SANDBOXD_INSECURE_REGISTRIES`` (comma-separated
``host:port``), are spoken to over plain HTTP, as Docker does for localhost.
Credentials: a Docker config file (``{"auths": {HOST: {"auth": base64}}}``),
``--registry-auth`` or ``SANDBOXD_REGISTRY_AUTH``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .oci import SKOPEO, FormatError, check_tools, run_tool

AUTH_ENV = "SANDBOXD_REGISTRY_AUTH"
INSECURE_ENV = "SANDBOXD_INSECURE_REGISTRIES"
LOOPBACK = ("localhost", "127.", "[::1]")

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_REF = re.compile(
    rf"^(?:(?P<host>{_HOST})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
MAX_REF = 255


@dataclass(frozen=True, slots=True)
class Reference:
    host: str | None  # None: Docker Hub
    path: str
    tag: str | None
    digest: str | None

    @property
    def key(self) -> str:
        """The store's name for it: as written, with ``:latest`` when it names no tag."""
        base = f"{self.host}/{self.path}" if self.host else self.path
        if self.tag is None and self.digest is None:
            return f"{base}:latest"
        return (
            base + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")
        )

    @property
    def insecure(self) -> bool:
        if self.host is None:
            return False
        extra = {h.strip() for h in os.environ.get(INSECURE_ENV, "").split(",") if h.strip()}
        return self.host.startswith(LOOPBACK) or self.host in extra


def is_reference(name: str) -> bool:
    """Whether ``name`` is a registry reference (else a local store name)."""
    return ("/" in name or ":" in name or "@" in name) and parse(name) is not None


def parse(name: str) -> Reference | None:
    if len(name) > MAX_REF:
        return None
    m = _REF.match(name)
    if m is None:
        return None
    host, path = m["host"], m["path"]
    if host is not None and not ("." in host or ":" in host or host == "localhost"):
        # "library/python": a Docker Hub path, not a host (Docker's rule).
        if not re.fullmatch(_COMPONENT, host):
            return None
        host, path = None, f"{host}/{path}"
    return Reference(host=host, path=path, tag=m["tag"], digest=m["digest"])


def auth_file(explicit: Path | None = None) -> Path | None:
    if explicit is not None:
        return explicit
    env = os.environ.get(AUTH_ENV)
    return Path(env) if env else None


# skopeo's words for each failure the host names with a code of its own.
_ERRORS = (
    ("REGISTRY_AUTH_REQUIRED", ("unauthorized", "authentication required", "401")),
    ("IMAGE_NOT_FOUND", ("manifest unknown", "name unknown", "not found", "404")),
    ("UNSUPPORTED_MEDIA_TYPE", ("unsupported", "unknown media type", "mediatype")),
    ("REGISTRY_UNREACHABLE", ("connection refused", "no such host", "i/o timeout", "dial tcp")),
)


def classify(text: str) -> str:
    low = text.lower()
    for code, words in _ERRORS:
        if any(w in low for w in words):
            return code
    return "IMAGE_PULL_FAILED"


def copy(
    source: str,
    layout: Path,
    tag: str,
    log: int | None,
    *,
    src_insecure: bool = False,
    authfile: Path | None = None,
) -> None:
    """``skopeo copy SOURCE oci:LAYOUT:TAG`` (SOURCE in skopeo's transport syntax)."""
    check_tools(SKOPEO)
    argv = [SKOPEO, "copy"]
    if authfile is not None:
        if not authfile.is_file():
            raise FormatError("REGISTRY_AUTH_FILE", f"no registry auth file {authfile}")
        argv += ["--src-authfile", str(authfile)]
    elif source.startswith("docker://"):
        # Not root's own ~/.docker or containers auth: only what the operator names.
        argv += ["--src-no-creds"]
    if src_insecure:
        argv.append("--src-tls-verify=false")
    # umoci (0.4.7, Debian 12) unpacks gzip layers only: zstd ones are
    # recompressed on the way in; gzip ones are copied as they are.
    argv += ["--dest-compress-format", "gzip"]
    argv += [source, f"oci:{layout}:{tag}"]
    try:
        run_tool(argv, log)
    except FormatError as exc:
        code = classify(str(exc))
        if not source.startswith("docker://") and code != "UNSUPPORTED_MEDIA_TYPE":
            code = "IMAGE_IMPORT_FAILED"
        if code == "REGISTRY_AUTH_REQUIRED" and authfile is not None:
            code = "REGISTRY_AUTH_REFUSED"
        raise FormatError(code, str(exc)) from None
