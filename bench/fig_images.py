"""Registry images (issue 17): pull and unpack, and create → first command on a pulled image.

A ``docker-registry`` (Debian's CNCF distribution server) runs on 127.0.0.1
from a temp dir; the image pushed to it is built offline from the default
image's rootfs (owners shifted back to 0, three gzip layers, about 200 MB
unpacked), so nothing comes from the internet. Two rows:

- ``images_pull``: ``sandboxd image pull REF`` into a fresh store, the whole
  command (Python start-up, skopeo, umoci, the owner shift and the size walk),
  against ``skopeo copy`` + ``umoci unpack`` alone on the same image, the two
  interleaved, each into a fresh dir.
- ``images_create_pulled``: the official SDK's ``Sandbox.create(image=REF)``
  until ``run("echo")`` returned, on a real ``sandboxd host --warm 0 --no-net``
  whose store has the pulled image and the default one, against the same on
  ``default``, interleaved.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import (
    PYTHON,
    Ref,
    Row,
    all_cpus,
    free_port,
    median,
    not_measured,
    percentile,
    stop_process,
)
from ctx import Ctx

NS = "/v1/namespaces/default/sandboxes"
KEYS = ["images_pull", "images_create_pulled"]
IMAGES = Path(__file__).resolve().parent.parent / "build" / "images"
DEFAULT_ROOTFS = IMAGES / "default" / "rootfs"
TOOLS = ("docker-registry", "skopeo", "umoci", "tar", "bwrap")
REPO, TAG = "bench/default-like", "v1"
# The default image stores owners shifted by this much; the pushed image has them back at 0.
UID_OFFSET = 100000
ID_MAP = f"0:{UID_OFFSET}:65536"
# Left out of the pushed image to bring it near the issue's ~200 MB (nothing a
# create or `echo` needs).
LEFT_OUT = ("usr/share/locale", "usr/share/doc", "usr/share/man", "usr/lib/git-core")
# The layers, in order: the base system, then /usr/share, then Python's stdlib.
LAYERS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    ((".",), ("usr/share", "usr/lib/python3", "usr/lib/python3.11")),
    (("usr/share",), ()),
    (("usr/lib/python3", "usr/lib/python3.11"), ()),
)


def _run(argv: list[str], timeout: float = 300) -> float:
    """Run a command on every core; its wall time in seconds (raises on failure)."""
    return _run_out(argv, timeout)[0]


def _run_out(argv: list[str], timeout: float = 300) -> tuple[float, str]:
    """Run a command on every core; its wall time in seconds and its stderr."""
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, preexec_fn=all_cpus)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {(r.stdout + r.stderr).strip()[-500:]}")
    return took, r.stderr


class Registry:
    """``docker-registry serve`` on a free loopback port, its data in ``root``."""

    def __init__(self, root: Path) -> None:
        import httpx

        root.mkdir(parents=True)
        port = free_port()
        self.host = f"127.0.0.1:{port}"
        config = root / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
            f"http:\n  addr: {self.host}\n"
        )
        with open(root / "registry.log", "wb") as log:
            self.proc = subprocess.Popen(
                ["docker-registry", "serve", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=all_cpus,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("docker-registry exited: " + (root / "registry.log").read_text())
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://{self.host}/v2/", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        self.close()
        raise RuntimeError("docker-registry did not answer on /v2/ within 20 s")

    def close(self) -> None:
        stop_process(self.proc)


def _build_layout(work: Path) -> Path:
    """An OCI layout, tag ``TAG``: the default rootfs (less LEFT_OUT) in three gzip layers."""
    layout = work / "layout"
    bundle = work / "bundle"
    _run(["umoci", "init", "--layout", str(layout)])
    _run(["umoci", "new", "--image", f"{layout}:{TAG}"])
    # Unpacked with the store's shift as the id map, so files owned by 100000+N
    # on disk go into the layers as N, as in any image built the usual way.
    ids = ["--uid-map", ID_MAP, "--gid-map", ID_MAP]
    _run(["umoci", "unpack", *ids, "--image", f"{layout}:{TAG}", str(bundle)])
    for paths, skip in LAYERS:
        excludes = [f"--exclude=./{p}" for p in (*skip, *LEFT_OUT)]
        src = subprocess.Popen(
            ["tar", "-C", str(DEFAULT_ROOTFS), "--numeric-owner", *excludes, "-cf", "-"]
            + [f"./{p}" if p != "." else "." for p in paths],
            stdout=subprocess.PIPE,
        )
        dst = subprocess.run(
            ["tar", "-C", str(bundle / "rootfs"), "--numeric-owner", "-xpf", "-"],
            stdin=src.stdout,
            capture_output=True,
        )
        assert src.stdout is not None
        src.stdout.close()
        if src.wait() != 0 or dst.returncode != 0:
            raise RuntimeError(f"copying {paths} into the bundle failed: {dst.stderr!r}")
        _run(["umoci", "repack", "--refresh-bundle", "--image", f"{layout}:{TAG}", str(bundle)])
    shutil.rmtree(bundle)
    return layout


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def _layer_count(layout: Path) -> int:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":", 1)[1]
    manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
    return len(manifest["layers"])


def _sandboxd_pull(ref: str, store: Path) -> tuple[float, float]:
    """The whole command's wall time, and the part of it skopeo took (from its log)."""
    took, log = _run_out([PYTHON, "-m", "sandboxd", "image", "--images", str(store), "pull", ref])
    found = re.search(r"fetched in ([0-9.]+) s", log)
    return took, float(found.group(1)) if found else math.nan


def _tools_pull(ref: str, work: Path) -> tuple[float, float]:
    """skopeo copy + umoci unpack alone, with the arguments sandboxd gives them."""
    work.mkdir()
    args = ["--src-no-creds", "--src-tls-verify=false", "--dest-compress-format", "gzip"]
    copy = _run(["skopeo", "copy", *args, f"docker://{ref}", f"oci:{work / 'layout'}:image"])
    unpack = _run(["umoci", "unpack", "--image", f"{work / 'layout'}:image", str(work / "b")])
    return copy, unpack


class Host:
    """``sandboxd host --warm 0 --no-net`` on ``store``, the default image's build left off."""

    def __init__(self, store: Path) -> None:
        import httpx

        self.state = Path(tempfile.mkdtemp(prefix="sbib", dir="/tmp"))
        self.state.chmod(0o711)  # the sandboxes' uid reaches its root through it
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [PYTHON, "-m", "sandboxd", "host", "--port", str(port), "--warm", "0"]
        argv += ["--state-dir", str(self.state / "s"), "--log-level", "warning"]
        argv += ["--images", str(store), "--no-net", "--no-build-default"]
        self.proc = subprocess.Popen(argv, preexec_fn=all_cpus)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("sandboxd host exited")
            try:
                if httpx.get(self.url + NS, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        self.close()
        raise RuntimeError("sandboxd host did not start")

    def close(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.state, ignore_errors=True)


def _create(url: str, image: str) -> float:
    """Create → first command through the SDK, in ms (the terminate is not timed)."""
    from tensorlake.sandbox import Sandbox

    t0 = time.perf_counter()
    sbx = Sandbox.create(image=image, api_url=url, api_key=None, memory_mb=256)
    try:
        r = sbx.run("echo", args=["x"])
        took = (time.perf_counter() - t0) * 1000
        if r.exit_code != 0 or r.stdout.strip() != "x":
            raise RuntimeError(f"echo on {image} gave {r.exit_code}: {r.stdout!r} {r.stderr!r}")
    finally:
        sbx.terminate()
    return took


def measure(ctx: Ctx) -> list[Row]:
    why = None
    if os.geteuid() != 0:
        why = "needs root"
    elif missing := [t for t in TOOLS if shutil.which(t) is None]:
        why = f"missing {', '.join(missing)} (make host-deps installs them)"
    elif not (IMAGES / "default" / "image.json").exists():
        why = f"no default image in {IMAGES} (make image)"
    if why:
        return [not_measured(k, k, "", "", why) for k in KEYS]
    work = Path(tempfile.mkdtemp(prefix="sbbi", dir="/tmp"))
    try:
        return _measure(ctx, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(ctx: Ctx, work: Path) -> list[Row]:
    t0 = time.perf_counter()
    layout = _build_layout(work / "build")
    layers = _layer_count(layout)
    registry = Registry(work / "registry")
    try:
        ref = f"{registry.host}/{REPO}:{TAG}"
        _run(
            ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{TAG}", f"docker://{ref}"]
        )
        pushed_mb = _du(work / "registry" / "data") / 1e6
        shutil.rmtree(layout.parent)
        ctx.log(f"images figure: {ref} built and pushed in {time.perf_counter() - t0:.0f} s")
        pulls: list[float] = []
        copies: list[float] = []
        unpacks: list[float] = []
        pull_fetch: list[float] = []  # skopeo's part of each sandboxd pull
        store = work / "store"
        for i in range(ctx.n(3, 1)):
            # Interleaved, each into a fresh dir, the order alternating, so both
            # sides see the same machine and neither always gets the warmer cache.
            tools = work / f"tools-{i}"
            for side in ("sandboxd", "tools") if i % 2 == 0 else ("tools", "sandboxd"):
                if side == "sandboxd":
                    shutil.rmtree(store, ignore_errors=True)
                # The last sample's writes (and the removal of its tree) are flushed
                # before this one starts, not during it.
                os.sync()
                if side == "sandboxd":
                    total, fetched = _sandboxd_pull(ref, store)
                    pulls.append(total)
                    pull_fetch.append(fetched)
                else:
                    c, u = _tools_pull(ref, tools)
                    copies.append(c)
                    unpacks.append(u)
            unpacked_mb = _du(tools / "b" / "rootfs") / 1e6
            shutil.rmtree(tools)
        # The host's store: the last pull, and the default image beside it.
        os.symlink(IMAGES / "default", store / "default")
        host = Host(store)
        on_pulled: list[float] = []
        on_default: list[float] = []
        try:
            for _ in range(ctx.n(5, 2)):
                on_default.append(_create(host.url, "default"))
                on_pulled.append(_create(host.url, ref))
        finally:
            host.close()
    finally:
        registry.close()
    tools_total = [c + u for c, u in zip(copies, unpacks, strict=True)]
    p50, ref_p50 = median(pulls), median(tools_total)
    c50, d50 = median(on_pulled), median(on_default)
    size = (
        f"{unpacked_mb:.0f} MB unpacked, {pushed_mb:.0f} MB in the registry ({layers} gzip layers)"
    )
    return [
        Row(
            "images_pull",
            f"registry image: pull and unpack ({size}), registry on loopback",
            "s",
            p50,
            refs=[Ref("skopeo copy + umoci unpack alone", ref_p50, "s", p50 / ref_p50)],
            note=(
                "`sandboxd image pull` into a fresh store, the whole command; the reference is "
                f"skopeo copy (p50 {median(copies):.1f} s) + umoci unpack "
                f"(p50 {median(unpacks):.1f} s) with sandboxd's arguments; interleaved; "
                f"skopeo's part of the sandboxd pull p50 {median(pull_fetch):.1f} s; the rest "
                "is Python start-up, umoci, and the walks that shift owners and measure the size"
            ),
            samples=len(pulls),
            detail={
                "pull_s": pulls,
                "pull_fetch_s": pull_fetch,
                "skopeo_s": copies,
                "umoci_s": unpacks,
                "unpacked_mb": unpacked_mb,
                "registry_mb": pushed_mb,
            },
        ),
        Row(
            "images_create_pulled",
            "self-hosted: create → first command on a pulled image (sequential, no spare)",
            "ms",
            c50,
            p99=percentile(on_pulled, 99),
            refs=[Ref("the default image, same host", d50, "ms", c50 / d50)],
            note=(
                "sandboxd host --warm 0 --no-net; SDK in-process, Sandbox.create(image=REF) "
                "until run('echo') returned; the image already in the store; interleaved with "
                "creates on default"
            ),
            samples=len(on_pulled),
            detail={"pulled_ms": on_pulled, "default_ms": on_default},
        ),
    ]


def profile(ctx: Ctx, key: str) -> bool:
    return False  # no goal: costs to know, with their references beside them
