"""Dataclass fields that carry their command-line flag, and the bounds check they declare (the machinery behind
``harness_ext.finetune.config``: ``harness_ext.finetune.args`` turns the metadata into argparse flags)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from harness_ext.core.errors import NeedlesError


def option(
    default: Any = None,
    help: str | None = None,  # noqa: A002 - the argparse keyword
    *,
    factory: Any = None,
    flag: str | tuple[str, ...] | None = "",
    group: str | None = None,
    choices: tuple | None = None,
    negatable: bool = False,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    label: str | None = None,
    fix: str | None = None,
    expand: type | None = None,
    key: str | None = None,
) -> Any:
    """A dataclass field with its flag: ``flag`` "" derives ``--field-name``, None means no flag;
    ``gt``/``ge``/``lt`` bound a number (None values pass); ``expand`` names a dataclass whose fields
    are flags for the keys of this dict-valued field; ``key`` is the dotted key such a flag sets inside that dict
    (default: the field's name), e.g. ``rope.factor``."""
    metadata = {
        "help": help,
        "flag": flag,
        "group": group,
        "choices": choices,
        "negatable": negatable,
        "gt": gt,
        "ge": ge,
        "lt": lt,
        "label": label,
        "fix": fix,
        "expand": expand,
        "key": key,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_names(f: dataclasses.Field) -> tuple[str, ...]:
    """The option strings of a field ("" in metadata: ``--field-name``; None: no flag)."""
    flag = f.metadata.get("flag", "")
    if flag is None:
        return ()
    if flag == "":
        return ("--" + f.name.replace("_", "-"),)
    return (flag,) if isinstance(flag, str) else tuple(flag)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_bounds(obj: Any, skip_groups: tuple[str, ...] = ()) -> None:
    """Refuse any field of the dataclass ``obj`` outside its ``gt``/``ge``/``lt`` bounds (None passes)."""
    for f in dataclasses.fields(obj):
        meta, value = f.metadata, getattr(obj, f.name)
        if meta.get("group") in skip_groups or value is None or all(meta.get(k) is None for k in ("gt", "ge", "lt")):
            continue
        names = flag_names(f)
        via = f" (set by {max(names, key=len)})" if names else ""  # the user typed the flag, maybe not the field
        label = meta.get("label") or f.name
        if not _is_number(value):
            raise NeedlesError(
                f"{label}={value!r} is not a number{via}",
                fix="write a number (YAML reads 2e-4 as text: write 2.0e-4)",
            )
        gt, ge, lt = meta.get("gt"), meta.get("ge"), meta.get("lt")
        if lt is not None:
            if not (ge if ge is not None else gt) <= value < lt:  # only ge is combined with lt
                low = ge if ge is not None else gt
                raise NeedlesError(
                    f"{label}={value} is not in [{low:g}, {lt:g}){via}", fix=meta.get("fix") or "use e.g. 0.05"
                )
        elif gt is not None and not value > gt:
            wanted = "positive" if gt == 0 else f"above {gt}"
            raise NeedlesError(
                f"{label}={value} must be {wanted}{via}", fix=meta.get("fix") or f"set {f.name} above {gt}"
            )
        elif ge is not None and not value >= ge:
            wanted = f"at least {ge:g}"
            raise NeedlesError(
                f"{label}={value} must be {wanted}{via}", fix=meta.get("fix") or f"set {f.name} to {ge:g} or more"
            )
