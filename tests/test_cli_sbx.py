"""``sandboxd sbx`` with labels against a real host, and the help and ``image list`` polish.

The real CLI as a subprocess (as people run it) against a real ``sandboxd
host``; the host answers ``--status`` and ``--label``, and ``ls`` follows
``next_cursor`` page by page.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .cli_helpers import cli, cli_env
from .conftest import skip_with_reason
from .test_host import IMAGES, NS, Host, make_state_root, start_host


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from make_state_root("sbk")


@pytest.fixture(scope="module")
def host(state_root: Path) -> Iterator[Host]:
    h = start_host(state_root / "s", warm=1)
    yield h
    with h.http() as c:
        for s in c.get(NS).json()["sandboxes"]:
            c.delete(f"{NS}/{s['id']}")
    h.stop()


def run(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(None, *args, env={"SANDBOXD_URL": host.url}, timeout=90)


def ok(host: Host, *args: str) -> str:
    r = run(host, *args)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stdout


def as_json(host: Host, *args: str) -> Any:
    return json.loads(ok(host, *args, "--json"))


def test_create_with_labels_then_ls_by_label_and_status(host: Host) -> None:
    a = ok(host, "sbx", "create", "--label", "team=ml", "--label", "env=prod", "--wait").strip()
    b = ok(host, "sbx", "create", "--label", "team=ml", "--name", "cli-lab-b", "--wait").strip()
    try:
        assert as_json(host, "sbx", "describe", a)["labels"] == {"team": "ml", "env": "prod"}
        found = as_json(host, "sbx", "ls", "--label", "team=ml")
        assert [s["id"] for s in found] == [a, b]
        both = as_json(host, "sbx", "ls", "--label", "team=ml", "--label", "env=prod")
        assert [s["id"] for s in both] == [a]
        ok(host, "sbx", "suspend", "cli-lab-b")
        suspended = as_json(host, "sbx", "ls", "--label", "team=ml", "--status", "suspended")
        assert [s["id"] for s in suspended] == [b]
        running = as_json(host, "sbx", "ls", "--label", "team=ml", "--status", "running")
        assert [s["id"] for s in running] == [a]

        table = ok(host, "sbx", "ls", "--label", "env=prod").splitlines()
        assert table[0].split()[-1] == "LABELS"
        assert len(table) == 2 and table[1].startswith(a)
        assert table[1].split()[-1] == "env=prod,team=ml"
        described = ok(host, "sbx", "describe", a)
        assert any(
            line.split() == ["labels", "env=prod,team=ml"] for line in described.splitlines()
        )
        # Live: the usage figures are in describe.
        assert "usage.memory_bytes" in described

        # The host's refusal is printed with its code's message, exit 1.
        r = run(host, "sbx", "create", "--label", "bad key=x")
        assert r.returncode == 1 and "label key" in r.stderr, r.stderr
        r = run(host, "sbx", "ls", "--label", "=x")
        assert r.returncode == 2 and "KEY=VALUE" in r.stderr, r.stderr
    finally:
        run(host, "sbx", "terminate", a, b)


def test_ls_follows_the_pages_of_a_big_list(host: Host) -> None:
    """More sandboxes than one page: ls lists each once, in order (the page made 1 here)."""
    with host.http() as c:
        made = [
            c.post(NS, json={"wait": False, "labels": {"paged": "yes"}}).json()["sandbox_id"]
            for _ in range(3)
        ]
    code = "import sys; from sandboxd.cli import main, sbx; sbx.PAGE = 1; sys.exit(main())"
    try:
        r = subprocess.run(
            [sys.executable, "-c", code, "sbx", "ls", "--label", "paged=yes", "--json"],
            capture_output=True, text=True, timeout=60, env=cli_env(None, {"SANDBOXD_URL": host.url}),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert [s["id"] for s in json.loads(r.stdout)] == made
    finally:
        run(host, "sbx", "terminate", *made)


# --- help and image list (no host needed) ---


def test_bare_sandboxd_lists_the_commands_and_unknown_flags_show_the_subcommand() -> None:
    r = cli(None)
    assert r.returncode == 2
    for command in ("serve", "host", "image", "run", "ps", "cp", "sbx"):
        assert f"\n    {command} " in r.stdout, r.stdout
    r = cli(None, "sbx", "ls", "--bogus")
    assert r.returncode == 2 and r.stderr.startswith("usage: sandboxd sbx ls"), r.stderr
    r = cli(None, "image", "list", "--bogus")
    assert r.returncode == 2 and r.stderr.startswith("usage: sandboxd image list"), r.stderr


def test_every_image_argument_is_explained() -> None:
    from sandboxd.cli import build_parser

    def subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    image = subparsers(build_parser())["image"]
    actions = subparsers(image)
    assert set(actions) == {"build", "pull", "import", "list", "rm", "prune"}
    for name, p in [("image", image), *actions.items()]:
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"sandboxd {name}: {action.dest} has no help"
        assert p.format_help()


def test_image_list_is_a_table_and_json_for_machines() -> None:
    if not (IMAGES / "default" / "image.json").exists():
        skip_with_reason(f"no default image in {IMAGES} (`make image` builds it)")
    r = cli(None, "image", "--images", str(IMAGES), "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "CREATED", "SOURCE"]
    assert any(line.split()[0] == "default" for line in lines[1:])
    r = cli(None, "image", "--images", str(IMAGES), "list", "--json")
    names = [json.loads(line)["name"] for line in r.stdout.splitlines()]
    assert "default" in names
