"""Where things are: the cache root (overridable, never inside the repo), the templates, and model-path checks."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$NEEDLES_CACHE_DIR`` or ``$XDG_CACHE_HOME/lm-eval-needles`` (default ``~/.cache``)."""
    explicit = os.environ.get("NEEDLES_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(xdg).expanduser() / "lm-eval-needles"


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def templates_dir() -> Path:
    """Jinja2 templates: inside the installed wheel, or the repo's ``templates/`` when run from source."""
    package = Path(__file__).resolve().parents[1]  # harness_ext/
    for candidate in (package / "templates", package.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"templates/ not found next to {package}; reinstall lm-eval-needles")


def looks_like_path(name: str) -> bool:
    """True for names only a file system path can mean: Hugging Face ids are ``name`` or ``org/name``."""
    return name.startswith(("/", "~", ".")) or "\\" in name or name.count("/") > 1


def local_or_hub(name: str | Path, what: str = "model", required_file: str | None = "config.json") -> str:
    """A model/tokenizer reference: an existing folder (absolute path) or a hub id, checked before anything loads.

    transformers answers a missing local path with "Repo id must use alphanumeric chars", which hides the typo;
    this names the path instead. ``required_file`` is what a folder of that kind must hold.
    """
    from harness_ext.core.errors import NeedlesError

    text = str(name)
    path = Path(text).expanduser()
    fix = f"pass a local Hugging Face {what} folder or a downloaded hub id (org/name)"
    if path.exists():
        if not path.is_dir():
            raise NeedlesError(f"{what} {text} is a file, not a {what} folder", fix=fix)
        if required_file and not (path / required_file).is_file():
            raise NeedlesError(f"{what} folder {text} holds no {required_file}", fix=fix)
        return str(path.resolve())
    if looks_like_path(text):
        raise NeedlesError(f"no such {what} folder: {text} (the path does not exist)", fix=fix)
    return text
