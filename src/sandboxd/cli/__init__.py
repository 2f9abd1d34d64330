"""The ``sandboxd`` command: ``serve`` runs the daemon, ``host`` the control plane, the rest drive one.

Subcommands live one group per module (``serve``, ``system``, ``procs``,
``run``, ``terminal``, ``files``, ``sbx``); each module has ``register(sub,
parent)`` which adds its parsers and sets ``handler`` (an async function
taking the namespace and a :class:`~.client.Client`) or, for ``serve``,
``host`` and ``image``, ``run``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .. import __version__
from .common import EXIT_INTERRUPTED, EXIT_USAGE, CliError, resolve_url, target_parser

if TYPE_CHECKING:
    from .client import Client

Handler = Callable[[argparse.Namespace, "Client"], Awaitable[int]]

EPILOG = """\
target and auth: --url/SANDBOXD_URL (default http://127.0.0.1:9501, a daemon;
  http://127.0.0.1:8900, a host, for sbx and --sandbox), --token/SANDBOXD_TOKEN,
  --sandbox/SANDBOXD_SANDBOX (a host's sandbox, by id or name),
  --namespace/SANDBOXD_NAMESPACE (default "default")
exit codes: 0 ok, 1 the daemon refused (its message is printed), 2 usage,
  3 daemon unreachable, 4 unauthorized, 5 not found; run and pty exit with the
  process's own code (128+N when killed by signal N).
"""

# The parser a command was parsed with, kept in the namespace so that an
# unknown flag is reported with that subcommand's usage, not the top level's.
USAGE_PARSER = "_usage_parser"


def build_parser(only_serve: bool = False) -> argparse.ArgumentParser:
    """Every command's parser; ``only_serve``: just ``serve``'s.

    The daemon (in every sandbox, too) starts through here: with only its own
    parser it imports none of the client's modules, which it never runs.
    """
    from . import serve

    parser = argparse.ArgumentParser(
        prog="sandboxd",
        description="A sandbox daemon speaking the Tensorlake Sandbox API, and its command line client.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sandboxd {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    serve.add_parser(sub)
    if only_serve:
        _remember_parsers(parser)
        return parser
    from . import files, fleet, host, image, procs, run, sbx, system, terminal

    host.add_parser(sub)
    fleet.add_parser(sub)  # sandboxd gateway (issue 19)
    image.add_parser(sub)
    parent = target_parser()
    for module in (system, procs, run, terminal, files):
        module.register(sub, parent)
    sbx.register(sub, target_parser(sandbox=False))
    _remember_parsers(parser)
    return parser


def _remember_parsers(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                child.set_defaults(**{USAGE_PARSER: child})
                _remember_parsers(child)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    only_serve = args[:1] == ["serve"]
    if only_serve:
        # The daemon (one per sandbox) never runs aiohttp's client: skip importing it.
        from ..leanimports import aiohttp_server_only

        aiohttp_server_only()
    parser = build_parser(only_serve=only_serve)
    if not args:
        # Bare `sandboxd`: what there is to run, rather than a one-line complaint.
        parser.print_help()
        return EXIT_USAGE
    ns, extras = parser.parse_known_args(args)
    if extras:
        owner: argparse.ArgumentParser = getattr(ns, USAGE_PARSER, parser)
        owner.error(f"unrecognized arguments: {' '.join(extras)}")
    if ns.cmd in ("serve", "host", "image", "gateway"):
        return int(ns.run(ns))
    if getattr(ns, "handler", None) is None:
        # A group without its command (`sandboxd sbx`): list what it has.
        getattr(ns, USAGE_PARSER, parser).print_help()
        return EXIT_USAGE
    return dispatch(ns)


def dispatch(ns: argparse.Namespace) -> int:
    from . import hostapi
    from .client import Client, Target

    handler: Handler = ns.handler
    named = getattr(ns, "sandbox", None)
    target = Target(resolve_url(ns, host=ns.cmd == "sbx" or bool(named)), ns.token)

    async def go() -> int:
        nonlocal target
        if named:
            async with Client(target) as lifecycle:
                sid = await hostapi.resolve(lifecycle, ns.namespace, named)
            target = dataclasses.replace(target, sandbox_id=sid)
        async with Client(target) as client:
            return await handler(ns, client)

    try:
        return asyncio.run(go())
    except CliError as exc:
        # "sandboxd sbx terminate: ...", not just "sandboxd sbx: ...".
        prog = getattr(getattr(ns, USAGE_PARSER, None), "prog", f"sandboxd {ns.cmd}")
        sys.stderr.write(f"{prog}: {exc.message}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `sandboxd logs 42 | head`: the reader left. Say nothing; stop Python
        # from complaining again while it flushes stdout at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
