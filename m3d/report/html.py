"""A report as sections of Markdown text and PNG figures, written twice: ``report.md`` (figures linked
by relative path) and a self-contained ``report.html`` (figures embedded as data URIs, no server, no
network: it opens from disk in any browser). Only the Markdown the report itself writes is converted:
headings, paragraphs, bullet lists, pipe tables and inline code."""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..files import write_atomic

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
code { background: #f4f4f4; padding: 0 0.2em; }
.note { background: #fff7e0; border-left: 4px solid #e0a000; padding: 0.5em 1em; }
"""


@dataclass
class Figure:
    path: Path  # a PNG file
    caption: str


@dataclass
class Section:
    title: str
    markdown: str = ""
    figures: list[Figure] = field(default_factory=list)


def _inline(text: str) -> str:
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _table_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def markdown_to_html(text: str) -> str:
    """HTML of the subset of Markdown the report writes (see the module docstring)."""
    output: list[str] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.strip():
            index += 1
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 6)  # the section title is <h2>
            output.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
            index += 1
        elif line.lstrip().startswith("|"):
            rows = []
            while index < len(lines) and lines[index].lstrip().startswith("|"):
                rows.append(_table_cells(lines[index]))
                index += 1
            has_header = len(rows) > 1 and all(re.fullmatch(r":?-{3,}:?", cell) for cell in rows[1])
            body = rows[2:] if has_header else rows
            parts = ["<table>"]
            if has_header:
                parts.append("<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in rows[0]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body]
            output.append("\n".join(parts + ["</table>"]))
        elif line.lstrip().startswith(("- ", "* ")):
            items = []
            while index < len(lines) and lines[index].lstrip().startswith(("- ", "* ")):
                items.append(f"<li>{_inline(lines[index].lstrip()[2:])}</li>")
                index += 1
            output.append("<ul>" + "".join(items) + "</ul>")
        elif line.startswith("> "):
            quoted = []
            while index < len(lines) and lines[index].startswith(">"):
                quoted.append(lines[index].lstrip(">").strip())
                index += 1
            output.append(f'<p class="note">{_inline(" ".join(quoted))}</p>')
        else:
            paragraph = []
            while (
                index < len(lines)
                and lines[index].strip()
                and not lines[index].lstrip().startswith(("#", "|", "- ", "* ", "> "))
            ):
                paragraph.append(lines[index].strip())
                index += 1
            output.append(f"<p>{_inline(' '.join(paragraph))}</p>")
    return "\n".join(output)


def write_report(sections: list[Section], out_dir: str | Path, title: str) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        markdown += [f"## {section.title}", "", section.markdown.strip(), ""]
        body += [f"<h2>{html.escape(section.title)}</h2>", markdown_to_html(section.markdown)]
        for figure in section.figures:
            if not figure.path.is_file():
                raise FileNotFoundError(f"report figure {figure.path} is missing")
            relative = os.path.relpath(figure.path, out_dir)
            markdown += [f"![{figure.caption}]({relative})", "", f"*{figure.caption}*", ""]
            data = base64.b64encode(figure.path.read_bytes()).decode()
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(figure.caption)}">'
                f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>"
            )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    return write_atomic(out_dir / "report.html", page), write_atomic(out_dir / "report.md", "\n".join(markdown))
