"""One report, two renderings: a list of blocks (headings, paragraphs, bullet lists, tables, figures with
captions) written as Markdown and as one self-contained HTML page (figures embedded), so the HTML carries every
sentence, definition and caption the Markdown has."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


def num(v: float) -> str:
    """The report's one number format: three significant digits (trailing zeros kept), no exponent, thousands
    separated; blank for a missing value."""
    if v is None or pd.isna(v):
        return ""
    if v == 0:
        return "0"
    if abs(v) >= 99.95:
        return f"{round(v, -(len(str(int(round(abs(v))))) - 3)):,.0f}"
    return f"{v:.{max(0, 2 - int(np.floor(np.log10(abs(v)))))}f}"


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str  # may hold **bold** and `code`


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    frame: pd.DataFrame  # cells already formatted as text


@dataclass
class Figure:
    path: Path
    caption: str


def _fmt(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for c in out.columns:
        if c in ("cache", "capacity_fraction"):
            out[c] = out[c].map(lambda v: f"{v:.0%}" if pd.notna(v) else "")
        elif pd.api.types.is_float_dtype(out[c]):
            out[c] = out[c].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
    return out


def md_table(df: pd.DataFrame) -> str:
    """A numeric frame as a Markdown table (4 significant digits; cache columns as percentages), for the
    paper and predictor reports."""
    return _md_rows(_fmt(df))


def _md_rows(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines)


def markdown(blocks: list) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {i}" for i in b.items] + [""]
        elif isinstance(b, Table):
            out += [_md_rows(b.frame), ""]
        elif isinstance(b, Figure):
            out += [f"![{b.path.stem}]({b.path.name})", "", f"*Figure {b.path.stem}:* {b.caption}", ""]
    return "\n".join(out)


def _inline(text: str) -> str:
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1400px;line-height:1.4}"
         "table{border-collapse:collapse;font-size:12px;margin:0.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 6px}"
         "td{text-align:right}td:nth-child(-n+2){text-align:left}th{background:#f3f3f3}img{max-width:100%}"
         "figcaption{font-size:13px;color:#333;max-width:1000px}figure{margin:1em 0 2em}")


def html_page(blocks: list, title: str) -> str:
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            body.append(b.frame.to_html(index=False, escape=True, border=0))
        elif isinstance(b, Figure):
            data = base64.b64encode(b.path.read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(b.path.stem)}" src="data:image/png;base64,{data}"/>'
                        f"<figcaption><strong>Figure {html.escape(b.path.stem)}:</strong> {_inline(b.caption)}"
                        "</figcaption></figure>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
