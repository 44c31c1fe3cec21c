"""The ``needles`` command line: the parser (one module per command group registers its subcommands) and main()."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from harness_ext.core.errors import NeedlesError, debug, print_error

# module -> registers one or more subcommands with `register(subparsers)`
COMMAND_MODULES = [
    "harness_ext.cli.basics",
    "harness_ext.cli.demo",
    "harness_ext.cli.leaderboard",
    "harness_ext.cli.gate",
    "harness_ext.cli.plot",
    "harness_ext.cli.data",
    "harness_ext.cli.finetune",
    "harness_ext.cli.heads",
    "harness_ext.cli.experiment",
    "harness_ext.cli.study",
    "harness_ext.cli.scorecard",
]


DESCRIPTION = """\
Measure, improve and explain long-context retrieval with lm-eval: synthetic key-value and
needle tasks, MDQA and FLenQA, LoRA finetuning on synthetic data, leaderboards, a statistical
regression gate and retrieval-head analysis. Tasks run through plain `lm_eval --tasks ...`.

Start here:
  needles demo                                   score SmolLM2 on synthetic KV, LoRA-finetune it, score again
  needles finetune --model MODEL --output-dir D  LoRA on synthetic KV data (prints the lm_eval command to score it)
  needles experiment CONFIG.yaml                 base -> finetune -> finetuned on a suite: transfer + no-regression verdict
  needles gate --baseline A --candidate B        paired regression test between two lm_eval runs (exit 0/1/2)
  needles scorecard MODEL                        long-context report card: effective length per family, one HTML page
"""

EPILOG = "Run `needles COMMAND --help` for a command's flags. Docs: README.md and docs/ in the repository."


class NeedlesArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error format: ``needles: error: ...`` and a ``fix:`` line, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print_error(NeedlesError(f"{self.prog}: {message}", fix=f"see `{self.prog} --help` for the arguments"))
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = NeedlesArgumentParser(
        prog="needles",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
        if debug():
            raise
        print_error(exc)
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
