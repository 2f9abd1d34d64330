"""Lifecycle requests and replies as the Tensorlake SDK speaks them; no I/O here.

Validation turns a create or PATCH body into a typed spec or an :class:`ApiError`
(always a 4xx with a specific ``code``: a 5xx on create would be misread by the
SDK, which does not retry creates). :func:`info` renders a record as the
SandboxInfo the SDK parses (docs/self-hosted.md).
"""

from __future__ import annotations

import contextvars
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..edge.errors import ApiError  # the shared edge's; imported from here too
from . import labels as _labels
from . import states
from .images import registry
from .network.sandbox_network import PolicyError, normalize_policy
from .states import Status
from .volumes import volspec

# The statuses and every change of them: states.py (the one state machine).
PENDING = Status.PENDING
RUNNING = Status.RUNNING
SUSPENDING = Status.SUSPENDING
SUSPENDED = Status.SUSPENDED
TERMINATED = Status.TERMINATED
FAILED = Status.FAILED
SNAPSHOTTING = Status.SNAPSHOTTING
# The SDK's SandboxStatus enum: ours, and "timeout", which this host never sets.
STATUSES = frozenset({*Status, "timeout"})
# Live: holds its name, is listed, can be deleted. A suspended sandbox is frozen
# (cgroup freezer), its memory and processes intact.
LIVE = frozenset(s.value for s in states.LIVE)  # plain str: it goes into SQL

# Image names that map to the store's "default" image (images/image_store.py). The SDK's
# managed base names are accepted so scripts written for Tensorlake run
# unchanged; any other name must be an image of the store (else 400).
DEFAULT_IMAGE = "default"
IMAGE_ALIASES = frozenset(
    {
        DEFAULT_IMAGE,
        "python",
        "tensorlake/ubuntu-minimal",
        "tensorlake/debian-minimal",
    }
)

_IMAGE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


def canonical_image(image: Any) -> str:
    """The store's name for a requested image; whether it exists is the store's to say."""
    if not isinstance(image, str):
        raise bad("UNKNOWN_IMAGE", "image must be a string")
    if image in IMAGE_ALIASES:
        return DEFAULT_IMAGE
    # issue 17: a registry reference (REGISTRY[:PORT]/REPO:TAG) is kept as asked.
    if not _IMAGE.match(image) and not registry.is_reference(image):
        raise bad(
            "UNKNOWN_IMAGE",
            f"unknown image {image!r}: give a local image name (letters, digits, '.', '_', "
            "'-') or a registry reference such as registry.example.com:5000/team/app:1.0",
        )
    return image


DEFAULT_CPUS = 1.0
DEFAULT_MEMORY_MB = 1024
DEFAULT_DISK_MB = 10240
MIN_MEMORY_MB = 64  # below this the sandbox's own daemon does not start
MAX_TIMEOUT_SECS = 10 * 365 * 86400

# DNS-label-like: names end up in URLs and logs; ids start with "sbx-", which
# names may not, so a lookup by "id or name" is never ambiguous.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

_CREATE_KEYS = frozenset(
    {
        "auto_resume",
        "image",
        "resources",
        "timeout_secs",
        "entrypoint",
        "network",
        "snapshot_id",
        "allow_unauthenticated_access",
        "exposed_ports",
        "name",
        "file_systems",
        "wait",
        "max_pending_secs",
        "secret_names",
        "template_id",
        "labels",  # issue 18: user labels (labels.py); the SDK sends none
    }
)


def bad(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def new_id() -> str:
    return "sbx-" + secrets.token_hex(8)


# Set around a create that moves a sandbox here from another node of a fleet
# (fleet/move.py): the new record keeps the sandbox's id. A fleet's placed
# create sets it too (fleet/placement.py), and is told through SPARE_TAKEN
# when the create took a warm spare, whose id it has instead.
GIVEN_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("sandbox_id", default=None)
SPARE_TAKEN: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "spare_taken", default=None
)


def check_namespace(ns: str) -> str:
    if not _NAMESPACE.match(ns):
        raise bad("INVALID_NAMESPACE", f"namespace {ns!r} is not a valid name")
    return ns


@dataclass(frozen=True, slots=True)
class CreateSpec:
    """A validated CreateSandboxRequest."""

    image: str = DEFAULT_IMAGE
    cpus: float = DEFAULT_CPUS
    memory_mb: int = DEFAULT_MEMORY_MB
    disk_mb: int = DEFAULT_DISK_MB
    timeout_secs: int = 0
    name: str | None = None
    wait: bool = True
    entrypoint: list[str] | None = None
    exposed_ports: list[int] = field(default_factory=list)
    allow_unauthenticated_access: bool = False
    network: dict[str, Any] | None = None
    auto_resume: bool = True
    snapshot_id: str | None = None  # a restore: the rw dir comes from this snapshot
    # The image name as the request gave it (an alias such as "python" reads back as such).
    image_asked: str | None = None
    labels: dict[str, str] = field(default_factory=dict)  # labels.py
    # Volumes to mount (volumes/volspec.py, volumes/volume_store.py): [{file_system_id, mount_path, read_only}].
    file_systems: list[dict[str, Any]] = field(default_factory=list)


def _int(value: Any, key: str, lo: int, hi: int) -> int:
    # bool is an int in Python; JSON true is not a number.
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad("INVALID_" + key.upper(), f"{key} must be an integer")
    if not lo <= value <= hi:
        raise bad("INVALID_" + key.upper(), f"{key} must be between {lo} and {hi}")
    return value


def check_name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value) or value.startswith("sbx-"):
        raise bad(
            "INVALID_NAME",
            "name must be 1-63 letters, digits, '.', '_' or '-', start with a letter or "
            "digit, and not start with 'sbx-'",
        )
    return value


def _ports(value: Any) -> list[int]:
    if not isinstance(value, list):
        raise bad("INVALID_EXPOSED_PORTS", "exposed_ports must be a list of ports")
    return sorted({_int(p, "exposed_ports", 1, 65535) for p in value})


def parse_create(body: Any, host_cpus: int | None = None) -> CreateSpec:
    if not isinstance(body, dict):
        raise bad("INVALID_BODY", "the body must be a JSON object")
    unknown = sorted(set(body) - _CREATE_KEYS)
    if unknown:
        raise bad("UNKNOWN_FIELD", f"unknown field(s): {', '.join(unknown)}")
    # Features this host does not have are refused, never silently ignored.
    for key, code in (
        ("template_id", "TEMPLATES_UNSUPPORTED"),
        ("secret_names", "SECRETS_UNSUPPORTED"),
    ):
        if body.get(key):
            raise bad(code, f"{key} is not supported by this self-hosted sandboxd")
    asked = body.get("image") or None
    image = canonical_image(asked or DEFAULT_IMAGE)
    res = body.get("resources") or {}
    if not isinstance(res, dict):
        raise bad("INVALID_RESOURCES", "resources must be an object")
    if res.get("gpus"):
        raise bad("GPUS_UNSUPPORTED", "this host has no GPUs")
    cpus_raw = res.get("cpus", DEFAULT_CPUS)
    if isinstance(cpus_raw, bool) or not isinstance(cpus_raw, (int, float)):
        raise bad("INVALID_CPUS", "resources.cpus must be a number")
    max_cpus = host_cpus or os.cpu_count() or 1
    if not 0 < cpus_raw <= max_cpus:
        raise bad("INVALID_CPUS", f"resources.cpus must be > 0 and at most {max_cpus}")
    memory_mb = _int(res.get("memory_mb", DEFAULT_MEMORY_MB), "memory_mb", MIN_MEMORY_MB, 1 << 22)
    # ext4 files stop at 16 TiB; 1 TiB is plenty for one sandbox on one host.
    disk_mb = _int(res.get("disk_mb", DEFAULT_DISK_MB), "disk_mb", 16, 1 << 20)
    timeout = _int(body.get("timeout_secs", 0) or 0, "timeout_secs", 0, MAX_TIMEOUT_SECS)
    name = body.get("name")
    if name is not None:
        name = check_name(name)
    wait = body.get("wait", True)
    if not isinstance(wait, bool):
        raise bad("INVALID_WAIT", "wait must be a boolean")
    entry = body.get("entrypoint")
    if entry is not None and (
        not isinstance(entry, list) or not all(isinstance(a, str) for a in entry)
    ):
        raise bad("INVALID_ENTRYPOINT", "entrypoint must be a list of strings")
    if entry is not None and entry and not entry[0]:
        raise bad("INVALID_ENTRYPOINT", "entrypoint's first element must name a command")
    network = check_network(body.get("network"))
    auto_resume = body.get("auto_resume", True)
    if not isinstance(auto_resume, bool):
        raise bad("INVALID_AUTO_RESUME", "auto_resume must be a boolean")
    auth = body.get("allow_unauthenticated_access", False)
    if not isinstance(auth, bool):
        raise bad("INVALID_ALLOW_UNAUTHENTICATED_ACCESS", "must be a boolean")
    # A restore: the snapshot's image and resources were filled in before this
    # (snapshots.Snapshots.inherit, which also answers 404 for an unknown one).
    snapshot_id = body.get("snapshot_id")
    if snapshot_id is not None and (not isinstance(snapshot_id, str) or not snapshot_id):
        raise bad("INVALID_SNAPSHOT_ID", "snapshot_id must be a snapshot's id")
    return CreateSpec(
        image=image,
        cpus=float(cpus_raw),
        memory_mb=memory_mb,
        disk_mb=disk_mb,
        timeout_secs=timeout,
        name=name,
        wait=wait,
        entrypoint=list(entry) if entry else None,
        exposed_ports=_ports(body.get("exposed_ports", [])),
        allow_unauthenticated_access=auth,
        network=network,
        auto_resume=auto_resume,
        snapshot_id=snapshot_id,
        image_asked=asked if isinstance(asked, str) else None,
        file_systems=volspec.parse_mounts(body.get("file_systems")),
        labels=_labels.check_labels(body.get("labels")),
    )


@dataclass(slots=True)
class Record:
    """One sandbox as stored: the spec it was made with plus its lifecycle state."""

    id: str
    namespace: str
    status: str
    image: str
    cpus: float
    memory_mb: int
    disk_mb: int
    timeout_secs: int
    created_at: float
    name: str | None = None
    exposed_ports: list[int] = field(default_factory=list)
    allow_unauthenticated_access: bool = False
    network: dict[str, Any] | None = None
    terminated_at: float | None = None
    termination_reason: str | None = None
    error: str | None = None
    auto_resume: bool = True  # a request through the proxy resumes a suspended sandbox
    snapshot_id: str | None = None  # restored from this snapshot
    pool_id: str | None = None  # claimed from this pool (pools.py)
    # The latest live resize (resize.py): {generation, requested, status, error_message?}.
    resource_resize: dict[str, Any] | None = None
    # While "snapshotting": what it was before (running or suspended), so a
    # host that stops mid-snapshot puts it back as it was.
    status_before: str | None = None
    # A resume starts a new timeout_secs: from then, not from created_at.
    lifetime_from: float | None = None
    image_asked: str | None = None  # what info reports as its image (CreateSpec.image_asked)
    # Started through the daemon's process API once it answered (entrypoint.py);
    # why it could not start, if it could not (the sandbox runs on).
    entrypoint: list[str] | None = None
    entrypoint_pid: int | None = None
    entrypoint_error: str | None = None
    # Volumes mounted (volumes/volume_store.py): [{file_system_id, mount_path, read_only}].
    file_systems: list[dict[str, Any]] | None = None
    labels: dict[str, str] = field(default_factory=dict)  # user labels (labels.py)

    @classmethod
    def new(cls, namespace: str, spec: CreateSpec, now: float) -> Record:
        return cls(
            id=GIVEN_ID.get() or new_id(),
            namespace=namespace,
            status=PENDING,
            image=spec.image,
            cpus=spec.cpus,
            memory_mb=spec.memory_mb,
            disk_mb=spec.disk_mb,
            timeout_secs=spec.timeout_secs,
            created_at=now,
            name=spec.name,
            exposed_ports=list(spec.exposed_ports),
            allow_unauthenticated_access=spec.allow_unauthenticated_access,
            network=spec.network,
            auto_resume=spec.auto_resume,
            snapshot_id=spec.snapshot_id,
            image_asked=spec.image_asked,
            entrypoint=list(spec.entrypoint) if spec.entrypoint else None,
            file_systems=[dict(f) for f in spec.file_systems] or None,
            labels=dict(spec.labels),
        )

    @property
    def live(self) -> bool:
        return self.status in LIVE

    def deadline(self) -> float | None:
        if self.timeout_secs <= 0:
            return None
        return (self.lifetime_from or self.created_at) + self.timeout_secs


def check_network(value: Any) -> dict[str, Any] | None:
    """``network`` (create, PATCH) → its stored form; None stays None (the default policy)."""
    if value is None:
        return None
    try:
        return normalize_policy(value)
    except PolicyError as exc:
        raise bad(exc.code, str(exc)) from exc


def ingress_endpoint(sandbox_url: str) -> str:
    """Where exposed ports are (``ingress.py``): the proxy, named ``localhost``.

    The SDK's ``url_for_port(p)`` makes ``http://<p>-<id>.localhost:<port>``
    of it, which curl and browsers resolve to loopback.
    """
    return sandbox_url.replace("://127.0.0.1", "://localhost", 1)


def info(rec: Record, sandbox_url: str) -> dict[str, Any]:
    """SandboxInfo (§4.3). ``sandbox_url`` only while the sandbox can answer."""
    out: dict[str, Any] = {
        # Only "id": the SDK's serde treats sandbox_id as an alias and rejects both.
        "id": rec.id,
        "namespace": rec.namespace,
        "status": rec.status,
        "image": rec.image_asked or rec.image,
        "resources": {"cpus": rec.cpus, "memory_mb": rec.memory_mb, "disk_mb": rec.disk_mb},
        "timeout_secs": rec.timeout_secs,
        "created_at": rec.created_at,
        "allow_unauthenticated_access": rec.allow_unauthenticated_access,
        "exposed_ports": rec.exposed_ports,
        "runtime": "bubblewrap",
        "auto_resume": rec.auto_resume,
        "labels": rec.labels,  # the SDK's models drop it; our list filters on it
    }
    if rec.name is not None:
        out["name"] = rec.name
    if rec.entrypoint:
        out["entrypoint"] = rec.entrypoint
    if rec.network is not None:
        out["network_policy"] = rec.network
    if rec.pool_id is not None:
        out["pool_id"] = rec.pool_id
    out["file_systems"] = volspec.wire(rec.file_systems)
    if rec.resource_resize is not None:
        out["resource_resize"] = rec.resource_resize
    # Suspended too: the SDK's connect/get_or_create need it, and a request
    # through the proxy resumes the sandbox (or waits out a snapshot).
    if rec.status in (RUNNING, SUSPENDING, SUSPENDED, SNAPSHOTTING):
        out["sandbox_url"] = sandbox_url
        out["ingress_endpoint"] = ingress_endpoint(sandbox_url)
    if rec.terminated_at is not None:
        out["terminated_at"] = rec.terminated_at
    if rec.termination_reason is not None:
        out["termination_reason"] = rec.termination_reason
        # Only an ended sandbox has an outcome; a suspended one has none (it may resume).
        kind = "Failure" if rec.status == FAILED else "Success"
        if rec.status in (TERMINATED, FAILED):
            out["outcome"] = f"{kind}({rec.termination_reason})"
    if rec.error is not None:
        out["error_details"] = {"message": rec.error}
    elif rec.entrypoint_error is not None:
        out["error_details"] = {
            "code": "ENTRYPOINT_FAILED",
            "message": f"the entrypoint could not start: {rec.entrypoint_error}",
        }
    return out


def parse_update(body: Any) -> dict[str, Any]:
    """A PATCH body → the changes to apply."""
    if not isinstance(body, dict) or not body:
        raise bad("INVALID_BODY", "the body must be a non-empty JSON object")
    changes: dict[str, Any] = {}
    for key, value in body.items():
        if key == "name":
            changes["name"] = check_name(value)
        elif key == "exposed_ports":
            changes["exposed_ports"] = _ports(value)
        elif key == "allow_unauthenticated_access":
            if not isinstance(value, bool):
                raise bad("INVALID_ALLOW_UNAUTHENTICATED_ACCESS", "must be a boolean")
            changes[key] = value
        elif key == "auto_resume":
            if not isinstance(value, bool):
                raise bad("INVALID_AUTO_RESUME", "auto_resume must be a boolean")
            changes[key] = value
        elif key == "resources":
            if len(body) > 1:
                raise bad("INVALID_UPDATE", "resources cannot be combined with other changes")
            changes[key] = parse_resize(value)
        elif key == "network":
            # An object replaces the policy, null clears it (back to the default).
            changes[key] = check_network(value)
        elif key == "labels":  # replaces them all; {} or null clears them
            changes[key] = _labels.check_labels(value)
        else:
            raise bad("UNKNOWN_FIELD", f"unknown field {key!r}")
    return changes


def parse_resize(value: Any, host_cpus: int | None = None) -> dict[str, Any]:
    """PATCH ``resources``: the targets given (cpus, memory_mb, disk_mb); resize.py applies them."""
    if not isinstance(value, dict) or not value:
        raise bad(
            "INVALID_RESOURCES", "resources must be an object with cpus, memory_mb or disk_mb"
        )
    if value.get("gpus"):
        raise bad("GPUS_UNSUPPORTED", "this host has no GPUs")
    unknown = sorted(set(value) - {"cpus", "memory_mb", "disk_mb", "gpus"})
    if unknown:
        raise bad("UNKNOWN_FIELD", f"unknown resources field(s): {', '.join(unknown)}")
    out: dict[str, Any] = {}
    if value.get("cpus") is not None:
        cpus = value["cpus"]
        max_cpus = host_cpus or os.cpu_count() or 1
        if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not 0 < cpus <= max_cpus:
            raise bad("INVALID_CPUS", f"resources.cpus must be > 0 and at most {max_cpus}")
        out["cpus"] = float(cpus)
    if value.get("memory_mb") is not None:
        out["memory_mb"] = _int(value["memory_mb"], "memory_mb", MIN_MEMORY_MB, 1 << 22)
    if value.get("disk_mb") is not None:
        out["disk_mb"] = _int(value["disk_mb"], "disk_mb", 16, 1 << 20)
    if not out:
        raise bad("INVALID_RESOURCES", "resources must set cpus, memory_mb or disk_mb")
    return out
