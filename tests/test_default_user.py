"""--default-user: processes and the files API act as that user, not as the daemon."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import Daemon, skip_with_reason


@pytest.fixture
def as_nobody(make_daemon, tmp_path):  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        skip_with_reason("acting as another user needs a root daemon")
    from sandboxd.files.identity import supported

    if not supported():
        skip_with_reason("per-thread file credentials are not implemented for this architecture")
    return make_daemon("--default-user", "nobody")


def test_processes_default_to_the_configured_user(as_nobody: Daemon) -> None:
    sbx = as_nobody.sandbox()
    assert sbx.run("id", args=["-u"]).stdout == "65534"
    assert sbx.run("id", args=["-u"], user="root").stdout == "0"  # a request may still name one


@pytest.fixture
def shared_dir():  # type: ignore[no-untyped-def]
    """A directory every user can reach (pytest's own tmp dirs are root-only, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="sandboxd-default-user-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_files_follow_the_users_permissions(as_nobody: Daemon, shared_dir: Path) -> None:
    from tensorlake.sandbox.exceptions import RemoteAPIError

    tmp_path = shared_dir
    sbx = as_nobody.sandbox()
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    # shared_dir is 0755 root: readable, not writable, by nobody.
    with pytest.raises(RemoteAPIError) as err:
        sbx.read_file(str(secret))
    assert err.value.code == "PERMISSION_DENIED"
    with pytest.raises(RemoteAPIError) as err:
        sbx.write_file(str(tmp_path / "new"), b"x")
    assert err.value.code == "PERMISSION_DENIED"
    assert not (tmp_path / "new").exists()
    with pytest.raises(RemoteAPIError) as err:
        sbx.delete_file(str(secret))
    assert err.value.code == "PERMISSION_DENIED"
    # Where nobody may write, it writes, and the file is nobody's.
    home = tmp_path / "nobody-home"
    home.mkdir()
    os.chown(home, 65534, 65534)
    sbx.write_file(str(home / "mine.txt"), b"hello")
    assert (home / "mine.txt").stat().st_uid == 65534
    assert sbx.read_file(str(home / "mine.txt")).value == b"hello"
    assert [e.name for e in sbx.list_directory(str(home)).entries] == ["mine.txt"]


def test_an_unknown_default_user_is_a_clear_start_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sandboxd",
            "serve",
            "--port",
            "0",
            "--default-user",
            "no-such-user-xyz",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0
    assert "no-such-user-xyz" in r.stderr
