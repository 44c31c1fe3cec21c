"""The ``needles`` command. Each subcommand lives in its own module under harness_ext.commands."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
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
    if hasattr(signal, "SIGPIPE"):  # `needles results ... | head` should just stop, not trace back
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NeedlesError as exc:
        if os.environ.get("NEEDLES_DEBUG") == "1":
            raise
        print(f"needles: error: {exc.problem}", file=sys.stderr)
        if exc.fix:
            print(f"  fix: {exc.fix}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
