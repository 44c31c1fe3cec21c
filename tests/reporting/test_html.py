"""The HTML leaderboard in a real headless Chromium: it loads from file://, its script runs, plots decode, sorting works.

Needs Debian's chromium (`apt-get install -y chromium`); CI installs it, so a missing browser fails the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest

from harness_ext.reporting import leaderboard as lb
from harness_ext.reporting.plots import all_plots

REPO = Path(__file__).resolve().parents[2]
REFERENCES = [
    REPO / "leaderboards" / "lost_in_the_middle_mdqa20.csv",
    REPO / "leaderboards" / "artificial_needles_table2.csv",
]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no Chromium found: install it with `apt-get install -y chromium` (Debian), as CI does")


def browse(page: Path, profile: Path, *args: str, fragment: str = "") -> subprocess.CompletedProcess:
    """Run headless Chromium on a file:// URL with a fresh profile; it must not reach any network."""
    url = page.resolve().as_uri() + (f"#{quote(fragment)}" if fragment else "")
    cmd = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(profile)})


class Tables(HTMLParser):
    """Body attributes and the text of every table cell, per table, from a DOM dump."""

    def __init__(self):
        super().__init__()
        self.body: dict[str, str] = {}
        self.tables: list[dict] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        elif tag == "table":
            self.tables.append({"title": attrs.get("data-title", attrs.get("id", "")), "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def render(tmp_path: Path, rows) -> Path:
    page = tmp_path / "leaderboard.html"
    page.write_text(lb.render_html(rows, "Reference leaderboard", all_plots(rows)), encoding="utf-8")
    return page


def test_html_page_runs_in_headless_chromium(tmp_path):
    rows = [r for path in REFERENCES for r in lb.read_csv(path)]
    page = render(tmp_path, rows)
    html = page.read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html  # self-contained: nothing to fetch
    column = "mdqa20_pos1 best_subspan_em"
    proc = browse(page, tmp_path / "profile", "--dump-dom", fragment=f"sort={column}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = Tables()
    dom.feed(proc.stdout)
    # the page's script ran to the end, decoded the inlined plot, and applied the sort from the URL
    assert dom.body.get("data-ready") == "1"
    assert dom.body.get("data-images") == "1/1"
    assert dom.body.get("data-sorted-by") == column
    overall = next(t for t in dom.tables if t["title"] == "Overall")
    header, *body = overall["rows"]
    col = header.index(column)
    values = [float(r[col].split()[0]) for r in body if r[col]]
    assert values == sorted(values, reverse=True) and len(values) == 4
    assert body[0][0] == "GPT-3.5-Turbo (0613)"  # 75.8 at position 1 is the best in the paper's table
    assert int(dom.body["data-tables"]) == len(dom.tables)


def test_html_screenshot_is_not_blank(tmp_path):
    from matplotlib.image import imread

    rows = lb.read_csv(REFERENCES[0])
    page = render(tmp_path, rows)
    shot = tmp_path / "page.png"
    proc = browse(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,1600")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    img = imread(shot)
    assert img.shape[:2] == (1600, 1200)
    # real content: many distinct colours (text, table borders, the plot's lines), not an empty white page
    flat = (img[..., :3] * 255).astype(int).reshape(-1, 3)
    distinct = {tuple(p) for p in flat[:: max(1, len(flat) // 200000)]}
    assert len(distinct) > 50
    assert (flat.sum(axis=1) < 600).mean() > 0.01  # a visible share of non-white pixels
