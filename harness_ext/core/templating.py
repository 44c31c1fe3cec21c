"""Jinja2 rendering. Every template, ours or the user's, renders in a sandbox."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from jinja2 import FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from harness_ext.core.errors import NeedlesError
from harness_ext.core.paths import templates_dir


@cache
def _env(root: str) -> SandboxedEnvironment:
    # keep_trailing_newline=False: template files end with a newline that is not part of the prompt.
    return SandboxedEnvironment(
        loader=FileSystemLoader(root), undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False
    )


def load_template(name_or_path: str):
    """A packaged template by relative name (``kv/simple.jinja``) or a user file by path."""
    path = Path(name_or_path).expanduser()
    if path.is_absolute() or path.suffix and path.is_file():
        if not path.is_file():
            raise NeedlesError(f"prompt template {path} does not exist", fix="pass an existing .jinja file")
        return _env(str(path.resolve().parent)).get_template(path.name)
    root = templates_dir()
    if not (root / name_or_path).is_file():
        raise NeedlesError(f"no packaged template {name_or_path!r} in {root}", fix="check the template name")
    return _env(str(root)).get_template(name_or_path)
