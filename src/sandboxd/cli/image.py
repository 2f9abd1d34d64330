"""``sandboxd image``: the self-hosted host's image store (build, import, list, rm).

Runs where ``sandboxd host`` runs, as root, on the same ``--images`` dir (default
``/var/lib/sandboxd-host/images``, the default state dir's). A sandbox names its
image in ``Sandbox.create(image=NAME)``; ``default`` (also ``python``,
``tensorlake/ubuntu-minimal`` and ``tensorlake/debian-minimal``) is the one
sandboxes get when they name none.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..config import env

DEFAULT_IMAGES = "/var/lib/sandboxd-host/images"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    from ..host import images

    p = sub.add_parser(
        "image",
        help="manage the self-hosted host's images (root filesystems for sandboxes)",
        description="Build, import, list and remove the images `sandboxd host` starts sandboxes from.",
    )
    p.add_argument(
        "--images",
        type=Path,
        default=env("SANDBOXD_HOST_IMAGES", DEFAULT_IMAGES),
        metavar="DIR",
        help=f"the image store [SANDBOXD_HOST_IMAGES] (default {DEFAULT_IMAGES})",
    )
    isub = p.add_subparsers(dest="image_cmd", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="build an image from the Debian archive with mmdebstrap")
    b.add_argument("name", nargs="?", default=images.DEFAULT_IMAGE)
    b.add_argument(
        "--include",
        default=",".join(images.DEFAULT_PACKAGES),
        metavar="PKGS",
        help="Debian packages beyond the essential set, comma-separated "
        f"(default {','.join(images.DEFAULT_PACKAGES)})",
    )
    b.add_argument("--suite", default=images.DEFAULT_SUITE)
    b.add_argument("--mirror", default=images.DEFAULT_MIRROR)
    b.add_argument(
        "--if-missing", action="store_true", help="do nothing if the image already exists"
    )
    i = isub.add_parser("import", help="import a root filesystem tree (e.g. from umoci unpack)")
    i.add_argument("name")
    i.add_argument("rootfs", type=Path)
    isub.add_parser("list", help="list the images")
    r = isub.add_parser("rm", help="remove an image")
    r.add_argument("name")
    p.set_defaults(run=run)
    return p


def run(ns: argparse.Namespace) -> int:
    from ..host.images import ImageError, ImageStore

    store = ImageStore(ns.images)
    try:
        if ns.image_cmd == "build":
            if ns.if_missing and store.get(ns.name) is not None:
                print(f"image {ns.name} exists in {ns.images}")
                return 0
            pkgs = tuple(p for p in ns.include.split(",") if p)
            t0 = time.monotonic()
            img = store.build(ns.name, pkgs, ns.suite, ns.mirror, log=sys.stderr.fileno())
            print(f"built image {img.name} in {time.monotonic() - t0:.1f} s: {img.rootfs}")
        elif ns.image_cmd == "import":
            img = store.import_tree(ns.name, ns.rootfs)
            print(f"imported image {img.name}: {img.rootfs}")
        elif ns.image_cmd == "list":
            for name in store.names():
                found = store.get(name)
                if found is not None:
                    print(json.dumps(found.describe()))
        elif ns.image_cmd == "rm" and not store.remove(ns.name):
            sys.stderr.write(f"sandboxd image: no image {ns.name!r}\n")
            return 1
    except ImageError as exc:
        sys.stderr.write(f"sandboxd image: {exc}\n")
        return 1
    return 0
