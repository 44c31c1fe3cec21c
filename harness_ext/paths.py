"""Where the plugin keeps caches: one root, overridable, never inside the repo."""

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
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"templates/ not found next to {here}; reinstall lm-eval-needles")
