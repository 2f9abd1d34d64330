"""``sandboxd host --ssh-port N``: ``ssh -p N SANDBOX@HOST`` reaches a sandbox's shell.

How a connection goes
---------------------
1. The user logs in as ``SANDBOX`` (an id or a name) or ``SANDBOX+NAMESPACE``
   with a public key. The key must be in that namespace's authorized keys
   (``sshkeys.py``); without ``+NAMESPACE`` the sandbox is looked up in every
   namespace the key may reach, and a name found in two is refused. An unknown
   sandbox and an unauthorized key fail the same way (no existence oracle).
   Passwords and keyboard-interactive are never offered.
2. At the first session the gateway makes sure the sandbox runs (a suspended
   one with auto-resume is resumed, as the HTTP proxy does), asks its daemon to
   enable SSH for the gateway's own key (``POST /api/v1/ssh/enable``), and
   opens an SSH connection to it through the daemon's TCP tunnel
   (``/api/v1/tunnels/tcp`` over the daemon's unix socket), pinning the host
   key fingerprint the daemon reported.
3. Every session channel (shell, command, ``sftp``/``scp``, with or without a
   terminal) is forwarded to a channel of that inner connection, byte for
   byte, with flow control both ways, window changes, signals and breaks;
   the inner exit status or signal ends the outer channel the same way.
4. Port forwarding, agent forwarding and X11 are refused: the daemon's tunnels
   and exposed ports do that with the host's own auth.

The inner connection lives as long as the user's connection (one owner: the
:class:`_Client`); closing either side closes the other.

Where a login leads is a :class:`Sandboxes`: :class:`LocalSandboxes` on a lone
host (keys in its state dir, its own sandboxes), ``fleet/sshfront.py`` in a
fleet (keys in etcd, a sandbox on any node reached through that node's proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import asyncssh

from ...ssh.policy import PublicKeyOnly
from ..manager import Manager
from ..model import ApiError
from . import http_proxy as proxy
from . import reach, tunnel
from .sshkeys import AuthorizedKeys

log = logging.getLogger("sandboxd.host.ssh")

BACKEND_USER = "root"  # a sandbox's processes run as its root
# As OpenSSH's MaxAuthTries: key attempts per connection before it is closed.
MAX_AUTH_ATTEMPTS = 6
# Connections still logging in (each has 30 s: login_timeout); more are closed
# at once, so unauthenticated clients cannot hold the gateway's loop.
MAX_UNAUTHENTICATED = 64


class Unreachable(Exception):
    """The sandbox cannot take a session now; the message says why and what to do."""


@dataclass(frozen=True)
class DaemonLine:
    """How to speak HTTP to one sandbox's daemon: a session, its base URL, headers to add."""

    session: aiohttp.ClientSession
    base: str = "http://sandbox"
    headers: Mapping[str, str] = field(default_factory=dict)


class Sandboxes(Protocol):
    """Where logins lead: who may reach which sandbox, and the line to its daemon."""

    async def resolve(self, username: str, fingerprint: str) -> str | None:
        """The sandbox id this key may reach under this user name, or None."""
        ...

    async def daemon(self, sid: str) -> DaemonLine:
        """The line to the sandbox's daemon once it runs, or :class:`Unreachable`."""
        ...

    async def close(self) -> None:
        """Let go of what it holds (a fleet's etcd client and sessions)."""
        ...


class LocalSandboxes:
    """A lone host's: keys from its state dir, its own sandboxes."""

    def __init__(self, manager: Manager, keys: AuthorizedKeys) -> None:
        self.manager = manager
        self.keys = keys

    async def resolve(self, username: str, fingerprint: str) -> str | None:
        ident, _, ns = username.partition("+")
        allowed = self.keys.namespaces_for(fingerprint)
        if ns:
            allowed = [n for n in allowed if n == ns]
        found = {
            rec.id
            for n in allowed
            if (rec := self.manager.store.get(n, ident)) is not None and rec.live
        }
        return found.pop() if len(found) == 1 else None

    async def daemon(self, sid: str) -> DaemonLine:
        try:
            await reach.running(self.manager, sid)  # the HTTP proxy's rules
        except ApiError as exc:
            raise Unreachable(exc.message) from None
        return DaemonLine(self.manager.sessions.get(sid))

    async def close(self) -> None:
        pass  # the manager and its sessions are the host's


def local_identity(state_dir: Path) -> tuple[asyncssh.SSHKey, asyncssh.SSHKey]:
    """(host key, proxy key) kept in a lone host's state dir, made on first use."""
    d = Path(state_dir) / "ssh"
    return _load_or_make(d / "host_ed25519_key"), _load_or_make(d / "proxy_ed25519_key")


class SshGateway:
    """The host's SSH listener; :meth:`start` and :meth:`close` bracket its life.

    ``host_key`` is what users see (the same on every front of a fleet);
    ``proxy_key`` logs into the sandboxes' daemons (the same on every front
    too: a daemon lets in only the key of its last enable).
    """

    def __init__(
        self,
        sandboxes: Sandboxes,
        host: str,
        port: int,
        host_key: asyncssh.SSHKey,
        proxy_key: asyncssh.SSHKey,
    ) -> None:
        self.sandboxes = sandboxes
        self.host = host
        self.port = port
        self.host_key = host_key
        self.proxy_key = proxy_key
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._clients: set[_Client] = set()

    async def start(self) -> None:
        try:
            self._acceptor = await asyncssh.create_server(
                lambda: _Client(self),
                self.host,
                self.port,
                server_host_keys=[self.host_key],
                session_factory=None,
                encoding=None,
                agent_forwarding=False,
                x11_forwarding=False,
                allow_pty=True,
                line_editor=False,
                login_timeout=30,
            )
        except OSError as exc:
            raise SystemExit(
                f"sandboxd: cannot listen for SSH on {self.host}:{self.port}: "
                f"{exc.strerror or exc} (pick another --ssh-port)"
            ) from None
        log.info(
            "ssh gateway on %s:%d (host key %s)",
            self.host,
            self.bound_port,
            self.host_key.get_fingerprint("sha256"),
        )

    @property
    def bound_port(self) -> int:
        assert self._acceptor is not None
        return int(self._acceptor.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
            for client in list(self._clients):
                client.close()
            with contextlib.suppress(Exception):
                await self._acceptor.wait_closed()
            self._acceptor = None
        await self.sandboxes.close()

    # --- reaching the sandbox's own SSH server ---

    async def connect_inner(self, sid: str) -> tuple[asyncssh.SSHClientConnection, Any]:
        """An SSH connection to the sandbox's daemon, and the tunnel task that carries it."""
        line = await self.sandboxes.daemon(sid)
        pubkey = self.proxy_key.export_public_key().decode().strip()
        try:
            async with line.session.post(
                f"{line.base}/api/v1/ssh/enable",
                json={"proxy_pubkey": pubkey, "backend_user": BACKEND_USER},
                headers=line.headers,
            ) as resp:
                status = await proxy.daemon_json(resp)
                if not isinstance(status, dict):
                    raise ValueError("the daemon's SSH status is not an object")
                if resp.status != 200:
                    raise Unreachable(
                        f"the sandbox's daemon refused SSH: {status.get('error', resp.status)}"
                    )
            ours, carrier = await tunnel.open_tunnel(
                line.session, int(status["port"]), line.base, line.headers
            )
        except tunnel.TunnelRefused as exc:
            raise Unreachable(f"the sandbox's SSH server is unreachable: {exc.message}") from None
        except (aiohttp.ClientError, OSError, ValueError, KeyError, TypeError) as exc:
            raise Unreachable(f"the sandbox's daemon is unreachable: {exc}") from None
        try:
            conn = await asyncssh.connect(
                sid,  # a name for asyncssh's logs; the socket is already connected
                22,
                sock=ours,
                username=BACKEND_USER,
                client_keys=[self.proxy_key],
                known_hosts=None,  # pinned below, by the fingerprint the daemon gave
                agent_path=None,
                config=None,
                preferred_auth="publickey",
            )
        except (asyncssh.Error, OSError) as exc:
            carrier.cancel()
            raise Unreachable(f"cannot log into the sandbox's SSH server: {exc}") from None
        except BaseException:  # cancelled (the user went away): the tunnel goes too
            carrier.cancel()
            raise
        server_key = conn.get_server_host_key()
        if server_key is None or server_key.get_fingerprint("sha256") != status.get(
            "host_key_fingerprint"
        ):
            conn.close()
            carrier.cancel()
            raise Unreachable("the sandbox's SSH host key is not the one its daemon reported")
        return conn, carrier


def _load_or_make(path: Path) -> asyncssh.SSHKey:
    """A private key kept in the state dir (root's only), made on first use."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    with contextlib.suppress(FileNotFoundError):
        return asyncssh.read_private_key(str(path))
    key = asyncssh.generate_private_key("ssh-ed25519", comment=f"sandboxd {path.stem}")
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    os.replace(tmp, path)
    return key


# --- one user connection ---


class _Client(PublicKeyOnly, asyncssh.SSHServer):  # type: ignore[misc]
    """One user's connection: its sandbox, and the inner connection its sessions share."""

    def __init__(self, gateway: SshGateway) -> None:
        self.gateway = gateway
        self.sid: str | None = None
        self.conn: asyncssh.SSHServerConnection | None = None
        self._inner: asyncio.Task[tuple[asyncssh.SSHClientConnection, Any]] | None = None
        self._attempts = 0
        self.authenticated = False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.gateway._clients.add(self)
        pending = sum(1 for c in self.gateway._clients if not c.authenticated)
        if pending > MAX_UNAUTHENTICATED:
            log.warning("ssh: %d connections still logging in: closing a new one", pending)
            conn.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gateway._clients.discard(self)
        inner = self._inner
        if inner is None:
            return
        if not inner.done():
            inner.cancel()  # connect_inner cancels its tunnel on the way out
        elif not inner.cancelled() and inner.exception() is None:
            conn, carrier = inner.result()
            conn.close()
            carrier.cancel()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        self._attempts += 1
        if self._attempts > MAX_AUTH_ATTEMPTS:
            if self.conn is not None:
                self.conn.close()
            return False
        try:
            sid = await self.gateway.sandboxes.resolve(username, key.get_fingerprint("sha256"))
        except ApiError as exc:  # the fleet's etcd cannot answer: refused, said in the log
            log.warning("ssh: cannot check key for %r: %s", username, exc.message)
            return False
        if sid is None:
            log.info("ssh: refused key %s for %r", key.get_fingerprint("sha256"), username)
            return False
        self.sid = sid
        return True

    def auth_completed(self) -> None:
        self.authenticated = True
        log.info("ssh: login to sandbox %s", self.sid)

    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
        return _Forward(self)

    async def inner(self) -> asyncssh.SSHClientConnection:
        """The inner connection, opened at the first session and shared by the next ones."""
        assert self.sid is not None
        if self._inner is None:
            self._inner = asyncio.ensure_future(self.gateway.connect_inner(self.sid))
        conn, _ = await asyncio.shield(self._inner)
        return conn


class _Forward(asyncssh.SSHServerSession):  # type: ignore[misc]
    """One session channel of the user, forwarded to one channel of the inner connection."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.upstream: asyncssh.SSHClientChannel[bytes] | None = None
        self.command: str | None = None
        self.subsystem: str | None = None
        self.pty = False
        self._task: asyncio.Task[None] | None = None
        self._early: list[tuple[bytes, Any]] = []
        self._early_eof = False

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.chan = chan

    def pty_requested(self, term_type: str, term_size: Any, term_modes: Any) -> bool:
        self.pty = True
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self.command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self.subsystem = subsystem
        return True

    def session_started(self) -> None:
        self._task = asyncio.ensure_future(self._open())

    async def _open(self) -> None:
        chan = self.chan
        assert chan is not None
        try:
            conn = await self.client.inner()
            env = {k: v for k, v in chan.get_environment().items() if isinstance(k, str)}
            term_type = chan.get_terminal_type() if self.pty else None
            width, height, pw, ph = chan.get_terminal_size()
            upstream, _ = await conn.create_session(
                lambda: _Upstream(self),
                command=self.command,
                subsystem=self.subsystem,
                env=env,
                request_pty="force" if self.pty else False,
                term_type=term_type,
                term_size=(width, height, pw, ph) if self.pty else None,
                term_modes=chan.get_terminal_modes() if self.pty else None,
                encoding=None,
            )
        except Unreachable as exc:
            chan.write(f"sandboxd: {exc}\r\n".encode(), asyncssh.EXTENDED_DATA_STDERR)
            chan.exit(255)
            return
        except (asyncssh.Error, OSError) as exc:
            chan.write(f"sandboxd: {exc}\r\n".encode(), asyncssh.EXTENDED_DATA_STDERR)
            chan.exit(255)
            return
        self.upstream = upstream
        for data, datatype in self._early:
            upstream.write(data, datatype)
        self._early.clear()
        if self._early_eof:
            upstream.write_eof()
        chan.resume_reading()  # paused while the inner channel was opening

    # --- user -> sandbox ---

    # No callback here may raise: asyncssh answers an exception in one by
    # closing the user's whole connection, output still buffered for it included.

    def data_received(self, data: bytes, datatype: Any) -> None:
        if self.upstream is None:
            self._early.append((data, datatype))
            if self.chan is not None and len(self._early) > 64:
                self.chan.pause_reading()  # the inner channel is not open yet
            return
        with contextlib.suppress(OSError):  # the inner channel closed: input has nowhere to go
            self.upstream.write(data, datatype)

    def eof_received(self) -> bool:
        if self.upstream is None:
            self._early_eof = True
        else:
            with contextlib.suppress(OSError):
                self.upstream.write_eof()
        return True  # half-close: the command's output may still come

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if self.upstream is not None:
            self.upstream.change_terminal_size(width, height, pixwidth, pixheight)

    def signal_received(self, signal: str) -> None:
        if self.upstream is not None:
            self.upstream.send_signal(signal)

    def break_received(self, msec: int) -> bool:
        if self.upstream is not None:
            self.upstream.send_break(msec)
        return True

    def pause_writing(self) -> None:  # the user is slow: stop reading the sandbox
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self.upstream is not None:
            self.upstream.close()


class _Upstream(asyncssh.SSHClientSession):  # type: ignore[misc]
    """The inner channel's side: what the sandbox says goes back to the user.

    The inner exit status is passed on only when the inner channel has closed.
    asyncssh handles an ``exit-status`` request the moment it arrives, while
    data that came before it may still wait in the channel's buffer (reading
    is paused whenever the user reads slower than the sandbox writes); ending
    the user's channel then would drop that data. The channel's close is
    delivered after its last data, so the status goes out behind the output.
    """

    def __init__(self, down: _Forward) -> None:
        self.down = down
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self._status: int | None = None
        self._signal: tuple[str, bool, str, str] | None = None

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: Any) -> None:
        if self.down.chan is not None:
            with contextlib.suppress(OSError):  # the user went away
                self.down.chan.write(data, datatype)

    def eof_received(self) -> bool:
        if self.down.chan is not None:
            with contextlib.suppress(OSError):
                self.down.chan.write_eof()
        return True

    def pause_writing(self) -> None:  # the sandbox is slow: stop reading the user
        if self.down.chan is not None:
            self.down.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.down.chan is not None:
            self.down.chan.resume_reading()

    def exit_status_received(self, status: int) -> None:
        self._status = status  # passed on at connection_lost, behind the output

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self._signal = (signal, core_dumped, msg, lang)

    def connection_lost(self, exc: Exception | None) -> None:
        chan = self.down.chan
        if chan is None:
            return
        with contextlib.suppress(OSError):  # the user went away first
            if self._signal is not None:
                chan.exit_with_signal(*self._signal)
            elif self._status is not None:
                chan.exit(self._status)
            else:
                chan.exit(255)  # the inner channel went away without a status
