"""``GET /console/…``: the console's packaged files, nothing else.

The files are read once from the package (``assets/``) into memory: a fixed
table, so no request path ever reaches the filesystem. ``index.html`` gets a
fresh nonce per response: xterm.js builds ``<style>`` elements at run time, and
the nonce lets exactly those through while the policy refuses any inline style
element or script a page could be tricked into carrying.
"""

from __future__ import annotations

import secrets
from importlib import resources

from aiohttp import web

from ..edge import error_response

PREFIX = "/console"
INDEX = "index.html"
NONCE_MARK = "{{CSP_NONCE}}"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def policy(nonce: str) -> str:
    """Scripts and styles from this origin only; no inline script at all; no frames."""
    return "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            f"style-src 'self' 'nonce-{nonce}'",
            "img-src 'self' data: blob:",
            "font-src 'self'",
            "connect-src 'self'",  # fetch, and the terminal's websocket (same host and port)
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


def _load() -> dict[str, bytes]:
    root = resources.files(__package__) / "assets"
    files: dict[str, bytes] = {}

    def walk(node: resources.abc.Traversable, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif any(child.name.endswith(ext) for ext in TYPES):
                files[prefix + child.name] = child.read_bytes()

    walk(root, "")
    return files


FILES = _load()


def is_asset(request: web.Request) -> bool:
    """The console's own files: served without the token (they hold no secret)."""
    return request.method in ("GET", "HEAD") and (
        request.path == PREFIX or request.path.startswith(PREFIX + "/")
    )


def _headers(content_type: str, nonce: str) -> dict[str, str]:
    return {
        "Content-Type": content_type,
        "Content-Security-Policy": policy(nonce),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-cache",
    }


async def index(request: web.Request) -> web.StreamResponse:
    if request.path == PREFIX:  # relative asset URLs need the trailing slash
        raise web.HTTPPermanentRedirect(PREFIX + "/")
    nonce = secrets.token_urlsafe(18)
    body = FILES[INDEX].replace(NONCE_MARK.encode(), nonce.encode())
    return web.Response(body=body, headers=_headers(TYPES[".html"], nonce))


async def asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    body = FILES.get(name)
    if body is None or name == INDEX:
        return error_response(
            404,
            "CONSOLE_FILE_NOT_FOUND",
            f"the console has no file {name!r}: open {PREFIX}/ for the console",
        )
    ext = name[name.rfind(".") :]
    return web.Response(body=body, headers=_headers(TYPES[ext], secrets.token_urlsafe(18)))


def add_routes(app: web.Application) -> None:
    app.router.add_get(PREFIX, index)
    app.router.add_get(PREFIX + "/", index)
    app.router.add_get(PREFIX + "/{name:.+}", asset)
