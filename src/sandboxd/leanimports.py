"""Import aiohttp's server half without its client half (``sandboxd serve`` only).

``aiohttp/__init__.py`` re-exports the whole client: ``aiohttp.client``,
``aiohttp.connector`` (which builds two TLS client contexts at import, loading
the system's CA store), cookie jars, multipart, tracing. Importing
``aiohttp.web`` runs that ``__init__`` first, so every daemon (one per sandbox)
paid for a client it never uses: about 60 ms of start-up and 4 MB of RSS on
the bench machine (``bench/NOTES.md``, cold start).

:func:`aiohttp_server_only` puts a bare ``aiohttp`` package in
``sys.modules`` before anything imports aiohttp. Submodules (``aiohttp.web``,
``aiohttp.http``...) then load normally from the real package directory; the
package's own ``__init__`` runs only if something asks the package for a name
it re-exports (``aiohttp.ClientSession``, ``from aiohttp import WSMsgType``):
the first such lookup executes the real ``__init__`` into the same module, so
that code works unchanged, it just pays for the client when it uses it.

Server code of ours imports what it needs from the submodules
(``aiohttp.web``, ``aiohttp.http``), never from the package itself.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import Any

PACKAGE = "aiohttp"


def aiohttp_server_only() -> bool:
    """Install the bare package; False (and nothing changed) if aiohttp is already imported."""
    if PACKAGE in sys.modules:
        return False
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None or not spec.submodule_search_locations:
        return False
    with open(spec.origin, "rb") as f:
        source = f.read()
    version = _version(source)
    if version is None:  # an aiohttp whose __init__ we do not recognise: import it whole
        return False
    pkg = types.ModuleType(PACKAGE)
    pkg.__spec__ = spec
    pkg.__loader__ = spec.loader
    pkg.__file__ = spec.origin
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__package__ = PACKAGE
    # aiohttp.http reads it (`from . import __version__`) for the Server header.
    pkg.__version__ = version
    submodules = _submodule_names(pkg.__path__)

    def __getattr__(name: str) -> Any:
        # The import system probes the package with hasattr() before importing
        # a submodule (`from . import hdrs`): those probes must not load the client.
        if name in submodules or (name.startswith("__") and name != "__all__"):
            raise AttributeError(name)
        _complete(pkg, source)
        try:
            return pkg.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}") from None

    pkg.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules[PACKAGE] = pkg
    return True


def _complete(pkg: types.ModuleType, source: bytes) -> None:
    """Run the real ``aiohttp/__init__.py`` into ``pkg``: it becomes the whole package."""
    vars(pkg).pop("__getattr__", None)
    assert pkg.__file__ is not None
    exec(compile(source, pkg.__file__, "exec"), vars(pkg))


def _version(source: bytes) -> str | None:
    """``__version__ = "3.14.5"`` from the package's source, without running it."""
    for line in source.splitlines():
        name, sep, value = line.partition(b"=")
        if sep and name.strip() == b"__version__":
            return value.strip().strip(b"\"'").decode() or None
    return None


def _submodule_names(path: list[str]) -> frozenset[str]:
    names: set[str] = set()
    for directory in path:
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        for entry in entries:
            # "client.py", "_http_parser.cpython-311-x86_64-linux-gnu.so", "_websocket"
            names.add(entry.split(".", 1)[0])
    return frozenset(names)
