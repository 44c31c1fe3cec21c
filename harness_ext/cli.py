"""The ``needles`` command. Each subcommand lives in its own module under harness_ext.commands."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from harness_ext.errors import NeedlesError

# module -> registers one or more subcommands with `register(subparsers)`
COMMAND_MODULES = [
    "harness_ext.commands.basics",
    "harness_ext.commands.demo",
    "harness_ext.commands.leaderboard",
    "harness_ext.commands.gate",
    "harness_ext.commands.plot",
    "harness_ext.commands.data",
    "harness_ext.commands.finetune",
    "harness_ext.commands.heads",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="needles", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # `needles results ... | head` should just stop. Not via SIGPIPE=SIG_DFL: that would also kill the
        # process on a broken socket (an HTTP peer closing early) and, in-process, whoever called main().
        if _stdout_closed():
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        raise
    except NeedlesError as exc:
        if os.environ.get("NEEDLES_DEBUG") == "1":
            raise
        print(f"needles: error: {exc.problem}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return 2


def _stdout_closed() -> bool:
    """True when stdout's reader has gone (a pipe whose other end closed), as opposed to some socket."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
