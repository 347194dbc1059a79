"""The operator's commands: ``stats``, ``ls``, ``purge``, ``verify``, ``warm`` and ``revoke``.

They work on a cache that a server (one or several workers) may be using right now, and the
server sees what they did at once; see the README's "Operating the cache" for how. Settings
resolve as for ``serve`` (file < environment < flags), so a bare command looks at the cache a
plain ``serve`` uses. :mod:`proxy.cli` registers them (:func:`add_commands`) and hands them over
(:func:`run`) before it would prepare a cache directory: these commands never create one.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable

from proxy.admin import commands, warm
from proxy.admin.cache import Failed
from proxy.config import BASE_CONFIG_ENV, Config, ConfigError, load, parse_duration

EXIT_CODES = """exit status:
  0  done
  1  found a problem or refused: damaged entries (verify), artifacts warm could not
     cache or a key the API refused, another user's or an unsafe cache directory, a
     damaged index, a purge not confirmed
  2  usage or configuration: bad flags or settings, no such cache directory, no API
     key for warm"""

_Command = Callable[[argparse.Namespace, Config], int]
_COMMANDS: dict[str, _Command] = {
    "stats": commands.stats,
    "ls": commands.ls,
    "purge": commands.purge,
    "verify": commands.verify,
    "warm": warm.warm,
    "revoke": commands.revoke,
}
COMMANDS = tuple(_COMMANDS)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _settings(parser: argparse.ArgumentParser, cache_dir: bool = True) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file, as for serve")
    if cache_dir:
        parser.add_argument(
            "--cache-dir", metavar="DIR", help="cache directory (default: as serve finds it)"
        )


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the commands on ``vlmrun-cache``'s subcommand parsers."""

    def add(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return subparsers.add_parser(
            name,
            help=summary,
            description=textwrap.fill(description, 79),
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    stats = add(
        "stats",
        "entries, bytes and their bound; hit rate and bytes saved if the server runs",
        "Show the cache's entries, bytes, max_bytes and oldest/newest entry, and, when the "
        "server recorded in the cache directory answers, its hit rate and bytes saved.",
    )
    stats.add_argument("--json", action="store_true", help="one JSON object")
    _settings(stats)

    ls = add("ls", "list cached artifacts", "List cached artifacts, of one scope or all.")
    scope = ls.add_mutually_exclusive_group()
    scope.add_argument("--session", metavar="S", help="only this session's")
    scope.add_argument("--execution", metavar="E", help="only this execution's")
    ls.add_argument("--json", action="store_true", help="a JSON list of objects")
    _settings(ls)

    purge = add(
        "purge",
        "remove entries (asks first on a terminal)",
        "Remove cached entries; a running server never serves them again. Asks for "
        "confirmation on a terminal; without one, refuses unless --yes.",
    )
    which = purge.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every entry")
    which.add_argument("--session", metavar="S", help="a session's entries")
    which.add_argument("--execution", metavar="E", help="an execution's entries")
    which.add_argument("--object", metavar="ID", help="an object's entries, in any scope")
    which.add_argument(
        "--older-than",
        metavar="DURATION",
        type=_duration,
        help="entries not read for this long, e.g. 30d or 12h",
    )
    purge.add_argument("--yes", action="store_true", help="do not ask")
    _settings(purge)

    verify = add(
        "verify",
        "re-hash every entry; remove damaged ones",
        "Re-read and re-hash every entry (sha256, and xxh3-128 where recorded); damaged ones "
        "(missing, truncated, wrong bytes) are removed and reported, with exit status 1.",
    )
    verify.add_argument("--json", action="store_true", help="a JSON report")
    _settings(verify)

    warm_ = add(
        "warm",
        "fetch a scope's artifacts through the proxy",
        "List a session's or execution's artifacts through the proxy and fetch each one not "
        "cached yet, with your key (VLMRUN_API_KEY, or --api-key-file; never an argument).",
    )
    scope = warm_.add_mutually_exclusive_group(required=True)
    scope.add_argument("--session", metavar="S", help="the session to warm")
    scope.add_argument("--execution", metavar="E", help="the execution to warm")
    warm_.add_argument(
        "--proxy",
        metavar="URL",
        help="the proxy (default: where serve listens with these settings)",
    )
    warm_.add_argument(
        "--api-key-file", metavar="FILE", help="read the API key from FILE (else VLMRUN_API_KEY)"
    )
    _settings(warm_)

    revoke = add(
        "revoke",
        "drop access proofs (all, or one key's)",
        "Void access proofs recorded so far, every key's or one key's: its next request is "
        "checked with the API again (running servers: from their next request).",
    )
    whose = revoke.add_mutually_exclusive_group(required=True)
    whose.add_argument("--all", action="store_true", help="every key's proofs")
    whose.add_argument(
        "--key-file", metavar="FILE", help="the proofs of the API key in FILE (never an argument)"
    )
    _settings(revoke)


def run(args: argparse.Namespace) -> int:
    """Run the command ``args`` names; its exit status."""
    flags = {"cache_dir": getattr(args, "cache_dir", None)}
    try:
        config = load(args.config, os.environ, flags, base=os.environ.get(BASE_CONFIG_ENV) or None)
    except ConfigError as exc:
        print(f"vlmrun-cache: invalid setting {exc}", file=sys.stderr)
        return 2
    try:
        return _COMMANDS[args.command](args, config)
    except Failed as exc:
        print(f"vlmrun-cache {args.command}: {exc}", file=sys.stderr)
        return exc.code
