"""TLS on the host's listener, with certificates replaced while it runs.

``--tls-cert`` (the chain, leaf first) and ``--tls-key`` are loaded at start
(a bad pair stops the start with one line). Afterwards they are loaded again
on SIGHUP and whenever either file changes on disk (an ACME client renewing
them), checked every :data:`POLL_S` seconds.

How the new certificate reaches new connections without touching open ones:
the listening socket's context never changes; its SNI callback, which OpenSSL
calls during every handshake (with or without a server name), points the
connection at the *current* context. A reload builds a complete new context
and swaps it in only when the pair loaded and matched, so a renewal caught
half-written (the new chain, the old key) keeps the previous certificate and
is tried again on the next change. Connections already open keep the context
they were made with: sandboxes, PTYs, SSE streams and tunnels are not touched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from pathlib import Path

log = logging.getLogger("sandboxd.host.tls")

POLL_S = float(os.environ.get("SANDBOXD_HOST_TLS_POLL_S", "2"))


def _context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def _stamp(*paths: Path) -> tuple[tuple[int, int, int], ...]:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((0, 0, 0))
    return tuple(out)


class ReloadingTls:
    """The listener's SSL context, whose certificate follows the files."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = Path(cert), Path(key)
        self._stamp = _stamp(self.cert, self.key)
        try:
            self.current = _context(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"cannot load the TLS certificate {self.cert} and key {self.key}: {exc}"
            ) from exc
        # The listener's own context: only its SNI callback matters after the
        # first handshake step, but it carries a valid pair too.
        self.listener = _context(self.cert, self.key)
        self.listener.sni_callback = self._pick
        self.reloads = 0

    def _pick(self, conn: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        conn.context = self.current
        return None

    def reload(self, why: str) -> bool:
        """Load the files again; True when the new pair is in use."""
        self._stamp = _stamp(self.cert, self.key)
        try:
            fresh = _context(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            log.warning("TLS reload (%s) failed, keeping the previous certificate: %s", why, exc)
            return False
        self.current = fresh
        self.reloads += 1
        log.info("TLS certificate reloaded (%s) from %s", why, self.cert)
        return True

    def changed_on_disk(self) -> bool:
        return _stamp(self.cert, self.key) != self._stamp

    async def watch(self, interval: float = POLL_S) -> None:
        """Reload whenever the files change (run as a task; cancel to stop)."""
        while True:
            await asyncio.sleep(interval)
            if self.changed_on_disk():
                self.reload("files changed")
