"""``file_systems`` mounts as the SDK sends them, validated; no I/O here.

A mount is ``{"file_system_id", "mount_path", "read_only"?, "prefetch"?,
"snapshot_id"?, "owner"?}`` (the SDK omits false and unset fields). Here a
``file_system_id`` names a volume of the host (:mod:`.volumes`) in the
sandbox's namespace. What the host cannot do is refused with its own code,
never dropped: ``snapshot_id`` (volumes have no snapshots here), ``owner``
(files keep the owner that wrote them).
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

from ...edge.errors import ApiError

# Like sandbox names: they end up in paths and URLs.
VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_MOUNTS = 16
MAX_PATH = 1024
# Where a volume may never go: the sandbox's own kernel views and the daemon's runtime.
FORBIDDEN = ("/proc", "/sys", "/dev", "/run/sandboxd-rt")
_MOUNT_KEYS = frozenset(
    {"file_system_id", "mount_path", "read_only", "prefetch", "snapshot_id", "owner"}
)


def bad(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def check_volume_name(value: Any) -> str:
    if not isinstance(value, str) or not VOLUME_NAME.match(value):
        raise bad(
            "INVALID_FILE_SYSTEM_ID",
            "a file system id is a volume's name: 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
        )
    return value


def check_mount_path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise bad(
            "INVALID_MOUNT_PATH",
            f"mount_path must be an absolute path in the sandbox (such as /mnt/data), "
            f"not {value!r}",
        )
    if len(value) > MAX_PATH or "\0" in value:
        raise bad("INVALID_MOUNT_PATH", f"mount_path must be under {MAX_PATH} bytes, no NUL")
    parts = value.split("/")
    if any(p in (".", "..") for p in parts):
        raise bad("INVALID_MOUNT_PATH", f"mount_path {value!r} must not contain '.' or '..'")
    path = posixpath.normpath(value)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    if path == "/":
        raise bad("MOUNT_PATH_FORBIDDEN", "a volume cannot be mounted over / : pick a directory")
    for root in FORBIDDEN:
        if path == root or path.startswith(root + "/"):
            raise bad(
                "MOUNT_PATH_FORBIDDEN",
                f"a volume cannot be mounted at {path} ({root} is the sandbox's own); "
                "pick a directory such as /mnt/data",
            )
    return path


def parse_mount(value: Any) -> dict[str, Any]:
    """One FileSystemMount → ``{"file_system_id", "mount_path", "read_only"}``."""
    if not isinstance(value, dict):
        raise bad("INVALID_FILE_SYSTEMS", "each file system mount must be an object")
    unknown = sorted(set(value) - _MOUNT_KEYS)
    if unknown:
        raise bad("UNKNOWN_FIELD", f"unknown file system mount field(s): {', '.join(unknown)}")
    name = check_volume_name(value.get("file_system_id"))
    path = check_mount_path(value.get("mount_path"))
    read_only = value.get("read_only", False)
    prefetch = value.get("prefetch", False)
    if not isinstance(read_only, bool) or not isinstance(prefetch, bool):
        raise bad("INVALID_FILE_SYSTEMS", "read_only and prefetch must be booleans")
    if value.get("snapshot_id") is not None:
        raise bad(
            "FILE_SYSTEM_SNAPSHOTS_UNSUPPORTED",
            "volumes on this host have no snapshots: mount the volume itself (no snapshot_id)",
        )
    if value.get("owner") is not None:
        raise bad(
            "MOUNT_OWNER_UNSUPPORTED",
            "this host does not remap a volume's owner: files keep the owner that wrote them "
            "(every sandbox's root is the same user); leave owner unset",
        )
    # prefetch: the volume is on the host's own disk already; nothing to fetch.
    return {"file_system_id": name, "mount_path": path, "read_only": read_only}


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def check_free(mounts: list[dict[str, Any]], path: str) -> None:
    """409 when ``path`` is, is under, or is above a path already mounted."""
    for m in mounts:
        if _overlaps(m["mount_path"], path):
            raise ApiError(
                409,
                "MOUNT_PATH_IN_USE",
                f"{m['file_system_id']!r} is mounted at {m['mount_path']}, which overlaps "
                f"{path}: detach it first or pick another path",
            )


def parse_mounts(value: Any) -> list[dict[str, Any]]:
    """``file_systems`` of a create: a list of mounts at distinct, non-nested paths."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad("INVALID_FILE_SYSTEMS", "file_systems must be a list of mounts")
    if len(value) > MAX_MOUNTS:
        raise bad("INVALID_FILE_SYSTEMS", f"at most {MAX_MOUNTS} file systems per sandbox")
    out: list[dict[str, Any]] = []
    for item in value:
        m = parse_mount(item)
        try:
            check_free(out, m["mount_path"])
        except ApiError as exc:
            raise bad("MOUNT_PATH_IN_USE", exc.message) from exc
        out.append(m)
    return out


def wire(mounts: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """As SandboxInfo's ``file_systems``: the SDK's FileSystemMount (false omitted)."""
    out = []
    for m in mounts or []:
        item = {"file_system_id": m["file_system_id"], "mount_path": m["mount_path"]}
        if m.get("read_only"):
            item["read_only"] = True
        out.append(item)
    return out
