"""The ``sandboxd`` command: ``serve`` runs the daemon, ``host`` the control plane, the rest drive one.

Subcommands live one group per module (``serve``, ``system``, ``procs``,
``run``, ``terminal``, ``files``); each module has ``register(sub, parent)``
which adds its parsers and sets ``handler`` (an async function taking the
namespace and a :class:`~.client.Client`) or, for ``serve``, ``run``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable

from .. import __version__
from . import files, host, image, procs, run, serve, system, terminal
from .client import Client, Target
from .common import EXIT_INTERRUPTED, CliError, target_parser

Handler = Callable[[argparse.Namespace, Client], Awaitable[int]]

EPILOG = """\
target and auth: --url/SANDBOXD_URL (default http://127.0.0.1:9501), --token/SANDBOXD_TOKEN
exit codes: 0 ok, 1 the daemon refused (its message is printed), 2 usage,
  3 daemon unreachable, 4 unauthorized, 5 not found; run and pty exit with the
  process's own code (128+N when killed by signal N).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandboxd",
        description="A sandbox daemon speaking the Tensorlake Sandbox API, and its command line client.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sandboxd {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    serve.add_parser(sub)
    host.add_parser(sub)
    image.add_parser(sub)
    parent = target_parser()
    for module in (system, procs, run, terminal, files):
        module.register(sub, parent)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.cmd in ("serve", "host", "image"):
        return int(ns.run(ns))
    return dispatch(ns)


def dispatch(ns: argparse.Namespace) -> int:
    handler: Handler = ns.handler

    async def go() -> int:
        async with Client(Target(ns.url, ns.token)) as client:
            return await handler(ns, client)

    try:
        return asyncio.run(go())
    except CliError as exc:
        sys.stderr.write(f"sandboxd {ns.cmd}: {exc.message}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `sandboxd logs 42 | head`: the reader left. Say nothing; stop Python
        # from complaining again while it flushes stdout at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
