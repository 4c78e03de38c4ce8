"""Self-contained HTML: every image embedded as a data URI, no external scripts, styles or fonts."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from html import escape
from typing import Any

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: right; }
th:first-child, td:first-child, td.words { text-align: left; }
th { background: #f4f4f4; }
table.facts th { text-align: left; font-weight: 600; } table.facts td { text-align: left; }
details { margin: 0.5rem 0; } summary { cursor: pointer; }
img { max-width: 100%; display: block; margin: 0.5rem 0; }
pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
.summary { font-size: 1.1rem; }
.scroll { overflow-x: auto; max-width: 100%; }
.side { display: flex; gap: 1rem; flex-wrap: wrap; } .side > div { flex: 1 1 480px; }
"""


def image(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(_td(cell) for cell in row) + "</tr>" for row in rows)
    # Scrolled within its own box, so that a wide table never widens the page on a phone.
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _td(value: Any) -> str:
    """A cell: numbers (and figures such as "97.2%") right-aligned to compare down a column, words left."""
    text = _cell(value)
    words = isinstance(value, str) and not text[:1].isdigit() and text != "-"
    return f'<td class="words">{escape(text)}</td>' if words else f"<td>{escape(text)}</td>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def facts(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column table of (what, value) rows: a summary."""
    body = "".join(f"<tr><th>{escape(name)}</th><td>{escape(value)}</td></tr>" for name, value in rows)
    return f'<div class="scroll"><table class="facts"><tbody>{body}</tbody></table></div>'


def details(summary: str, content: str) -> str:
    """`content` folded under a line that opens it."""
    return f"<details><summary>{escape(summary)}</summary>{content}</details>"


def classification_table(report: dict[str, Any], classes: Sequence[str]) -> str:
    rows = [
        [
            name,
            report[name]["precision"],
            report[name]["recall"],
            report[name]["f1-score"],
            int(report[name]["support"]),
        ]
        for name in [*classes, "macro avg", "weighted avg"]
    ]
    return table(["class", "precision", "recall", "F1", "support"], rows)


def page(title: str, sections: Sequence[tuple[str, str]], summary: str = "") -> str:
    """A whole document: a title, an optional summary line, then (heading, HTML) sections."""
    body = "".join(f"<h2>{escape(heading)}</h2>{content}" for heading, content in sections)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>"
        f'<p class="summary">{escape(summary)}</p>{body}</body></html>'
    )
