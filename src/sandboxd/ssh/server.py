"""The daemon's SSH server: ``/api/v1/ssh/enable|disable|status`` turn it on and off.

Rules this module keeps
-----------------------
* It exists only between an enable and a disable; nothing of asyncssh is
  imported before the first enable (the daemon's idle memory stays as it was).
* It listens on the sandbox's own loopback only (``127.0.0.1``, port
  ``SANDBOXD_SSH_PORT``, default 0: any free port, reported by ``status``).
  The host's SSH gateway reaches it through the daemon's TCP tunnel; nothing
  outside the sandbox can connect to it directly.
* Exactly one key logs in: the ``proxy_pubkey`` of the last enable (the
  gateway's own key). Public-key authentication only: no passwords, no
  keyboard-interactive, no agent, port or X11 forwarding.
* Sessions run as the enable's ``backend_user`` (``sessions.py``); SFTP and
  ``scp`` are asyncssh's own servers, in the daemon's view of the filesystem
  (the sandbox's root), as the daemon's user.
* The host key is made at the first enable and kept for the daemon's life,
  so a re-enable does not change the fingerprint a client pinned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..engine.spawn import SpawnError

if TYPE_CHECKING:
    import asyncssh

    from ..engine.pty.manager import PtyManager
    from ..engine.table import ProcessTable
    from .sessions import Login

log = logging.getLogger(__name__)

LISTEN_HOST = "127.0.0.1"
DEFAULT_USER = "tl-user"  # the contract's default backend_user


class SshError(Exception):
    """An enable that cannot work: ``status`` and ``code`` for the API's answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(slots=True)
class SshService:
    """The SSH server of one daemon: off, or listening with one authorized key."""

    table: ProcessTable
    ptys: PtyManager
    port: int = 0
    _server: Any = None  # asyncssh.SSHAcceptor while enabled
    _host_key: Any = None
    _client_key: Any = None
    _login: Login | None = None
    _conns: set[Any] = field(default_factory=set)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def enabled(self) -> bool:
        return self._server is not None

    def status(self) -> dict[str, object]:
        fingerprint = self._host_key.get_fingerprint("sha256") if self._host_key else None
        return {
            "enabled": self.enabled,
            "pid": os.getpid() if self.enabled else None,
            "host_key_fingerprint": fingerprint,
            # Beyond the contract: where the server listens, inside the sandbox.
            "port": self._server.sockets[0].getsockname()[1] if self.enabled else None,
        }

    async def enable(self, proxy_pubkey: str, backend_user: str) -> dict[str, object]:
        import asyncssh

        from .sessions import Login

        try:
            key = asyncssh.import_public_key(proxy_pubkey)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise SshError(
                400,
                "INVALID_PUBLIC_KEY",
                f"proxy_pubkey is not an OpenSSH public key ({exc}); "
                "give one line as in id_ed25519.pub",
            ) from None
        try:
            login = Login.of(backend_user)
        except SpawnError as exc:
            raise SshError(400, exc.code, f"backend_user: {exc.message}") from None
        async with self._lock:
            self._client_key = key
            self._login = login
            if self._host_key is None:
                self._host_key = asyncssh.generate_private_key("ssh-ed25519")
            if self._server is None:
                try:
                    self._server = await asyncssh.create_server(
                        lambda: _new_server(self),
                        LISTEN_HOST,
                        self.port,
                        server_host_keys=[self._host_key],
                        process_factory=self._session,
                        sftp_factory=_sftp_server_class(),
                        allow_scp=True,
                        encoding=None,
                        agent_forwarding=False,
                        x11_forwarding=False,
                        line_editor=False,
                    )
                except OSError as exc:
                    raise SshError(
                        409,
                        "SSH_PORT_UNAVAILABLE",
                        f"cannot listen on {LISTEN_HOST}:{self.port}: {exc.strerror or exc}; "
                        "free the port or start the daemon with another SANDBOXD_SSH_PORT",
                    ) from None
                log.info("ssh: listening on %s:%s", LISTEN_HOST, self.status()["port"])
        return self.status()

    async def disable(self) -> dict[str, object]:
        async with self._lock:
            server, self._server = self._server, None
            self._client_key = None
            if server is not None:
                server.close()
                for conn in list(self._conns):
                    conn.close()
                with contextlib.suppress(Exception):
                    await server.wait_closed()
                log.info("ssh: disabled")
        return self.status()

    async def close(self) -> None:
        await self.disable()

    def authorized(self, key: asyncssh.SSHKey) -> bool:
        current = self._client_key
        return current is not None and key.public_data == current.public_data

    async def _session(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        from . import sessions

        login = self._login
        if login is None:  # disabled while the channel opened
            process.exit(255)
            return
        await sessions.run(process, self.table, self.ptys, login)


def _server_class() -> type:
    import asyncssh

    from .policy import PublicKeyOnly

    class Server(PublicKeyOnly, asyncssh.SSHServer):  # type: ignore[misc]
        def __init__(self, service: SshService) -> None:
            self._service = service
            self._conn: Any = None

        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            self._conn = conn
            self._service._conns.add(conn)

        def connection_lost(self, exc: Exception | None) -> None:
            self._service._conns.discard(self._conn)

        def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
            return self._service.authorized(key)

    return Server


def _sftp_server_class() -> type:
    import asyncssh

    class SftpServer(asyncssh.SFTPServer):  # type: ignore[misc]
        """asyncssh's SFTP server, ending its channel with exit status 0.

        asyncssh closes an SFTP channel without an exit status, which
        OpenSSH's ``scp`` (SFTP mode, its default since 9.0) reports as a
        failure (exit 1) after a complete copy; ``sftp-server`` under sshd
        exits 0.
        """

        def exit(self) -> None:
            with contextlib.suppress(Exception):
                self.channel.exit(0)

    return SftpServer


def _new_server(service: SshService) -> Any:
    global _SERVER_CLASS
    if _SERVER_CLASS is None:
        _SERVER_CLASS = _server_class()
    return _SERVER_CLASS(service)


_SERVER_CLASS: type | None = None
