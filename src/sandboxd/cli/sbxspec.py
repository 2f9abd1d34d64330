"""What ``sbx create`` and ``sbx pool create`` share: a sandbox's shape, and how it is shown."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .common import EXIT_USAGE, CliError, human_bytes, human_duration


def add_sandbox_spec(p: argparse.ArgumentParser) -> None:
    """What a sandbox (or a pool's sandboxes) is made of; unset means the host's default."""
    p.add_argument("--image", help="image name (default: the host's default image)")
    p.add_argument("--cpus", type=float, help="CPUs (default 1)")
    p.add_argument(
        "--memory", type=size_mb, metavar="MB", help="memory in MiB, or with a unit: 512M, 2G"
    )
    p.add_argument("--disk", type=size_mb, metavar="MB", help="disk in MiB, or with a unit: 20G")
    p.add_argument("--timeout", type=int, metavar="SECONDS", help="lifetime; 0 (default) for none")


def size_mb(text: str) -> int:
    """``512``, ``512M``, ``2G`` or ``2GiB`` → MiB."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"M": 1, "G": 1024, "T": 1024 * 1024}.get(raw[-1:])
    number = raw[:-1] if scale else raw
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512, 512M, 2G)") from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole positive number of MiB: {text!r}")
    return int(value)


def spec_body(ns: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if ns.image:
        body["image"] = ns.image
    resources = {
        key: value
        for key, value in (("cpus", ns.cpus), ("memory_mb", ns.memory), ("disk_mb", ns.disk))
        if value is not None
    }
    if resources:
        body["resources"] = resources
    if ns.timeout is not None:
        body["timeout_secs"] = ns.timeout
    return body


def label_pairs(pairs: list[str] | None, what: str = "--label") -> list[str]:
    """``KEY=VALUE`` (or ``KEY``) items as given; a usage error without a key."""
    for item in pairs or ():
        if not item.partition("=")[0]:
            raise CliError(f"{what} expects KEY=VALUE, got {item!r}", EXIT_USAGE)
    return list(pairs or ())


def labels_body(pairs: list[str] | None) -> dict[str, str]:
    """``--label`` items as the host's ``labels`` object (the host checks the rules)."""
    return {key: value for key, _, value in (item.partition("=") for item in label_pairs(pairs))}


# --- formatting ---


def label_text(labels: object) -> str:
    if not isinstance(labels, dict) or not labels:
        return "-"
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def age(created_at: float | None, now: float | None = None) -> str:
    """The host's ``created_at`` (epoch seconds) as an age."""
    if created_at is None:
        return "-"
    seconds = created_at / 1000 if created_at > 1e11 else created_at  # ms from some hosts
    return human_duration((time.time() if now is None else now) - seconds)


def mib(value: object) -> str:
    return human_bytes(int(value) << 20) if isinstance(value, (int, float)) else "-"


def cpus(value: object) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else "-"
