"""``sandboxd serve`` starts without what serving does not need (issue 20: start-up and idle RSS).

Every sandbox runs its own daemon, so each module imported at start-up costs
start-up time and resident memory in every sandbox. These tests read the
interpreter's own import log (``PYTHONPROFILEIMPORTTIME``) of a real daemon
and check that the client half of aiohttp (with the TLS contexts its
connector builds at import), our command-line client and the OpenAPI
generator are not loaded until something uses them — and that they still work
when something does.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from .conftest import wait_for

# Modules a daemon must not import before its first request asks for them.
NOT_AT_START = (
    "aiohttp.client",  # aiohttp/__init__ re-exports the whole client
    "aiohttp.connector",  # builds two TLS client contexts at import
    "aiohttp.cookiejar",
    "sandboxd.cli.client",  # the command-line client
    "sandboxd.api.openapi",  # generated on the first GET /api/v1/openapi.json
)


def imported(log: str) -> set[str]:
    """Module names from an ``-X importtime`` log (``import time: self | cumulative | name``)."""
    names = set()
    for line in log.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_daemon_serves_without_client_side_modules(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon(env={"PYTHONPROFILEIMPORTTIME": "1"})
    with d.http() as c:
        # A real request through the deferred request models and the process table.
        r = c.post("/api/v1/processes/run", json={"command": "/bin/sh", "args": ["-c", "echo hi"]})
        assert r.status_code == 200
        assert '"line":"hi"' in r.text and "event: exit" in r.text
        at_start = imported(d.log())
        assert "aiohttp.web" in at_start, "the import log was not captured"
        loaded = sorted(set(NOT_AT_START) & at_start)
        assert not loaded, f"imported by a daemon that never used them: {loaded}"

        # What was left out still works when asked for.
        doc = c.get("/api/v1/openapi.json")
        assert doc.status_code == 200
        assert doc.json()["openapi"].startswith("3.1")
        wait_for(lambda: "sandboxd.api.openapi" in imported(d.log()))
        metrics = c.get("/metrics")
        assert metrics.status_code == 200
        assert "sandboxd_http_requests_total" in metrics.text


def test_aiohttp_names_resolve_after_a_server_only_import() -> None:
    """Code that asks the package for a client name gets the real one, loaded then."""
    script = textwrap.dedent(
        """
        import sys
        from importlib.metadata import version
        from sandboxd.leanimports import aiohttp_server_only

        assert aiohttp_server_only() is True
        import aiohttp.web
        import aiohttp
        assert "aiohttp.client" not in sys.modules, "the client came with aiohttp.web"
        assert aiohttp.__version__ == version("aiohttp")

        from aiohttp import ClientSession, WSMsgType
        import aiohttp.client, aiohttp.http
        assert ClientSession is aiohttp.client.ClientSession
        assert WSMsgType is aiohttp.http.WSMsgType
        assert aiohttp.web.Application is aiohttp.web_app.Application
        assert "ClientSession" in aiohttp.__all__
        # A second call, with aiohttp imported, changes nothing.
        assert aiohttp_server_only() is False
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_missing_names_are_attribute_errors() -> None:
    script = textwrap.dedent(
        """
        from sandboxd.leanimports import aiohttp_server_only

        aiohttp_server_only()
        import aiohttp
        try:
            aiohttp.NoSuchThing
        except AttributeError as exc:
            print("AttributeError", exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("AttributeError") and "NoSuchThing" in out.stdout
