"""What the workflow configs (the YAML of ``needles experiment`` and of ``needles study``) check alike: errors that
name the file, the keys a mapping may hold, the names it must give, the held-out options, and reading the file.

``kind`` is how an error names the config ("experiment config", "study config"); ``path`` the file, or ``<dict>``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from harness_ext.core.errors import NeedlesError
from harness_ext.workflow.in_distribution import options as in_distribution_options

Config = TypeVar("Config")


def config_error(kind: str, path: str, problem: str, fix: str) -> NeedlesError:
    return NeedlesError(f"{kind} {path}: {problem}", fix=fix)


def check_known_keys(kind: str, path: str, raw: dict, cls: type, where: str = "") -> None:
    """Refuse keys of ``raw`` that are not fields of the dataclass ``cls`` (``where``: the entry, or the top)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        problem = f"{where} has unknown key(s) {unknown}" if where else f"unknown key(s) {unknown}"
        raise config_error(kind, path, problem, f"use keys among {sorted(known)}")


def check_strings(
    kind: str, path: str, raw: dict, keys: Iterable[str], where: str = "", fix: str | None = None
) -> None:
    """Each of ``keys`` must be a non-empty string; the fix says to add it unless ``fix`` is given."""
    for key in keys:
        if not isinstance(raw.get(key), str) or not raw.get(key):
            problem = f"{where} needs a {key}" if where else f"needs a {key}"
            raise config_error(kind, path, problem, fix or f"add `{key}: ...`")


def in_distribution_of(kind: str, path: str, values: dict) -> dict:
    """The validated ``in_distribution`` options (harness_ext.workflow.in_distribution), errors naming the file."""
    try:
        return in_distribution_options(values.get("in_distribution"), "in_distribution")
    except NeedlesError as exc:
        raise config_error(kind, path, exc.problem, exc.fix or "") from None


def load_config(kind: str, path: str | Path, from_dict: Callable[[dict, str], Config], fix: str) -> Config:
    """Read a config YAML (safe loader) and validate it with ``from_dict``; ``fix`` says where examples are."""
    from harness_ext.finetune.config import read_yaml

    path = Path(path)
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise NeedlesError(f"{kind} {path} {problem}", fix=fix)
    return from_dict(read_yaml(path), str(path))
