"""Untrusted text (model names, task names, paths from results files) made safe for the Markdown reports."""

from __future__ import annotations


def md_escape(text: object) -> str:
    """Text safe in a Markdown table cell or heading: no cell break (|), no HTML tag (<, >), no line break."""
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\r", " ").replace("\n", " ")


def md_code(text: object) -> str:
    """Text inside a `code span` (which shows HTML literally): only a backtick or a line break could end it."""
    return str(text).replace("`", "'").replace("\r", " ").replace("\n", " ")
