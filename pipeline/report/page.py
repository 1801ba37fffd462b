"""One self-contained HTML page: inline CSS, inline SVG charts, images as data URIs.

Nothing on the page is fetched (no CDN, no fonts, no scripts from elsewhere): a report opened
from an object store, a laptop on a plane or a CI artefact looks the same. Every figure a test
compares with the manifest carries ``data-figure="<name>"``. Values are escaped where they are
put in, so keys and error messages from an archive cannot inject markup.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

STYLE = """
:root { --ink: #1d2430; --muted: #5b6576; --line: #d9dee7; --card: #f5f7fa; --ok: #1a7f37;
        --bad: #c62828; --accent: #2f6fde; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       margin: 0 auto; max-width: 1180px; padding: 20px 28px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; }
.sub { color: var(--muted); margin: 0 0 16px; word-break: break-all; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 10px; color: #fff;
         font-size: 13px; vertical-align: middle; margin-left: 8px; }
.ok { background: var(--ok); } .failed { background: var(--bad); }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 8px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
        padding: 8px 10px; }
.card .v { font-size: 20px; font-weight: 600; } .card .k { color: var(--muted); font-size: 12px; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 20px; }
@media (max-width: 900px) { .grid2 { grid-template-columns: 1fr; } }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { color: var(--muted); font-weight: 600; } th.sortable { cursor: pointer; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td code { word-break: break-all; }
.note { color: var(--muted); font-size: 12px; margin: 4px 0; }
svg text { font: 11px system-ui, sans-serif; fill: var(--muted); }
img.preview { max-width: 100%; border-radius: 6px; }
"""

# Click a column title to sort a table by it (numbers as numbers): the page's only script.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.classList.add("sortable");
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var down = th.dataset.order !== "desc";
      th.dataset.order = down ? "desc" : "asc";
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v || a.cells[col].textContent;
        var y = b.cells[col].dataset.v || b.cells[col].textContent;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
        return down ? -c : c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def number(value: float | int | None, digits: int = 1) -> str:
    """``12,345`` for counts, ``1,234.5`` for measures, ``-`` for none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:,.{digits}f}"


def figure(name: str, text: str) -> str:
    return f'<span data-figure="{esc(name)}">{esc(text)}</span>'


def cards(items: Iterable[tuple[str, str, str]]) -> str:
    """``(figure name, label, value text)`` as a row of cards."""
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{figure(name, value)}</div>'
        f'<div class="k">{esc(label)}</div></div>' for name, label, value in items) + "</div>"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = (),
          sortable: bool = False, raw: Sequence[int] = ()) -> str:
    """A table; columns in ``numeric`` right-aligned (sorted as numbers), those in ``raw``
    taken as markup (already escaped)."""
    head = "".join(f'<th class="n">{esc(h)}</th>' if i in numeric else f"<th>{esc(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            text = value if i in raw else esc(value)
            cells.append(f'<td class="n">{text}</td>' if i in numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = ' class="sortable"' if sortable else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def png_img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img class="preview" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def document(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>{body}"
            f"<script>{SCRIPT}</script></body></html>\n")
