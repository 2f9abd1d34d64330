"""Who may SSH into which namespace's sandboxes: one authorized-keys file per namespace.

The files are ``STATE_DIR/ssh/authorized_keys/<namespace>``, in OpenSSH's
``authorized_keys`` format (one public key per line, options not supported),
root's only (dir 0700, files 0600). The operator manages them with ``sandboxd
host ssh-keys add|list|rm`` (or by editing them); the gateway reads them at
each login, so a change applies to the next connection without a restart.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..model import check_namespace


class SshKeyError(Exception):
    """A key or namespace the operator gave that cannot be used; one line for the CLI."""


@dataclass(frozen=True, slots=True)
class AuthorizedKey:
    namespace: str
    algorithm: str
    fingerprint: str  # SHA256:...
    comment: str
    line: str


def parse_public_key(line: str) -> tuple[str, str, str] | None:
    """(algorithm, fingerprint, comment) of one public key line, None for blank/comment."""
    import asyncssh

    text = line.strip()
    if not text or text.startswith("#"):
        return None
    try:
        key = asyncssh.import_public_key(text)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise SshKeyError(f"not an OpenSSH public key ({exc}): {text[:40]}...") from None
    parts = text.split(None, 2)
    comment = parts[2] if len(parts) > 2 else ""
    return key.get_algorithm(), key.get_fingerprint("sha256"), comment


class AuthorizedKeys:
    """The per-namespace key files under one host's state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "ssh" / "authorized_keys"
        # fingerprint -> namespaces, rebuilt only when a file changed: a login
        # attempt (even an unauthenticated probe) costs a listdir and a stat per
        # file, never a parse of every key.
        self._stamps: tuple[tuple[str, int, int, int], ...] | None = None
        self._index: dict[str, list[str]] = {}

    def _file(self, namespace: str) -> Path:
        try:
            check_namespace(namespace)
        except Exception:
            raise SshKeyError(f"namespace {namespace!r} is not a valid name") from None
        return self.dir / namespace

    def entries(self, namespace: str | None = None) -> list[AuthorizedKey]:
        """Every key (of one namespace); lines that do not parse are skipped."""
        if namespace is not None:
            files = [self._file(namespace)]
        else:
            try:
                files = sorted(p for p in self.dir.iterdir() if p.is_file())
            except OSError:
                return []
        out: list[AuthorizedKey] = []
        for path in files:
            try:
                lines = path.read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                with contextlib.suppress(SshKeyError):
                    parsed = parse_public_key(line)
                    if parsed is not None:
                        out.append(AuthorizedKey(path.name, *parsed, line=line.strip()))
        return out

    def namespaces_for(self, fingerprint: str) -> list[str]:
        """The namespaces whose list holds the key with this fingerprint."""
        stamps = self._file_stamps()
        if stamps != self._stamps:
            index: dict[str, set[str]] = {}
            for e in self.entries():
                index.setdefault(e.fingerprint, set()).add(e.namespace)
            self._index = {fp: sorted(nss) for fp, nss in index.items()}
            self._stamps = stamps
        return list(self._index.get(fingerprint, []))

    def _file_stamps(self) -> tuple[tuple[str, int, int, int], ...]:
        out = []
        try:
            names = sorted(os.listdir(self.dir))
        except OSError:
            return ()
        for name in names:
            with contextlib.suppress(OSError):
                st = os.stat(self.dir / name)
                out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def add(self, namespace: str, line: str) -> AuthorizedKey:
        parsed = parse_public_key(line)
        if parsed is None:
            raise SshKeyError("give one public key line (as in ~/.ssh/id_ed25519.pub)")
        entry = AuthorizedKey(namespace, *parsed, line=line.strip())
        path = self._file(namespace)
        existing = self.entries(namespace)
        if any(e.fingerprint == entry.fingerprint for e in existing):
            return entry  # already there: adding twice is not an error
        self._write(path, [*(e.line for e in existing), entry.line])
        return entry

    def remove(self, namespace: str, fingerprint: str) -> bool:
        path = self._file(namespace)
        existing = self.entries(namespace)
        kept = [e.line for e in existing if e.fingerprint != fingerprint]
        if len(kept) == len(existing):
            return False
        self._write(path, kept)
        return True

    def _write(self, path: Path, lines: list[str]) -> None:
        """Replace the file atomically: a reader sees the old list or the new one."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir.parent, 0o700)
        os.chmod(self.dir, 0o700)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{line}\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
