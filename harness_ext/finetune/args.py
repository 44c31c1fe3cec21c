"""Command-line flags generated from the config dataclasses, and the function that runs a parsed finetune.

As transformers' ``HfArgumentParser`` / trl's ``TrlParser`` do, each dataclass field becomes one
flag: its type gives the argparse type (``list[X]``: ``nargs="+"``, ``bool``: a switch, ``dict``:
JSON), its metadata (:func:`harness_ext.finetune.config.option`) the flag name, help, choices and
argument group. Config flags default to None, so a YAML file (``--config``) is overridden only by
what is given. ``needles finetune`` (harness_ext/cli/finetune.py) and ``python -m
harness_ext.finetune`` (``accelerate launch ... -m harness_ext.finetune``) share this parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Iterable
from typing import Any

from harness_ext.finetune.config import FinetuneConfig, flag_names, load_config
from harness_ext.finetune.openai_ft import OpenAIJobOptions


def json_object(text: str) -> dict:
    """argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def flag_dest(f: dataclasses.Field) -> str | None:
    """The argparse namespace attribute of a field's flag (argparse's own rule: the first long option)."""
    names = flag_names(f)
    if not names:
        return None
    long = next((n for n in names if n.startswith("--")), names[0])
    return long.lstrip("-").replace("-", "_")


def _argparse_kwargs(hint: Any, f: dataclasses.Field, with_default: bool) -> dict:
    meta = f.metadata
    default = _field_default(f) if with_default else None
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    kwargs: dict = {"help": meta.get("help"), "default": default}
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if meta.get("negatable") else "store_true"
        return kwargs
    if typing.get_origin(hint) is list:
        kwargs["nargs"] = "+"
        hint = typing.get_args(hint)[0]
    if hint is dict:
        kwargs["type"] = json_object
    elif hint in (int, float):
        kwargs["type"] = hint
    if meta.get("choices"):
        kwargs["choices"] = list(meta["choices"])
    return kwargs


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    groups: Iterable[str] | None = None,
    top_level: bool = True,
    with_defaults: bool = False,
) -> None:
    """One flag per field of ``cls`` (and per field of an ``expand`` dataclass), in field order.

    ``groups``: only fields of these argument groups; ``top_level``: include fields without a group;
    ``with_defaults``: the fields' defaults become the flags' (else None: "not given").
    """
    wanted = set(groups) if groups is not None else None
    made: dict[str, Any] = {}  # group title -> its argparse group
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f.metadata.get("group")
        if (name is None and not top_level) or (name is not None and wanted is not None and name not in wanted):
            continue
        target = parser if name is None else made.setdefault(name, parser.add_argument_group(name))
        expand = f.metadata.get("expand")
        if expand is not None:
            sub_hints = typing.get_type_hints(expand)
            for sub in dataclasses.fields(expand):
                target.add_argument(*flag_names(sub), **_argparse_kwargs(sub_hints[sub.name], sub, with_defaults))
        if flag_names(f):
            target.add_argument(*flag_names(f), **_argparse_kwargs(hints[f.name], f, with_defaults))


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The FinetuneConfig values given on the command line (flags left at None are not given)."""
    out: dict = {}
    for f in dataclasses.fields(FinetuneConfig):
        expand = f.metadata.get("expand")
        if expand is not None:
            own = flag_dest(f)  # e.g. --context JSON: the expanded flags set keys inside it
            given = json.loads(json.dumps(getattr(args, own, None) or {})) if own else {}
            for s in dataclasses.fields(expand):
                value = getattr(args, flag_dest(s), None)
                if value is not None:
                    set_dotted(given, s.metadata.get("key") or s.name, value)
            if given:
                if f.name == "data" and "num_dicts" in given and "lengths" not in given:
                    given["lengths"] = None  # a dictionary count replaces token targets
                out[f.name] = given
            continue
        dest = flag_dest(f)
        if dest is not None and getattr(args, dest, None) is not None:
            out[f.name] = getattr(args, dest)
    return out


def set_dotted(target: dict, key: str, value: Any) -> None:
    """``target["a"]["b"] = value`` for the key ``a.b`` (missing mappings are created)."""
    *parents, last = key.split(".")
    for name in parents:
        child = target.get(name)
        target[name] = child = dict(child) if isinstance(child, dict) else {}
        target = child
    target[last] = value


def options_from_args(cls: type, args: argparse.Namespace) -> Any:
    """An instance of the dataclass ``cls`` from its flags' values."""
    return cls(**{f.name: getattr(args, flag_dest(f)) for f in dataclasses.fields(cls) if flag_dest(f)})


def add_finetune_flags(parser: argparse.ArgumentParser) -> None:
    """``--config``, every FinetuneConfig flag, and the OpenAI backend's flags."""
    parser.add_argument("--config", help="YAML file of options (flags override it)")
    add_dataclass_flags(parser, FinetuneConfig)
    add_dataclass_flags(parser, OpenAIJobOptions, with_defaults=True)


def finetune_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """A parser with exactly ``needles finetune``'s flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_finetune_flags(parser)
    return parser


def run_finetune(args: argparse.Namespace) -> int:
    """Run a parsed finetune command: local (hf) training, or an OpenAI job; prints the result's handle."""
    from harness_ext.finetune.config import check_bounds

    cfg = load_config(args.config, overrides_from_args(args))
    job = options_from_args(OpenAIJobOptions, args)
    check_bounds(job)
    if job.backend == "openai":
        from harness_ext.core.errors import NeedlesError
        from harness_ext.finetune.openai_ft import finetune_openai

        if cfg.context:  # OpenAI's models have fixed windows: nothing here can change their RoPE
            raise NeedlesError(
                "a context section (context extension) applies to local training only",
                fix="drop --context-length / --rope-* / context: for --backend openai",
            )

        result = finetune_openai(
            cfg,
            job.openai_model,
            n_epochs=job.n_epochs,
            suffix=job.suffix,
            poll_interval=job.poll_interval,
            timeout=job.timeout,
        )
        print(result["fine_tuned_model"])
        return 0
    from harness_ext.finetune.recipe import finetune

    manifest = finetune(cfg)
    if "eval_command" in manifest:
        print(manifest["eval_command"])
    return 0
