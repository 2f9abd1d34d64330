"""The HTTP side of the command line: one aiohttp session, errors, SSE.

Every failure is turned into a :class:`~.common.CliError` here, with the
daemon's own ``{"error", "code"}`` message when there is one, so subcommands
only handle the happy path.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from .. import __version__
from .common import EXIT_AUTH, EXIT_ERROR, EXIT_NOT_FOUND, EXIT_UNREACHABLE, CliError

USER_AGENT = f"sandboxd-cli/{__version__}"
# Metadata calls answer in milliseconds; streams and transfers may last forever,
# so only connecting is bounded for them.
CALL_TIMEOUT = aiohttp.ClientTimeout(total=30, connect=10)
STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)


class ApiError(CliError):
    """The daemon answered with an error status."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        self.status = status
        self.code = code
        exit_code = {401: EXIT_AUTH, 403: EXIT_AUTH, 404: EXIT_NOT_FOUND}.get(status, EXIT_ERROR)
        if status == 403 and code not in (None, "UNAUTHORIZED", "INVALID_TOKEN", "FORBIDDEN"):
            exit_code = EXIT_ERROR  # e.g. PATH_TRAVERSAL or PERMISSION_DENIED: not about auth
        tag = f"{code}, HTTP {status}" if code else f"HTTP {status}"
        super().__init__(f"{message} ({tag})", exit_code)


def selector(value: str | int) -> str:
    """A process pid or managed name as a path segment (names are percent-encoded)."""
    return quote(str(value), safe="")


# The host's proxy sends a request carrying this header to that sandbox's daemon.
SANDBOX_HEADER = "X-Tensorlake-Sandbox-Id"


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    token: str | None = None
    # A sandbox of a `sandboxd host` (its id): every request goes through the proxy to it.
    sandbox_id: str | None = None

    @property
    def base(self) -> str:
        return self.url.rstrip("/")


class Client:
    def __init__(self, target: Target) -> None:
        self.target = target
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        headers = {"User-Agent": USER_AGENT}
        if self.target.token:
            headers["Authorization"] = f"Bearer {self.target.token}"
        if self.target.sandbox_id:
            headers[SANDBOX_HEADER] = self.target.sandbox_id
        self._session = aiohttp.ClientSession(headers=headers, timeout=CALL_TIMEOUT)
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use the client as an async context manager"
        return self._session

    def url(self, path: str) -> str:
        return self.target.base + path

    # --- plain calls ---

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """One request; the decoded JSON body, or None for an empty one."""
        async with self.request(method, path, json_body=json_body, params=params) as resp:
            raw = await resp.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise CliError(f"{method} {path}: the daemon sent a body that is not JSON") from None

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response with a 2xx status; anything else raises :class:`ApiError`."""
        kwargs: dict[str, Any] = {"params": params, "headers": headers}
        if json_body is not None:
            kwargs["json"] = json_body
        if data is not None:
            kwargs["data"] = data
        if stream:
            kwargs["timeout"] = STREAM_TIMEOUT
        try:
            async with self.session.request(method, self.url(path), **kwargs) as resp:
                if resp.status >= 400:
                    raise await error_of(resp)
                yield resp
        except aiohttp.ClientConnectorError as exc:
            raise unreachable(self.target, exc) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            raise CliError(f"the connection to sandboxd broke: {exc}", EXIT_UNREACHABLE) from None
        except TimeoutError:
            raise CliError(
                f"sandboxd at {self.target.base} did not answer in time", EXIT_UNREACHABLE
            ) from None
        except aiohttp.ClientError as exc:
            raise CliError(f"request to sandboxd failed: {exc}", EXIT_UNREACHABLE) from None

    @contextlib.asynccontextmanager
    async def websocket(
        self, path: str, *, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        url = self.url(path)
        try:
            async with self.session.ws_connect(
                url, headers=headers, timeout=aiohttp.ClientWSTimeout(ws_close=5), autoping=True
            ) as ws:
                yield ws
        except aiohttp.WSServerHandshakeError as exc:
            raise ApiError(exc.status, None, f"websocket refused: {exc.message}") from None
        except aiohttp.ClientConnectorError as exc:
            raise unreachable(self.target, exc) from None


async def error_of(resp: aiohttp.ClientResponse) -> ApiError:
    """The daemon's ``{"error", "code"}`` body as an exception (or the raw text if not JSON)."""
    raw = await resp.read()
    try:
        body = json.loads(raw)
        message = str(body.get("error") or resp.reason)
        code = body.get("code") if isinstance(body.get("code"), str) else None
    except (ValueError, AttributeError):
        message = raw.decode("utf-8", "replace").strip() or str(resp.reason)
        code = None
    return ApiError(resp.status, code, message)


def unreachable(target: Target, exc: BaseException) -> CliError:
    return CliError(
        f"cannot reach sandboxd at {target.base}: {exc.__class__.__name__}: {exc}. "
        "Is the daemon running? Set --url or SANDBOXD_URL.",
        EXIT_UNREACHABLE,
    )


# --- server-sent events ---


@dataclass(slots=True)
class Event:
    name: str
    data: dict[str, Any]


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[Event]:
    """Parse an SSE body into events with JSON data; comments and non-JSON data are skipped.

    Lines are split by hand over raw chunks: aiohttp's line reader refuses lines
    longer than its buffer, and a daemon line may be up to ``--max-line`` bytes.
    """
    ctype = resp.headers.get("Content-Type", "")
    if "text/event-stream" not in ctype:
        raise CliError(
            f"expected an event stream from the daemon, got {ctype or 'no content type'}"
        )
    name, data = "message", list[str]()
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                if data:
                    event = _decode(name, data)
                    if event is not None:
                        yield event
                name, data = "message", list[str]()
            elif line.startswith(":"):
                continue
            else:
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    name = value
                elif field == "data":
                    data.append(value)


def _decode(name: str, data: list[str]) -> Event | None:
    try:
        payload = json.loads("\n".join(data))
    except ValueError:
        return None
    return Event(name, payload) if isinstance(payload, dict) else None


def warn(message: str) -> None:
    sys.stderr.write(f"sandboxd: {message}\n")
    sys.stderr.flush()
