"""The web console of ``sandboxd host`` in a real browser (issue 18 item 5).

Debian's Chromium (``apt-get install chromium``; never a downloaded browser),
driven by Playwright, against a real ``sandboxd host`` with a token, real
sandboxes and the official SDK on the other side: what the page does, the SDK
sees, and the other way round. Each page's screenshot is saved under the
test's output and copied to ``build/console-screenshots/``.

The attacks at the end go at the websocket credentials carriage
(``console/wscarriage.py``) with a raw client: a page of another site with a
valid key, no key, a wrong key, and whether the key reaches the sandbox.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from sandboxd import console
from sandboxd.edge import bearer_auth, cross_site_guard
from sandboxd.host.proxy import http_proxy as proxy

from .conftest import ROOT, wait_for
from .test_host import NS, Host, make_state_root, start_host

# '+', '/' and '=' make the base64url carriage matter.
KEY = "c0nsole+key/=" + base64.b16encode(__import__("os").urandom(6)).decode()
P = "/v1/namespaces/default"
SHOTS = ROOT / "build" / "console-screenshots"
UI_TIMEOUT_MS = 30_000  # a sandbox start or a terminal's first prompt, on a busy machine


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from make_state_root("sbwc")


@pytest.fixture(scope="module")
def host(state_root: Path) -> Iterator[Host]:
    # Usage sampled often, so the pages have a series to plot (usage.py).
    h = start_host(
        state_root / "h", warm=1, token=KEY, env={"SANDBOXD_HOST_USAGE_INTERVAL_S": "0.5"}
    )
    try:
        yield h
    finally:
        with contextlib.suppress(httpx.HTTPError), _http(h) as c:
            for s in c.get(NS).json()["sandboxes"]:
                c.delete(f"{NS}/{s['id']}")
            for p in c.get(f"{P}/sandbox-pools").json()["pools"]:
                c.delete(f"{P}/sandbox-pools/{p['id']}")
        h.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("console-screenshots")


class Console:
    """One browser tab on the console, with the page's errors collected."""

    def __init__(self, page: Any, host: Host, shots: Path) -> None:
        self.page = page
        self.host = host
        self.shots = shots
        self.errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.set_default_timeout(UI_TIMEOUT_MS)

    def open(self, fragment: str = "") -> None:
        self.page.goto(f"{self.host.url}/console/{fragment}")

    def login(self, key: str = KEY) -> None:
        self.open()
        self.page.fill("#login-key", key)
        self.page.click("#login-submit")

    def go(self, fragment: str) -> None:
        self.page.evaluate("f => { location.hash = f; }", fragment)

    def shot(self, name: str) -> None:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SHOTS / path.name)


@pytest.fixture
def ui(browser: Any, host: Host, shots: Path) -> Iterator[Console]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    c = Console(context.new_page(), host, shots)
    try:
        yield c
        # Nothing the console does may trip its own policy or throw.
        assert c.errors == [], c.errors
    finally:
        context.close()


def _http(h: Host) -> httpx.Client:
    return httpx.Client(base_url=h.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"})


def _sdk(h: Host) -> dict[str, Any]:
    return {"api_url": h.url, "api_key": KEY}


def _create(h: Host, **kw: Any) -> Any:
    from tensorlake.sandbox import Sandbox

    return Sandbox.create(memory_mb=256, **_sdk(h), **kw)


def _status(sbx: Any) -> str:
    return str(sbx.status.value)


def _expect() -> Any:
    from playwright.sync_api import expect

    return expect


# --- serving --------------------------------------------------------------------


def test_console_files_are_served_with_a_strict_policy_and_the_api_still_needs_the_key(
    host: Host,
) -> None:
    r = httpx.get(host.url + "/console")
    assert (r.status_code, r.headers["Location"]) == (308, "/console/")
    r = httpx.get(host.url + "/console/")  # no key: the page asks for it
    assert r.status_code == 200 and "text/html" in r.headers["Content-Type"]
    csp = dict(
        [*d.strip().split(" ", 1), ""][:2] for d in r.headers["Content-Security-Policy"].split(";")
    )
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'"
    assert csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert "unsafe" not in r.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp["style-src"])
    assert nonce and nonce.group(1) in r.text  # the page's style nonce
    again = httpx.get(host.url + "/console/").headers["Content-Security-Policy"]
    assert again != r.headers["Content-Security-Policy"]  # fresh per response
    # No inline script, no inline event handler: every script is a file of this origin.
    assert re.search(r"<script(?![^>]*\ssrc=)", r.text) is None
    assert re.search(r"<[^>]+\son\w+=", r.text) is None
    for asset in ("console.js", "vendor/xterm.js", "vendor/addon-fit.js", "vendor/xterm.css"):
        a = httpx.get(f"{host.url}/console/{asset}")
        assert a.status_code == 200, asset
        assert a.headers["X-Content-Type-Options"] == "nosniff"
    for sneaky in ("%2e%2e/%2e%2e/etc/passwd", "..%2f..%2fetc%2fpasswd", "vendor/..%2f..%2f__init__.py"):
        r = httpx.get(f"{host.url}/console/{sneaky}")
        assert r.status_code in (401, 404) and "root:" not in r.text, (sneaky, r.text)
    r = httpx.get(host.url + "/console/nope.js")
    assert (r.status_code, r.json()["code"]) == (404, "CONSOLE_FILE_NOT_FOUND")
    # Only the console's files are served without the key.
    assert httpx.get(host.url + NS).status_code == 401
    assert httpx.post(host.url + "/console/", json={}).status_code == 401


def test_every_console_file_is_package_data() -> None:
    """No build step: the wheel ships the assets as they are (pyproject's package-data)."""
    import tomllib
    from pathlib import PurePosixPath

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["sandboxd.console"]
    assets = Path(console.__file__).parent / "assets"
    files = [str(f.relative_to(assets.parent)) for f in assets.rglob("*") if f.is_file()]
    assert "assets/vendor/xterm.js" in files and "assets/index.html" in files
    # Setuptools' globs do not cross a "/": nor does PurePath.match.
    missed = [f for f in files if not any(PurePosixPath(f).match(p) for p in patterns)]
    assert missed == [], f"not in the wheel: {missed}"


def test_inline_script_in_the_page_is_refused_by_its_policy(ui: Console) -> None:
    ui.open()
    directive = ui.page.evaluate(
        """() => new Promise(resolve => {
            document.addEventListener('securitypolicyviolation',
                e => resolve(e.effectiveDirective), { once: true });
            const s = document.createElement('script');
            s.textContent = 'window.injected = 1';
            document.head.append(s);
        })"""
    )
    assert directive == "script-src-elem"
    assert ui.page.evaluate("() => window.injected") is None
    ui.errors.clear()  # that refusal is the point of this test


# --- the views --------------------------------------------------------------------


def test_log_in_with_the_key_and_see_a_sandbox_appear_after_an_sdk_create(ui: Console) -> None:
    expect = _expect()
    ui.login("not-the-key")
    expect(ui.page.locator("#login-error")).to_contain_text("refused")
    ui.shot("login")
    ui.errors.clear()  # the browser logs the refused request (401) itself
    ui.login()
    expect(ui.page.locator("#sandboxes")).to_be_visible()
    # The key stays in this tab's session storage only.
    stored = ui.page.evaluate("() => [sessionStorage.length, localStorage.length, document.cookie]")
    assert stored == [2, 0, ""]
    sbx = _create(ui.host, name="console-list")
    try:
        row = ui.page.locator(f'#sandbox-rows tr[data-id="{sbx.sandbox_id}"]')
        expect(row).to_contain_text("running")
        expect(row).to_contain_text("console-list")
        expect(row).to_contain_text("256 MB")
        # Its usage: CPU and memory plotted, memory now of its limit.
        expect(row.locator("svg.spark.cpu polyline")).to_have_count(1)
        expect(row.locator("svg.spark.mem polyline")).to_have_count(1)
        expect(row.locator(".usage")).to_contain_text(re.compile(r"MiB / \d+ MiB"))
        expect(ui.page.locator("#node-column")).to_be_hidden()  # a lone host: no nodes
        ui.shot("sandboxes")
        ui.page.reload()  # the session survives a reload, without asking again
        expect(row).to_be_visible()
    finally:
        sbx.terminate()


def _cpu_plot(ui: Console) -> tuple[float, list[float]]:
    """The sandbox page's CPU figure (% now) and its plot's y values (0 is the top)."""
    caption = ui.page.locator("#usage figcaption").first.inner_text()
    match = re.match(r"CPU ([\d.]+)%", caption)
    assert match, caption
    points = ui.page.locator("#usage svg.cpu polyline").get_attribute("points") or ""
    return float(match.group(1)), [float(p.split(",")[1]) for p in points.split()]


def test_the_sandbox_page_plots_its_usage_as_it_moves(ui: Console) -> None:
    expect = _expect()
    sbx = _create(ui.host)
    try:
        ui.login()
        ui.go(f"#/sandbox/{sbx.sandbox_id}")
        panel = ui.page.locator("#usage")
        expect(panel).to_contain_text("memory peak")
        expect(panel).to_contain_text(re.compile(r"memory [\d.]+ MiB of \d+ MiB"))
        expect(panel).to_contain_text(re.compile(r"disk\s*[\d.]+ [KM]iB of [\d.]+ GiB"))
        # Idle: a series of several samples, drawn near the bottom of a 48-pixel
        # plot whose scale is at least one core (not the idle crumbs' own peak).
        wait_for(lambda: len(_cpu_plot(ui)[1]) >= 3, timeout=30)
        now, ys = _cpu_plot(ui)
        assert now < 20 and min(ys) >= 40, (now, ys)
        # Busy: one core burnt; the figure and the line go up.
        burn = sbx.start_process("python3", args=["-c", "while True: pass"])
        wait_for(lambda: _cpu_plot(ui)[0] >= 50 and min(_cpu_plot(ui)[1]) < 30, timeout=30)
        expect(ui.page.locator("#usage figcaption").first).to_contain_text("s total")
        ui.shot("sandbox-usage")
        sbx.kill_process(burn.pid)
    finally:
        sbx.terminate()


def test_a_host_without_the_usage_route_shows_no_usage_and_is_asked_once(ui: Console) -> None:
    """As a host from before the usage route answers: 501 ROUTE_UNSUPPORTED.

    The browser answers the usage calls itself here (the route exists on this
    host); everything else goes to the host.
    """
    expect = _expect()
    asked: list[str] = []

    def unsupported(route: Any) -> None:
        asked.append(route.request.url)
        route.fulfill(
            status=501,
            content_type="application/json",
            body='{"error": "this sandboxd host does not implement it", "code": "ROUTE_UNSUPPORTED"}',
        )

    ui.page.route(re.compile(r".*/sandboxes/[^/]+/usage$"), unsupported)
    sbx = _create(ui.host)
    try:
        ui.login()
        row = ui.page.locator(f'#sandbox-rows tr[data-id="{sbx.sandbox_id}"]')
        expect(row).to_contain_text("running")
        note = ui.page.locator("#sandbox-count")
        first = note.inner_text()
        expect(note).not_to_have_text(first)  # refreshed at least once more
        assert row.locator(".usage").count() == 0
        ui.go(f"#/sandbox/{sbx.sandbox_id}")
        expect(ui.page.locator("#facts")).to_contain_text("running")
        expect(ui.page.locator("#process-rows")).to_be_visible()
        assert ui.page.locator("#usage").count() == 0
        assert len(asked) == 1, asked
        ui.errors[:] = [e for e in ui.errors if "501" not in e]  # the browser logs the 501
    finally:
        sbx.terminate()


def test_create_suspend_and_resume_from_the_page(ui: Console) -> None:
    from tensorlake.sandbox import Sandbox

    expect = _expect()
    ui.login()
    ui.page.click("#create summary")
    ui.page.fill("#create-form input[name=name]", "made-in-console")
    ui.page.fill("#create-form input[name=memory_mb]", "256")
    ui.page.fill("#create-form input[name=labels]", "team=console, tier=dev")
    ui.page.click("#create-submit")
    row = ui.page.locator("#sandbox-rows tr", has_text="made-in-console")
    expect(row).to_contain_text("running")
    expect(row.locator(".chip")).to_have_text(["team=console", "tier=dev"])
    sbx = Sandbox.connect("made-in-console", **_sdk(ui.host))
    try:
        assert _status(sbx) == "running"
        with _http(ui.host) as c:
            got = c.get(f"{NS}/made-in-console").json()
        assert got["labels"] == {"team": "console", "tier": "dev"}
        assert got["resources"]["memory_mb"] == 256
        row.locator("a.mono").click()
        expect(ui.page.locator("#facts")).to_contain_text("running")
        ui.page.click("#suspend")
        expect(ui.page.locator("#facts")).to_contain_text("suspended")
        assert _status(sbx) == "suspended"
        # The page keeps refreshing, and none of it goes through the proxy
        # (which would resume the sandbox): it stays suspended.
        expect(ui.page.locator("#tab-paused")).to_contain_text("suspended")
        seen = int(ui.page.get_attribute("#facts", "data-refreshes") or 0)
        wait_for(lambda: int(ui.page.get_attribute("#facts", "data-refreshes") or 0) > seen + 2)
        assert _status(sbx) == "suspended"
        ui.shot("sandbox-suspended")
        ui.page.click("#resume")
        expect(ui.page.locator("#facts")).to_contain_text("running")
        assert _status(sbx) == "running"
    finally:
        sbx.terminate()


def _terminal_lines(ui: Console) -> list[str]:
    return ui.page.evaluate(
        """() => [...document.querySelectorAll('#terminal .xterm-rows > div')]
            .map(d => d.textContent.replace(/\\u00a0/g, ' ').trimEnd())"""
    )


def _type(ui: Console, text: str) -> None:
    ui.page.click("#terminal")
    ui.page.keyboard.type(text)
    ui.page.keyboard.press("Enter")


def _sizes(ui: Console) -> list[str]:
    return [ln for ln in _terminal_lines(ui) if re.fullmatch(r"\d+ \d+", ln)]


def test_terminal_runs_a_command_and_follows_a_resize(ui: Console) -> None:
    expect = _expect()
    sbx = _create(ui.host)
    try:
        ui.login()
        ui.go(f"#/sandbox/{sbx.sandbox_id}/terminal")
        expect(ui.page.locator("#terminal-state")).to_contain_text("session")
        _type(ui, "echo $((6*7))")
        wait_for(lambda: "42" in _terminal_lines(ui), timeout=30)
        ui.shot("terminal")
        _type(ui, "stty size")
        wait_for(lambda: len(_sizes(ui)) == 1, timeout=30)
        ui.page.set_viewport_size({"width": 900, "height": 900})  # narrower: fewer columns
        _type(ui, "clear; stty size")
        before = _sizes(ui)[0]
        wait_for(lambda: _sizes(ui) and _sizes(ui) != [before], timeout=30)
        (after,) = _sizes(ui)
        assert int(after.split()[1]) < int(before.split()[1]), (before, after)
    finally:
        sbx.terminate()


def test_upload_then_read_back_through_the_sdk_and_download(ui: Console) -> None:
    expect = _expect()
    sbx = _create(ui.host)
    try:
        payload = bytes(range(256)) * 64 + b"from the browser\n"
        sbx.write_file("/tmp/from-sdk.bin", bytes(range(256)) * 3)
        ui.login()
        ui.go(f"#/sandbox/{sbx.sandbox_id}/files")
        expect(ui.page.locator('#file-rows tr[data-name="from-sdk.bin"]')).to_contain_text("768 B")
        ui.page.set_input_files(
            "#upload-input",
            files=[{"name": "up.bin", "mimeType": "application/octet-stream", "buffer": payload}],
        )
        ui.page.click("#upload-submit")
        expect(ui.page.locator('#file-rows tr[data-name="up.bin"]')).to_be_visible()
        assert bytes(sbx.read_file("/tmp/up.bin").value) == payload
        with ui.page.expect_download() as got:
            ui.page.locator('#file-rows tr[data-name="from-sdk.bin"] button').click()
        assert Path(got.value.path()).read_bytes() == bytes(range(256)) * 3
        ui.shot("files")
        ui.page.fill("#files-path", "/")
        ui.page.press("#files-path", "Enter")
        ui.page.locator("#file-rows a.dir", has_text="etc/").click()
        expect(ui.page.locator('#file-rows tr[data-name="hostname"]')).to_be_visible()
    finally:
        sbx.terminate()


def test_follow_a_process_output_live(ui: Console) -> None:
    expect = _expect()
    sbx = _create(ui.host)
    try:
        # It prints, then waits for a file the test writes once the page follows.
        proc = sbx.start_process(
            "sh",
            args=["-c", "echo ready; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo after-go"],
        )
        ui.login()
        ui.go(f"#/sandbox/{sbx.sandbox_id}/processes")
        ui.page.locator(f'#process-rows tr[data-pid="{proc.pid}"] td').first.click()
        out = ui.page.locator("#process-output")
        expect(out).to_contain_text("ready")
        assert "after-go" not in out.inner_text()
        sbx.write_file("/tmp/go", b"")
        expect(out).to_contain_text("after-go")
        expect(ui.page.locator("#output-title")).to_contain_text("ended")
        # A process started from the page streams the same way.
        ui.page.fill("#process-command", "echo out; echo err >&2")
        ui.page.press("#process-command", "Enter")
        expect(out.locator(".stderr")).to_have_text("err")
        expect(out).to_contain_text("out")
        # Its command line as a shell would take it back.
        expect(ui.page.locator("#process-rows")).to_contain_text("sh -c 'echo out; echo err >&2'")
        ui.shot("processes")
        # Kill from the page: the whole tree ends, the SDK sees it signalled.
        ui.page.fill("#process-command", "sleep 300")
        ui.page.press("#process-command", "Enter")
        # The page starts it asynchronously: wait until the SDK sees it (seen missing once).
        sleeper: Any = wait_for(
            lambda: next((p for p in sbx.list_processes() if p.args == ["-c", "sleep 300"]), None),
            timeout=30,
        )
        assert sleeper is not None
        row = ui.page.locator(f'#process-rows tr[data-pid="{sleeper.pid}"]')
        expect(row).to_contain_text("running")
        row.locator("button", has_text="Kill").click()
        expect(row).to_contain_text("signaled")
        assert sbx.get_process(sleeper.pid).status.value == "signaled"
    finally:
        sbx.terminate()


def test_terminate_from_the_page_and_the_sdk_reports_terminated(ui: Console) -> None:
    expect = _expect()
    sbx = _create(ui.host)
    ui.login()
    ui.go(f"#/sandbox/{sbx.sandbox_id}")
    expect(ui.page.locator("#facts")).to_contain_text("running")
    ui.page.click("#terminate")
    expect(ui.page.locator("#terminate")).to_have_text("Confirm terminate")
    ui.page.click("#terminate")
    expect(ui.page.locator("#facts")).to_contain_text("terminated")
    assert _status(sbx) == "terminated"
    ui.shot("sandbox-terminated")


def test_pools_page_lists_creates_and_deletes_pools(ui: Console) -> None:
    from tensorlake.sandbox import SandboxClient

    expect = _expect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = SandboxClient(**_sdk(ui.host))
    pool_id = client.create_pool(image="python", memory_mb=128, warm_containers=0).pool_id
    ui.login()
    ui.go("#/pools")
    row = ui.page.locator(f'#pool-rows tr[data-id="{pool_id}"]')
    expect(row).to_contain_text("128 MB")
    ui.page.click("#pool-create summary")
    ui.page.fill("#pool-form input[name=memory_mb]", "192")
    ui.page.fill("#pool-form input[name=warm_containers]", "0")
    ui.page.click("#pool-form button[type=submit]")
    made = ui.page.locator("#pool-rows tr", has_text="192 MB")
    expect(made).to_be_visible()
    made_id = made.get_attribute("data-id")
    assert made_id in [p.pool_id for p in client.list_pools()]
    ui.shot("pools")
    row.locator("button").click()
    expect(row).to_have_count(0)
    made.locator("button").click()
    expect(made).to_have_count(0)
    left = [p.pool_id for p in client.list_pools()]
    assert pool_id not in left and made_id not in left


# --- attacks on the websocket carriage ---------------------------------------------


def _arun(coro: Any) -> Any:
    """asyncio.run in a thread of its own: Playwright's sync API keeps a loop in this one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _b64url(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def _ws(
    url: str, protocols: list[str], origin: str | None, **headers: str
) -> tuple[int, str | None, bytes]:
    """(status, chosen protocol, first output after READY + 'echo')."""
    hdrs = {**headers, **({"Origin": origin} if origin else {})}
    async with aiohttp.ClientSession() as s:
        try:
            ws = await s.ws_connect(url, protocols=protocols, headers=hdrs)
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status, None, b""
        async with ws:
            await ws.send_bytes(b"\x02")
            await ws.send_bytes(b"\x00echo carried-$((6*7))\n")
            seen = b""
            async with asyncio.timeout(30):
                while b"carried-42" not in seen:
                    msg = await ws.receive()
                    assert msg.type == aiohttp.WSMsgType.BINARY, msg
                    seen += msg.data[1:]
            return 101, ws.protocol, seen


def test_the_terminal_websocket_refuses_a_foreign_origin_and_a_missing_or_wrong_key(
    host: Host,
) -> None:
    sbx = _create(host)
    try:
        with _http(host) as c:
            r = c.post(
                "/api/v1/pty",
                json={"command": "sh"},
                headers={"X-Tensorlake-Sandbox-Id": sbx.sandbox_id},
            )
            assert r.status_code == 201, r.text
            pty = r.json()
        url = host.url.replace("http", "ws") + f"/api/v1/pty/{pty['session_id']}/ws"
        url += f"?token={pty['token']}"
        own = host.url
        base = ["sandboxd.console.v1", f"sandboxd.sandbox.{sbx.sandbox_id}"]
        key = f"sandboxd.key.{_b64url(KEY)}"
        attempts = {
            "foreign origin, valid key": ([*base, key], "https://evil.example"),
            "null origin, valid key": ([*base, key], "null"),
            "no key": (base, own),
            "wrong key": ([*base, f"sandboxd.key.{_b64url('guess')}"], own),
            "key not base64url": ([*base, "sandboxd.key.!!"], own),
        }
        got = {name: _arun(_ws(url, p, o))[0] for name, (p, o) in attempts.items()}
        assert got == {
            "foreign origin, valid key": 403,
            "null origin, valid key": 403,
            "no key": 401,
            "wrong key": 401,
            "key not base64url": 400,
        }
        both = _arun(_ws(url, [*base, key], own, Authorization=f"Bearer {KEY}"))
        assert both[0] == 400  # CONFLICTING_CREDENTIALS: one place for the key
        # The page's own origin with the key: the terminal works, and the host
        # answers the console's protocol (a browser drops the socket otherwise).
        status, protocol, seen = _arun(_ws(url, [*base, key], own))
        assert (status, protocol) == (101, "sandboxd.console.v1")
        assert b"carried-42" in seen
        # Neither header nor carriage puts the key in the host's log.
        assert KEY not in host.log() and _b64url(KEY) not in host.log()
    finally:
        sbx.terminate()


def test_the_key_and_the_id_are_not_passed_on_to_the_sandbox() -> None:
    """The host's proxy code in front of a recording daemon on a unix socket."""
    seen: dict[str, Any] = {}

    async def daemon(request: web.Request) -> web.StreamResponse:
        seen.update(headers=dict(request.headers), query=dict(request.query))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(b"\x00hi")
        await ws.close()
        return ws

    async def scenario(sock: str) -> tuple[str | None, bytes]:
        up = web.Application()
        up.router.add_get("/api/v1/pty/{sid}/ws", daemon)
        up_runner = web.AppRunner(up)
        await up_runner.setup()
        await web.UnixSite(up_runner, sock).start()
        session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock))

        async def to_sandbox(request: web.Request) -> web.StreamResponse:
            seen["sandbox"] = proxy.sandbox_id_of(request)
            return await proxy.forward(request, session)

        front = web.Application(
            middlewares=[cross_site_guard(KEY), console.ws_credentials, bearer_auth(KEY)]
        )
        front.router.add_route("*", "/api/v1/{tail:.*}", to_sandbox)
        runner = web.AppRunner(front)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with (
                aiohttp.ClientSession() as c,
                c.ws_connect(
                    f"http://127.0.0.1:{port}/api/v1/pty/s1/ws?token=t",
                    protocols=[
                        "sandboxd.console.v1",
                        f"sandboxd.key.{_b64url(KEY)}",
                        "sandboxd.sandbox.sbx-0123",
                    ],
                    headers={"Origin": f"http://127.0.0.1:{port}"},
                ) as ws,
            ):
                msg = await ws.receive()
                return ws.protocol, msg.data
        finally:
            await session.close()
            await runner.cleanup()
            await up_runner.cleanup()

    with tempfile.TemporaryDirectory(prefix="sbwc") as d:
        protocol, data = _arun(scenario(f"{d}/d.sock"))
    assert (protocol, data) == ("sandboxd.console.v1", b"\x00hi")
    assert seen["sandbox"] == "sbx-0123"
    sent = {k.lower(): v for k, v in seen["headers"].items()}
    assert "authorization" not in sent
    assert sent["sec-websocket-protocol"] == "sandboxd.console.v1"
    assert KEY not in repr(seen) and _b64url(KEY) not in repr(seen)
    assert seen["query"] == {"token": "t"}
