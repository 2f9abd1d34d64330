"""``sandboxd image``: the self-hosted host's image store.

Runs where ``sandboxd host`` runs, as root, on the same ``--images`` dir (default
``/var/lib/sandboxd-host/images``, the default state dir's). A sandbox names its
image in ``Sandbox.create(image=NAME)``; ``default`` (also ``python``,
``tensorlake/ubuntu-minimal`` and ``tensorlake/debian-minimal``) is the one
sandboxes get when they name none. See docs/images.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from ..config import env
from .common import HOST_STATE_DIR, add_host_state_dir, human_bytes, human_duration, print_table

DEFAULT_IMAGES = f"{HOST_STATE_DIR}/images"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    from ..host.images import image_store as images

    p = sub.add_parser(
        "image",
        help="manage the self-hosted host's images (root filesystems for sandboxes)",
        description="Build, pull, import, list, remove and prune the images "
        "`sandboxd host` starts sandboxes from.",
    )
    p.add_argument(
        "--images",
        type=Path,
        default=env("SANDBOXD_HOST_IMAGES", DEFAULT_IMAGES),
        metavar="DIR",
        help=f"the image store [SANDBOXD_HOST_IMAGES] (default {DEFAULT_IMAGES})",
    )
    isub = p.add_subparsers(dest="image_cmd", required=True, metavar="ACTION")
    b = isub.add_parser(
        "build",
        help="build an image from the Debian archive with mmdebstrap, or from a Dockerfile "
        "with buildah (--dockerfile)",
    )
    b.add_argument(
        "name",
        nargs="?",
        default=images.DEFAULT_IMAGE,
        help=f"the image's name, what Sandbox.create(image=NAME) asks for "
        f"(default {images.DEFAULT_IMAGE})",
    )
    b.add_argument(
        "context",
        nargs="?",
        type=Path,
        help="with --dockerfile: the build context dir (default: the Dockerfile's dir)",
    )
    b.add_argument(
        "--dockerfile", type=Path, metavar="PATH", help="build from this Dockerfile (buildah)"
    )
    b.add_argument(
        "--build-arg", action="append", default=[], metavar="K=V", help="a Dockerfile ARG value"
    )
    b.add_argument(
        "--registry-auth",
        type=Path,
        default=env("SANDBOXD_REGISTRY_AUTH", None),
        metavar="FILE",
        help="a Docker config file for registry FROM images [SANDBOXD_REGISTRY_AUTH]",
    )
    b.add_argument(
        "--include",
        default=",".join(images.DEFAULT_PACKAGES),
        metavar="PKGS",
        help="Debian packages beyond the essential set, comma-separated "
        f"(default {','.join(images.DEFAULT_PACKAGES)})",
    )
    b.add_argument(
        "--suite",
        default=images.DEFAULT_SUITE,
        help=f"the Debian release to install (default {images.DEFAULT_SUITE})",
    )
    b.add_argument(
        "--mirror",
        default=images.DEFAULT_MIRROR,
        metavar="URL",
        help=f"the Debian archive to install from (default {images.DEFAULT_MIRROR})",
    )
    b.add_argument(
        "--if-missing", action="store_true", help="do nothing if the image already exists"
    )
    pl = isub.add_parser(
        "pull", help="fetch an image from a registry (REGISTRY[:PORT]/REPO[:TAG]) with skopeo"
    )
    pl.add_argument(
        "ref",
        help="REGISTRY[:PORT]/REPO[:TAG]; the image is stored under this name",
    )
    pl.add_argument(
        "--registry-auth",
        type=Path,
        default=env("SANDBOXD_REGISTRY_AUTH", None),
        metavar="FILE",
        help="a Docker config file with the registry's credentials [SANDBOXD_REGISTRY_AUTH]",
    )
    i = isub.add_parser(
        "import",
        help="import a root filesystem dir, a `docker save` tarball or an OCI layout dir[:TAG]",
    )
    i.add_argument("name", help="the name to store it under")
    i.add_argument(
        "path",
        type=Path,
        help="a root filesystem dir, a `docker save` tarball, or an OCI layout dir "
        "(DIR:TAG picks a tag)",
    )
    ls = isub.add_parser(
        "list", help="list the images: NAME, SIZE, CREATED, SOURCE (--json for machines)"
    )
    ls.add_argument(
        "--json",
        action="store_true",
        help="one JSON object a line: name, rootfs, uid_offset, created_at, source, size, config",
    )
    r = isub.add_parser("rm", help="remove an image")
    r.add_argument("name", help="the image to remove (refused while a live sandbox uses it)")
    pr = isub.add_parser(
        "prune",
        help="remove images no live sandbox, snapshot or pool uses (never the default), "
        "and leftovers of interrupted pulls",
    )
    add_host_state_dir(pr, "the host's state dir, whose records say what is in use")
    pr.add_argument("--dry-run", action="store_true", help="only say what would go")
    p.set_defaults(run=run)
    return p


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # A SIGTERM unwinds like Ctrl-C: the temporary dir of a pull is removed.
    raise KeyboardInterrupt


def run(ns: argparse.Namespace) -> int:
    from ..host.images.image_store import DEFAULT_IMAGE, ImageError, ImageStore
    from ..host.images.image_use import names_in_use

    signal.signal(signal.SIGTERM, _interrupt)
    store = ImageStore(ns.images)
    err = sys.stderr.fileno()
    t0 = time.monotonic()
    try:
        if ns.image_cmd == "build":
            if ns.if_missing and store.get(ns.name) is not None:
                print(f"image {ns.name} exists in {ns.images}")
                return 0
            if ns.dockerfile is not None:
                from ..host.images.dockerfile import Builder

                context = ns.context or ns.dockerfile.parent
                img = Builder(store).build(
                    ns.name, ns.dockerfile, context, ns.build_arg, err, ns.registry_auth
                )
            else:
                pkgs = tuple(p for p in ns.include.split(",") if p)
                img = store.build(ns.name, pkgs, ns.suite, ns.mirror, log=err)
            print(f"built image {img.name} in {time.monotonic() - t0:.1f} s: {img.rootfs}")
        elif ns.image_cmd == "pull":
            img = store.pull(ns.ref, log=err, authfile=ns.registry_auth)
            print(f"pulled image {img.name} in {time.monotonic() - t0:.1f} s: {img.rootfs}")
        elif ns.image_cmd == "import":
            img = store.import_path(ns.name, ns.path, log=err)
            print(f"imported image {img.name}: {img.rootfs}")
        elif ns.image_cmd == "list":
            found = store.all()
            if ns.json:
                for img in found:
                    print(json.dumps(img.describe()))
            else:
                print_table(
                    ("NAME", "SIZE", "CREATED", "SOURCE"),
                    [
                        (
                            img.name,
                            human_bytes(img.size) if img.size else "-",
                            human_duration(time.time() - img.created_at) + " ago",
                            img.source,
                        )
                        for img in found
                    ],
                )
        elif ns.image_cmd == "rm":
            if not store.remove(ns.name):
                sys.stderr.write(f"sandboxd image: {store.missing_hint(ns.name)}\n")
                return 1
        elif ns.image_cmd == "prune":
            keep = names_in_use(ns.state_dir) | {DEFAULT_IMAGE}
            for name in store.prune(keep, dry_run=ns.dry_run):
                print(("would remove " if ns.dry_run else "removed ") + name)
    except ImageError as exc:
        sys.stderr.write(f"sandboxd image: [{exc.code}] {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("sandboxd image: interrupted; nothing was stored\n")
        return 130
    return 0
