"""Domain mode: the host as the SDK sees it behind ``api.<domain>`` / ``sandbox.<domain>``.

The SDK talks to a self-hosted control plane in two shapes only
(docs/self-hosted.md, "Domain mode"):

* ``TENSORLAKE_API_URL`` on ``localhost``/``127.0.0.1``: namespaced paths
  ``/v1/namespaces/{ns}/...`` on that URL (localhost mode);
* ``TENSORLAKE_API_URL=<scheme>://api.<domain>[:port]``: the SDK rewrites
  ``api.`` to ``sandbox.`` and calls *flat* paths (``/sandboxes``,
  ``/snapshots``, ``/sandbox-pools``...) there; the log routes stay on the API
  URL, namespaced. Any other host sends every call, and the key, to
  Tensorlake's cloud.

So in domain mode one listener answers ``api.<domain>``, ``sandbox.<domain>``,
``<id>.sandbox.<domain>`` (the proxy) and ``<port>-<id>.sandbox.<domain>``
(exposed ports). A flat path has no namespace in it: the key's namespace is
used (the admin ``--token``: ``default``). Replies carry ``sandbox_url`` =
the public sandbox URL: the SDK then sends ``/api/v1/*`` there with
``X-Tensorlake-Sandbox-Id`` (it drops any path of a non-loopback URL).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web
from yarl import URL

NAMESPACED = "/v1/namespaces/{ns}"
DEFAULT_NAMESPACE = "default"
# Where a flat route's match_info has its namespace filled in (routing.namespace_scope).
FLAT_ROUTES: web.AppKey[frozenset[str]] = web.AppKey("flat_routes", frozenset)
# The SDK's flat paths for api.<domain>: one this host lacks is 501, not a bare 404.
FLAT_PREFIXES = ("/sandboxes", "/snapshots", "/sandbox-pools", "/archived-sandboxes")
_SANDBOX_ID = re.compile(r"^sbx-[0-9a-z]+$")


@dataclass(frozen=True, slots=True)
class PublicUrl:
    """``--public-url``: where clients reach this host, as ``sandbox.<domain>``."""

    scheme: str
    domain: str  # example.test (the sandbox host is sandbox.<domain>)
    port: int | None  # None: the scheme's default

    @classmethod
    def parse(cls, raw: str) -> PublicUrl:
        """``https://sandbox.example.test`` (or ``api.``): ValueError says what is wrong."""
        try:
            url = URL(raw.strip())
        except ValueError as exc:
            raise ValueError(f"--public-url {raw!r} is not a URL") from exc
        host = (url.host or "").lower().rstrip(".")
        if url.scheme not in ("http", "https") or not host:
            raise ValueError(f"--public-url {raw!r}: give http(s)://sandbox.<domain>[:port]")
        if url.path not in ("", "/"):
            raise ValueError(f"--public-url {raw!r}: no path (the SDK drops it)")
        for prefix in ("sandbox.", "api."):
            if host.startswith(prefix) and "." in host[len(prefix) :]:
                domain = host[len(prefix) :]
                break
        else:
            raise ValueError(
                f"--public-url {raw!r}: the host must be sandbox.<domain> (or api.<domain>): "
                "the SDK reaches a self-hosted server only as api.<domain> -> sandbox.<domain>"
            )
        port = url.explicit_port if url.explicit_port not in (None, _default(url.scheme)) else None
        return cls(url.scheme, domain, port)

    def _origin(self, host: str) -> str:
        return f"{self.scheme}://{host}" + (f":{self.port}" if self.port else "")

    @property
    def sandbox_host(self) -> str:
        return f"sandbox.{self.domain}"

    @property
    def sandbox_url(self) -> str:
        """Lifecycle base and ``sandbox_url`` in replies."""
        return self._origin(self.sandbox_host)

    @property
    def api_url(self) -> str:
        """What clients set ``TENSORLAKE_API_URL`` to."""
        return self._origin(f"api.{self.domain}")

    def sandbox_id_of_host(self, host_header: str) -> str | None:
        """``<id>.sandbox.<domain>[:port]`` → the id (the proxy's per-sandbox name)."""
        name = host_header.strip().lower().rsplit(":", 1)[0].rstrip(".")
        suffix = "." + self.sandbox_host
        if not name.endswith(suffix):
            return None
        label = name[: -len(suffix)]
        return label if _SANDBOX_ID.match(label) else None

    def serves(self, host_header: str) -> bool:
        """Whether a Host header names this deployment (not a loopback name)."""
        name = host_header.strip().lower().rsplit(":", 1)[0].rstrip(".")
        return name == self.domain or name.endswith("." + self.domain)


def _default(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def add_flat_routes(app: web.Application) -> None:
    """Every ``/v1/namespaces/{ns}/X`` route again at ``/X`` (the SDK's paths for api.<domain>).

    Call after the namespaced routes are added. The handlers are the same;
    ``routing.namespace_scope`` fills ``ns`` in from the key.
    """
    flat: set[str] = set()
    for route in list(app.router.routes()):
        canonical = route.resource.canonical if route.resource is not None else ""
        if not canonical.startswith(NAMESPACED + "/"):
            continue
        path = canonical[len(NAMESPACED) :]
        if route.method == "HEAD":
            continue  # aiohttp adds HEAD with each GET
        app.router.add_route(route.method, path, route.handler)
        flat.add(path)
    app[FLAT_ROUTES] = frozenset(flat)
