"""Rules of the repository that reviewers would otherwise check by hand: module size and
docstrings, README as a front page, and the README's links."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "harness_ext"


def test_every_module_is_under_400_lines_and_opens_with_a_docstring():
    too_long, undocumented = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 400:
            too_long.append(f"{path.relative_to(REPO)}: {len(text.splitlines())}")
        if path.name != "__init__.py" and not ast.get_docstring(ast.parse(text)):
            undocumented.append(str(path.relative_to(REPO)))
    assert not too_long, f"modules over 400 lines: {too_long}"
    assert not undocumented, f"modules without a docstring: {undocumented}"


def test_readme_is_a_front_page_whose_links_resolve():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert "OWNER" not in readme  # every command in it runs as written: no placeholder to fill in
    commands = [line for line in readme.splitlines()[:12] if line.startswith(("make ", "git clone", "cd "))]
    assert any("make demo" in c for c in commands) and any("make test" in c for c in commands), commands
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if not target.startswith(("http://", "https://", "mailto:")) and not (REPO / target).exists():
            missing.append(target)
    assert not missing, f"README links to missing files: {missing}"


# A numbered work period, an issue number, or a dated check log: how the project was made, not what
# it is. History a user needs is in CHANGELOG.md, by version.
HISTORY = re.compile(r"\b(sessions? \d+|issues? #?\d+|(latest|earlier) check\b|what changed in\b)", re.IGNORECASE)


def test_nothing_narrates_how_the_project_was_made_and_the_changelog_exists():
    assert (REPO / "CHANGELOG.md").is_file()
    roots = ["harness_ext", "kv_tasks", "tests", "docs", "benchmarks", "scripts", "examples", "README.md"]
    found = []
    for root in roots:
        paths = [REPO / root] if (REPO / root).is_file() else sorted((REPO / root).rglob("*"))
        for path in paths:
            if path.suffix not in {".py", ".md", ".yaml", ".yml", ".sh"} or path == Path(__file__):
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if HISTORY.search(line):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:80]}")
    assert not found, "lines that narrate development:\n" + "\n".join(found)
