"""docs/deploy.md and the start-up lines (issue 16): the recipe's commands do what it says.

No systemd here (the suite starts hosts directly), so of the unit what can be
checked is checked: every ``sandboxd`` command line in it parses with
sandboxd's own parser (a renamed flag fails here, not on someone's server),
the pre-start builds the default image only when the store has none (its
shell line, run with the build replaced by an echo), and the variables it sets
are ones the host reads. The backup and restore commands are run as written
(paths swapped for a test host's) against a real host: keys, a snapshot that
still restores, a pool and a volume with its file come back, and the sandbox
that was live at the backup is ``terminated`` with reason ``lost``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sandboxd.cli import build_parser

from .conftest import free_port, wait_for
from .test_host import POOL_BODY, Host, assert_gone, make_state_root, start_host

DOCS = Path(__file__).resolve().parent.parent / "docs"
DEPLOY = DOCS / "deploy.md"
DOC_STATE = "/var/lib/sandboxd-host"
ADMIN = "admin-token-deploy-doc"


def code_blocks(path: Path) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), flags=re.DOTALL)


def block_with(path: Path, needle: str) -> str:
    (block,) = [b for b in code_blocks(path) if needle in b]
    return block


def unit_lines() -> dict[str, list[str]]:
    """The unit's ``Key=value`` lines (continuations joined), by key."""
    text = block_with(DEPLOY, "[Service]").replace("\\\n", " ")
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_start_up_lines_in_the_docs_are_the_ones_the_host_prints() -> None:
    from sandboxd.cli.host import client_environment
    from sandboxd.host.domain import PublicUrl

    shown = block_with(DOCS / "self-hosted.md", "clients reach this host").strip()
    public = PublicUrl.parse("https://sandbox.example.com")
    assert shown == client_environment("https", 443, None, public, True)


def test_the_units_sandboxd_command_lines_parse_with_sandboxds_own_flags() -> None:
    unit = unit_lines()
    (start,) = unit["ExecStart"]
    argv = shlex.split(start)
    assert argv[0].endswith("/sandboxd") and argv[1] == "host"
    ns = build_parser().parse_args(argv[1:])  # exits (fails the test) on an unknown flag
    assert ns.public_url == "https://sandbox.example.com"
    assert str(ns.tls_cert).endswith("fullchain.pem") and str(ns.tls_key).endswith("privkey.pem")
    assert int(ns.port) == 443 and int(ns.ssh_port) == 2222 and ns.host == "0.0.0.0"
    (pre,) = unit["ExecStartPre"]
    shell = shlex.split(pre)
    assert shell[:2] == ["/bin/sh", "-c"]
    build = shlex.split(shell[2].split("||", 1)[1])
    ns = build_parser().parse_args(build[1:])
    assert str(ns.images) == f"{DOC_STATE}/images"
    # What the unit sets is what the host reads; a restart leaves the sandboxes.
    env = {v.split("=", 1)[0] for v in unit["Environment"]}
    cli = Path(__file__).resolve().parent.parent / "src/sandboxd/cli"
    for name in env | {"SANDBOXD_HOST_TOKEN"}:
        assert any(name in p.read_text() for p in cli.glob("*.py")), name
    assert unit["KillMode"] == ["process"] and unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


@pytest.mark.parametrize(
    ("store", "builds"),
    [([], True), (["default/rootfs"], False), (["half-built"], True)],
)
def test_the_pre_start_builds_only_when_the_store_has_no_image(
    tmp_path: Path, store: list[str], builds: bool
) -> None:
    (pre,) = unit_lines()["ExecStartPre"]
    images = tmp_path / "images"
    images.mkdir()
    for d in store:
        (images / d).mkdir(parents=True)
    line = shlex.split(pre)[2].replace(f"{DOC_STATE}/images", str(images))
    line = re.sub(r"\S+/sandboxd image", "echo BUILD", line)
    r = subprocess.run(["/bin/sh", "-c", line], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    assert ("BUILD" in r.stdout) is builds, r.stdout


def run_doc_shell(needle: str, state: Path, backup: Path) -> None:
    r = subprocess.run(
        ["/bin/bash", "-ec", doc_shell(needle, state, backup)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


def doc_shell(needle: str, state: Path, backup: Path) -> str:
    """A shell block of deploy.md with the state dir and the backup dir swapped for ours.

    ``systemctl`` lines are left out (the test stops and starts the host
    itself), and so is the optional copy of the image store (the test hosts
    share one outside the state dir).
    """
    lines = [
        ln
        for ln in block_with(DEPLOY, needle).splitlines()
        if not ln.strip().startswith("systemctl") and "$S/images" not in ln
    ]
    text = "\n".join(lines).replace(DOC_STATE, str(state))
    return f"S={state}\nB={backup}\n" + text.replace(
        "B=/backup/sandboxd-$(date +%F)", f"B={backup}"
    )


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from make_state_root("sbb")


def test_backup_and_restore_as_the_doc_says(state_root: Path) -> None:
    assert shutil.which("sqlite3"), (
        "sqlite3 is not installed: apt-get install sqlite3 (make host-deps)"
    )
    state, backup = state_root / "s", state_root / "backup"
    port = free_port()
    h = start_host(state, port, warm=0, token=ADMIN)
    key = subprocess.run(
        [
            *(sys.executable, "-m", "sandboxd", "host", "keys", "create"),
            *("--namespace", "team-a", "--state-dir", str(state)),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    a = httpx.Client(base_url=h.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    p = "/v1/namespaces/team-a"
    restored: Host | None = None
    sid = ""
    try:
        r = a.post(f"{p}/volumes", json={"name": "kept"})
        assert r.status_code == 201, r.text
        body = {
            "resources": {"cpus": 1.0, "memory_mb": 256},
            "file_systems": [{"file_system_id": "kept", "mount_path": "/mnt/kept"}],
        }
        r = a.post(f"{p}/sandboxes", json=body)
        assert r.status_code == 200, r.text
        sid = r.json()["sandbox_id"]
        by_id = {"X-Tensorlake-Sandbox-Id": sid}
        for path, data in (("/root/in-snapshot.txt", b"snap"), ("/mnt/kept/v.txt", b"vol")):
            r = a.put("/api/v1/files", params={"path": path}, content=data, headers=by_id)
            assert r.status_code == 204, r.text
        snap = a.post(f"{p}/sandboxes/{sid}/snapshot").json()["snapshot_id"]
        wait_for(lambda: a.get(f"{p}/snapshots/{snap}").json()["status"] != "in_progress", 60)
        assert a.get(f"{p}/snapshots/{snap}").json()["status"] == "completed"
        pool = a.post(f"{p}/sandbox-pools", json=POOL_BODY).json()["pool_id"]
        # The backup, while the host runs and the sandbox is live.
        run_doc_shell('".backup', state, backup)
        # The sandbox ends and the host stops (its sandboxes would outlive it).
        assert a.delete(f"{p}/sandboxes/{sid}").status_code == 200
        assert_gone(h, sid)
        h.stop()
        # The restore, into an empty state dir at the same path.
        run_doc_shell("cp -a $B/. $S/", state, backup)
        assert Path(f"{state}.old").is_dir() and (state / "apikeys.json").is_file()
        restored = start_host(state, port, warm=0, token=ADMIN)
        # The key works, and everything of team-a's is back.
        got = a.get(f"{p}/sandboxes/{sid}")
        assert got.status_code == 200, got.text
        assert (got.json()["status"], got.json()["termination_reason"]) == ("terminated", "lost")
        assert a.get(f"{p}/sandbox-pools/{pool}").status_code == 200
        assert a.get(f"{p}/volumes/kept").status_code == 200
        r = a.post(
            f"{p}/sandboxes",
            json={
                "snapshot_id": snap,
                "file_systems": [{"file_system_id": "kept", "mount_path": "/mnt/kept"}],
            },
        )
        assert r.status_code == 200 and r.json()["status"] == "running", r.text
        clone = r.json()["sandbox_id"]
        by_clone = {"X-Tensorlake-Sandbox-Id": clone}
        for path, data in (("/root/in-snapshot.txt", b"snap"), ("/mnt/kept/v.txt", b"vol")):
            r = a.get("/api/v1/files", params={"path": path}, headers=by_clone)
            assert r.content == data, (path, r.text)
        assert a.delete(f"{p}/sandboxes/{clone}").status_code == 200
        assert_gone(restored, clone)
    finally:
        a.close()
        (restored or h).stop()


def test_the_readme_states_the_url_trap_before_any_self_hosted_example() -> None:
    readme = (DOCS.parent / "README.md").read_text()
    section = readme.split("## Self-hosted sandboxes", 1)[1].split("\n## ", 1)[0]
    before_examples = section.split("```", 1)[0]
    for says in (
        "TENSORLAKE_API_URL",
        "http://127.0.0.1:PORT",
        "https://api.<domain>",
        "Any other value",
        "Tensorlake's cloud",
        "prints the exact",
    ):
        assert says in before_examples, says
    assert "docs/deploy.md" in section
