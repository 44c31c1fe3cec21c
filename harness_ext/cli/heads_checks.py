"""Argument checks and shared helpers of the ``needles heads`` commands (run, compare, patch).

Every check runs before a model loads, so bad input costs nothing and names the flag and the fix.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NoReturn

from harness_ext.core.errors import NeedlesError, print_error
from harness_ext.heads.defaults import DEFAULT_MDQA, DEFAULT_NEEDLES, shared_needles  # noqa: F401 (re-exported)

DEFAULT_THRESHOLD = 0.1  # = heads.scores.DEFAULT_THRESHOLD (a test checks); `needles --help` imports no numpy
SCORES_HELP = "a heads.json of `needles heads`, or a published head_score/<model>.json (format detected)"


def model_path(name: str) -> str:
    if name == "smollm2":
        from harness_ext.data.models import smollm2_path

        return str(smollm2_path())
    return name


# ----------------------------------------------------------------------------------- input checks
def check_counts(args: argparse.Namespace, minimum: int, names: tuple[str, ...], fix: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v is not None and v < minimum]
        if bad:
            flag = "--" + name.replace("_", "-")
            raise NeedlesError(f"{flag} {bad[0]} is below {minimum}", fix=fix)


def check_depths(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    for name in names:
        bad = [d for d in getattr(args, name) if not 0.0 <= d <= 1.0]
        if bad:
            flag = "--" + name.replace("_", "-")
            raise NeedlesError(f"{flag} {bad[0]} is outside [0, 1]", fix="give relative depths such as 0 0.5 1")


def check_threshold(value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise NeedlesError(
            f"--threshold {value} is not a score", fix="use a non-negative number such as 0.1 (Wu et al.)"
        )


def check_output_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise NeedlesError(f"--output-dir {path} is a file", fix="pass a folder (it is created when missing)")
    check_parents(path, "--output-dir")


def check_output_file(path: Path) -> None:
    if path.is_dir():
        raise NeedlesError(f"--output {path} is a folder", fix=f"pass a file name, e.g. {path / 'compare.json'}")
    check_parents(path, "--output")


def check_parents(path: Path, flag: str) -> None:
    """The nearest existing ancestor must be a folder, or the write would fail after all the work."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NeedlesError(f"{flag} {path}: {parent} is a file", fix="pass a path inside a folder")
            return


def eval_set(lm, args: argparse.Namespace, task: str | None = None):
    from harness_ext.heads import knockout as hk
    from harness_ext.heads import probes as hp

    task = task or args.knockout_task
    if task in ("musique", "summhay"):  # the study's other two tasks (harness_ext.heads.probes_qa)
        from harness_ext.heads.probes_qa import parse_qa_metadata, qa_eval_set

        meta = parse_qa_metadata(getattr(args, "qa_metadata", None))
        return qa_eval_set(
            lm,
            task,
            args.eval_lengths,
            args.eval_depths,
            args.eval_samples,
            args.eval_seed,
            args.eval_max_new_tokens,
            meta,
        )
    if task == "niah":
        # A haystack seed of its own, so the eval prompts are not the probes the heads were found on.
        probes = hp.niah_probes(
            lm.tokenizer, hp.load_needles(args.needles), args.eval_lengths, args.eval_depths, lm.chat, args.eval_seed
        )
        return hk.niah_eval_set(probes, max_new_tokens=args.eval_max_new_tokens + 16)
    docs = hp.kv_docs(
        lm.tokenizer,
        args.eval_lengths,
        args.eval_depths,
        args.eval_samples,
        args.eval_seed,
        answer_template=args.kv_answer_template,
    )
    return hk.kv_eval_set(lm, docs, args.eval_max_new_tokens)


def usage_error(parser: argparse.ArgumentParser):
    """argparse's own errors (unknown choice, not a number) in the plugin's error format, exit 2."""

    def error(message: str) -> NoReturn:
        print_error(NeedlesError(message, fix=f"see `{parser.prog} --help`"))
        sys.exit(2)

    return error
