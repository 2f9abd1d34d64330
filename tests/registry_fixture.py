"""A real OCI registry on loopback and test images built offline, for the image tests.

The registry is Debian's ``docker-registry`` (the CNCF distribution server),
started from a config in a temp dir and stopped by pid. Test images are made
with ``umoci`` from files of this machine (busybox-static, and the glibc
libraries of the default image, which the sandbox's daemon loads through)
and pushed with ``skopeo copy``. Nothing comes from the internet.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from .conftest import free_port, stop_process

TOOLS = {
    "docker-registry": "docker-registry",
    "skopeo": "skopeo",
    "umoci": "umoci",
    "busybox": "busybox-static",
    "htpasswd": "apache2-utils",
    "buildah": "buildah",
}
BUSYBOX_APPLETS = ("sh", "cat", "ls", "id", "env", "pwd", "echo", "sleep", "test", "true")
USER = "tester"
PASSWORD = "pa55word"


def missing_tools() -> str | None:
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        return f"apt-get install -y {' '.join(missing)} (make host-deps installs them)"
    return None


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    proc: subprocess.Popen[bytes]
    root: Path
    private: bool

    def stop(self) -> None:
        stop_process(self.proc)

    def auth_file(self, path: Path, password: str = PASSWORD) -> Path:
        """A Docker config file with credentials for this registry."""
        token = base64.b64encode(f"{USER}:{password}".encode()).decode()
        path.write_text(json.dumps({"auths": {self.host: {"auth": token}}}))
        return path

    def push(self, layout: Path, tag: str, repo: str, *extra: str) -> str:
        ref = f"{self.host}/{repo}:{tag}"
        argv = ["skopeo", "copy", "--dest-tls-verify=false", *extra]
        if self.private:
            argv += ["--dest-creds", f"{USER}:{PASSWORD}"]
        run([*argv, f"oci:{layout}:{tag}", f"docker://{ref}"])
        return ref


def run(argv: list[str], **kw: object) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {r.stdout}{r.stderr}")
    return str(r.stdout)


def start_registry(root: Path, private: bool = False) -> Registry:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    auth = ""
    if private:
        run(["htpasswd", "-Bbc", str(root / "htpasswd"), USER, PASSWORD])
        auth = f"auth:\n  htpasswd:\n    realm: sandboxd-test\n    path: {root / 'htpasswd'}\n"
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n" + auth
    )
    log = open(root / "registry.log", "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    reg = Registry(f"127.0.0.1:{port}", proc, root, private)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((root / "registry.log").read_text())
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://{reg.host}/v2/", timeout=1).status_code in (200, 401):
                return reg
        time.sleep(0.05)
    reg.stop()
    raise RuntimeError("the registry did not come up: " + (root / "registry.log").read_text())


def _libs(default_rootfs: Path, dest: Path) -> None:
    """The default image's top-level glibc libraries (what the host's Python loads)."""
    src = default_rootfs / "usr/lib/x86_64-linux-gnu"
    out = dest / "usr/lib/x86_64-linux-gnu"
    out.mkdir(parents=True)
    for p in src.iterdir():
        if ".so" in p.name and (p.is_symlink() or p.is_file()):
            shutil.copy2(p, out / p.name, follow_symlinks=False)
    (dest / "usr/lib64").mkdir(parents=True)
    os.symlink(
        "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", dest / "usr/lib64/ld-linux-x86-64.so.2"
    )
    for link in ("lib", "lib64", "bin", "sbin"):
        os.symlink(f"usr/{link}", dest / link)


def _unpack(layout: Path, tag: str, bundle: Path) -> Path:
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)])
    return bundle / "rootfs"


def build_images(work: Path, default_rootfs: Path) -> Path:
    """An OCI layout with tags ``base`` (1 layer), ``v1`` (2 layers, a whiteout, a
    config with Env/WorkingDir/User/Cmd) and ``big`` (v1 + 48 MiB that does not
    compress, for an interrupted pull)."""
    layout = work / "layout"
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", f"{layout}:base"])
    root = _unpack(layout, "base", work / "b1")
    _libs(default_rootfs, root)
    (root / "usr/bin").mkdir()
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "usr/bin/busybox")
    # The sandbox's daemon switches users with the image's setpriv (util-linux).
    shutil.copy2(default_rootfs / "usr/bin/setpriv", root / "usr/bin/setpriv")
    for applet in BUSYBOX_APPLETS:
        os.symlink("busybox", root / "usr/bin" / applet)
    for d in ("tmp", "root", "etc", "home/app"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chown(root / "home/app", 1234, 1234)
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\napp:x:1234:1234:app:/home/app:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\napp:x:1234:\n")
    (root / "etc/gone.txt").write_text("deleted by the upper layer\n")
    (root / "etc/kept.txt").write_text("still here\n")
    run(["umoci", "repack", "--image", f"{layout}:base", str(work / "b1")])

    root = _unpack(layout, "base", work / "b2")
    (root / "etc/gone.txt").unlink()  # a whiteout in the next layer
    (root / "srv/app").mkdir(parents=True)
    (root / "srv/app/hello.txt").write_text("hello from layer 2\n")
    run(["umoci", "repack", "--image", f"{layout}:v1", str(work / "b2")])
    run(
        [
            "umoci", "config", "--image", f"{layout}:v1",
            "--config.env", "GREETING=hi from the image",
            "--config.env", "PATH=/usr/local/bin:/usr/bin:/bin",
            "--config.workingdir", "/srv/app",
            "--config.user", "app",
            "--config.entrypoint", "sh",
            "--config.cmd", "-c", "--config.cmd", "echo entry",
        ]
    )  # fmt: skip

    root = _unpack(layout, "v1", work / "b3")
    with open(root / "srv/app/noise.bin", "wb") as f:
        for _ in range(48):
            f.write(os.urandom(1 << 20))
    run(["umoci", "repack", "--image", f"{layout}:big", str(work / "b3")])
    for b in ("b1", "b2", "b3"):
        shutil.rmtree(work / b)
    return layout


def add_odd_media_tag(layout: Path, source: str = "v1", tag: str = "odd") -> None:
    """Tag ``tag``: ``source`` with its first layer's media type made unknown."""
    index = json.loads((layout / "index.json").read_text())
    ref = "org.opencontainers.image.ref.name"
    desc = next(d for d in index["manifests"] if d["annotations"][ref] == source)
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / desc["digest"].split(":")[1]).read_text())
    manifest["layers"][0]["mediaType"] = "application/vnd.sandboxd.test.unknown"
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    odd = {**desc, "digest": f"sha256:{digest}", "size": len(data), "annotations": {ref: tag}}
    index["manifests"].append(odd)
    (layout / "index.json").write_text(json.dumps(index))


GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def add_manifest_list(layout: Path, mine: str, other: str, tag: str = "multi") -> None:
    """Tag ``tag``: an image index whose entry for this machine's architecture is
    ``mine`` and whose entry for another architecture is ``other``."""
    import platform

    index = json.loads((layout / "index.json").read_text())
    ref = "org.opencontainers.image.ref.name"
    by_tag = {d["annotations"][ref]: d for d in index["manifests"]}
    here = GOARCH[platform.machine()]
    away = "s390x"
    entries = []
    for name, arch in ((other, away), (mine, here)):
        d = {k: v for k, v in by_tag[name].items() if k != "annotations"}
        entries.append({**d, "platform": {"architecture": arch, "os": "linux"}})
    data = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        }
    ).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    index["manifests"].append(
        {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": f"sha256:{digest}",
            "size": len(data),
            "annotations": {ref: tag},
        }
    )
    (layout / "index.json").write_text(json.dumps(index))
