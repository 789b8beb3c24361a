"""The report's pure rendering: escaping, token colours, the self-contained HTML page and the Markdown file.

Safety: every string that comes from data (texts, ids, field values, file names) goes through
``dataworth.util.displayable`` (controls, bidi overrides and other invisible characters become visible escapes,
as in the terminal) and then ``html.escape`` before it reaches the page; the page carries a
Content-Security-Policy that allows only its own script (by hash), inline styles and ``data:`` images, so even
a missed escape could not run code or fetch anything. No data reaches the script: search works on the page's text.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dataworth.util import displayable

DEFAULT_MAX_DISPLAY_TOKENS = 1500
DEFAULT_MAX_TEXT_CHARS = 20_000


@dataclass(frozen=True)
class ReportConfig:
    """What a report shows. ``top_k``: documents per query and direction (None: all the scores kept).
    ``layer``: the module whose KFAC factors are drawn (name, unique substring or index; None: the first).
    ``max_display_tokens`` / ``max_text_chars``: display limits for enormous documents — the rest is cut
    with a visible marker (and its summed contribution), never silently. ``by``: also a ledger by this field.
    """

    top_k: int | None = None
    layer: str | int | None = None
    max_display_tokens: int = DEFAULT_MAX_DISPLAY_TOKENS
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    by: str | None = None
    device: str = "cpu"


POSITIVE_RGB = (37, 99, 235)  # blue: the document helps the query
NEGATIVE_RGB = (234, 88, 12)  # orange: the document hurts the query
MAX_ALPHA = 0.75


@dataclass
class ShownDocument:
    """One training document as displayed: token texts, per-token contributions to *one* query's score."""

    train_row: int
    train_id: str
    source: str
    kind: str
    token_texts: list[str]
    contributions: np.ndarray  # [T] float64, sums to the score (mode denominators applied)
    targets: list[bool]
    special: list[bool]
    truncated_at_extraction: bool = False


@dataclass
class QueryView:
    """Everything shown for one query: its text, and its scored rows per direction."""

    index: int
    query_id: str
    parts: list[tuple[str, str]]
    rows: dict[str, pd.DataFrame]
    documents: dict[tuple[str, int], ShownDocument] = field(default_factory=dict)
    plot: bytes | None = None
    row: object = None  # the query's dataworth.data.rows.Row


def esc(value) -> str:
    """HTML-escape any value for text or a double-quoted attribute (``& < > " '``), after :func:`displayable`."""
    return html.escape(displayable(str(value)), quote=True)


def truncate_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with a marker saying how many were left out; unchanged if short."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n… [truncated for display: {len(text) - limit} more characters]"


def token_colour(contribution: float, scale: float) -> str:
    """CSS background for a contribution: blue (helps) or orange (hurts), opacity ``0.75 · |c| / scale``."""
    if scale <= 0 or contribution == 0 or not math.isfinite(contribution):
        return "transparent"
    r, g, b = POSITIVE_RGB if contribution > 0 else NEGATIVE_RGB
    alpha = MAX_ALPHA * min(abs(contribution) / scale, 1.0)
    return f"rgba({r},{g},{b},{alpha:.3f})"


_CSS = """
:root{--pos:rgb(37,99,235);--neg:rgb(234,88,12);--ink:#1e293b;--mute:#64748b;--line:#e2e8f0;--bg:#f8fafc}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);background:var(--bg)}
#side{position:fixed;top:0;left:0;bottom:0;width:270px;overflow-y:auto;background:#fff;border-right:1px solid var(--line);padding:14px}
#side h1{font-size:16px;margin:0 0 8px}
#search{width:100%;padding:6px 8px;border:1px solid #cbd5e1;border-radius:6px;font:inherit}
#shown-count{color:var(--mute);font-size:12px;margin:4px 0 8px}
#side ol{list-style:none;padding:0;margin:0}
#side li a{display:block;padding:3px 6px;border-radius:4px;color:var(--ink);text-decoration:none;font-size:13px;
  white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
#side li a:hover{background:#eef2ff}
#side .sect{margin-top:10px;font-size:12px;color:var(--mute);text-transform:uppercase;letter-spacing:.05em}
main{margin-left:270px;padding:18px 28px;max-width:1400px}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 16px;margin:0 0 16px}
h2{font-size:18px;margin:0 0 8px}
h3{font-size:14px;margin:10px 0 6px}
.meta{color:var(--mute);font-size:12px}
.note{background:#fef9c3;border:1px solid #fde68a;border-radius:6px;padding:6px 10px;margin:6px 0;font-size:13px}
table{border-collapse:collapse;font-size:12.5px}
th,td{border-bottom:1px solid var(--line);padding:3px 8px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.qtext{white-space:pre-wrap;background:var(--bg);border-radius:6px;padding:6px 10px;margin:4px 0}
.qtext b{color:var(--mute);font-weight:600;font-size:11px;text-transform:uppercase;display:block}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:14px}
@media (max-width:1100px){.cols{grid-template-columns:1fr}}
.doc{border:1px solid var(--line);border-left:4px solid var(--pos);border-radius:6px;padding:6px 10px;margin:0 0 10px}
.doc.negative{border-left-color:var(--neg)}
.doc header{display:flex;gap:10px;align-items:baseline;flex-wrap:wrap;font-size:12.5px}
.score{font-weight:600;font-variant-numeric:tabular-nums}
.text{white-space:pre-wrap;word-break:break-word;font:12.5px/1.6 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
  margin-top:4px;max-height:22em;overflow-y:auto}
.tok{border-radius:2px}
.tok.ctx{color:#7c8aa0}
.tok.sp{color:var(--mute);font-style:italic}
.cut{display:block;color:var(--mute);font-style:italic}
.legend span{padding:1px 6px;border-radius:3px;margin-right:6px}
.nav{float:right;font-size:12px}
.nav a{color:var(--mute);margin-left:8px}
img{max-width:100%;height:auto}
.empty{color:var(--mute);font-style:italic}
.plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.plots figure{margin:0;flex:1 1 380px;max-width:600px}
"""
_SCRIPT = """(function(){
var box=document.getElementById('search'),count=document.getElementById('shown-count');
var sections=Array.prototype.slice.call(document.querySelectorAll('section.query'));
var texts=sections.map(function(s){return s.textContent.toLowerCase();});
var links={};
Array.prototype.forEach.call(document.querySelectorAll('#side li[data-q]'),function(li){links[li.getAttribute('data-q')]=li;});
function apply(){var t=box.value.trim().toLowerCase(),n=0;
sections.forEach(function(s,i){var hit=!t||texts[i].indexOf(t)>=0;s.hidden=!hit;if(links[s.id])links[s.id].hidden=!hit;if(hit)n++;});
count.textContent=n+' of '+sections.length+' queries shown';}
box.addEventListener('input',apply);apply();
})();"""


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _num(value: float) -> str:
    return f"{value:.4g}"


def render_tokens(doc: ShownDocument, limit: int) -> str:
    """The document's text as one ``<span class="tok">`` per token (first ``limit`` tokens), coloured by
    contribution, ``data-c`` holding the exact value; a ``cut`` marker carries the rest's count and sum."""
    shown = min(limit, len(doc.token_texts))
    scale = float(np.max(np.abs(doc.contributions))) if doc.contributions.size else 0.0
    parts = []
    for t in range(shown):
        c = float(doc.contributions[t])
        classes = "tok" + ("" if doc.targets[t] else " ctx") + (" sp" if doc.special[t] else "")
        title = f"token {t}: {c:+.4g}" + (" · loss target" if doc.targets[t] else "")
        parts.append(f'<span class="{classes}" data-c="{c:.9g}" style="background-color:{token_colour(c, scale)}" '
                     f'title="{title}">{esc(doc.token_texts[t])}</span>')
    if shown < len(doc.token_texts):
        rest = float(doc.contributions[shown:].sum())
        parts.append(f'<span class="cut" data-c="{rest:.9g}">… [truncated for display: '
                     f'{len(doc.token_texts) - shown} more tokens, contribution {rest:+.4g}]</span>')
    if doc.truncated_at_extraction:
        parts.append('<span class="cut">[the document was longer: it was truncated to max_length at extraction, '
                     'the rest was never scored]</span>')
    return "".join(parts)


def render_document(rec, doc: ShownDocument | None, limit: int) -> str:
    """One scored training document: rank, id, score, source, highlighted text."""
    head = (f'<header><span>#{int(rec.rank)}</span><span class="score">{float(rec.score):+.5g}</span>'
            f'<span>id <code>{esc(rec.train_id)}</code></span><span class="meta">row {int(rec.train_row)}')
    if doc is None:
        return (f'<article class="doc {esc(rec.direction)}" data-train-id="{esc(rec.train_id)}" '
                f'data-direction="{esc(rec.direction)}" data-rank="{int(rec.rank)}" data-score="{float(rec.score):.9g}">'
                f'{head}</span></header><div class="empty">text not available</div></article>')
    total = float(doc.contributions.sum())
    head += f' · {esc(doc.source)} · {esc(doc.kind)} · {len(doc.token_texts)} tokens · Σ tokens {total:+.5g}</span>'
    return (f'<article class="doc {esc(rec.direction)}" data-train-id="{esc(rec.train_id)}" '
            f'data-direction="{esc(rec.direction)}" data-rank="{int(rec.rank)}" data-score="{float(rec.score):.9g}">'
            f'{head}</header><div class="text">{render_tokens(doc, limit)}</div></article>')


def signed_rows(table: pd.DataFrame, direction: str) -> pd.DataFrame:
    """The kept rows whose score has the direction's sign: a "hurts most" list holds only negative scores.

    The top-k of the negative direction are the k lowest scores, which are positive when few rows (or none)
    have negative influence; shown under "hurts" they would say the opposite of what they are.
    """
    keep = table["score"] > 0 if direction == "positive" else table["score"] < 0
    return table[keep].reset_index(drop=True)


def empty_reason(table: pd.DataFrame, direction: str) -> str:
    """Why a direction shows no rows: nothing was scored, or no kept score has that sign."""
    if table.empty:
        return "No training rows were scored for this query."
    sign = "positive" if direction == "positive" else "negative"
    verb = "helps" if direction == "positive" else "hurts"
    return f"No training row has a {sign} score for this query: none {verb} it."


def render_query(view: QueryView, n_queries: int, config: ReportConfig) -> str:
    """One query's section: text, score distribution, helping and hurting documents side by side."""
    nav = []
    if view.index > 0:
        nav.append(f'<a href="#q-{view.index - 1}">← previous</a>')
    if view.index + 1 < n_queries:
        nav.append(f'<a href="#q-{view.index + 1}">next →</a>')
    nav.append('<a href="#top">top</a>')
    parts = "".join(f'<div class="qtext"><b>{esc(label)}</b>{esc(truncate_text(text, config.max_text_chars))}</div>'
                    for label, text in view.parts) or '<div class="empty">query text not available</div>'
    columns = []
    for direction, heading in (("positive", "Helps most (positive influence)"),
                               ("negative", "Hurts most (negative influence)")):
        table = signed_rows(view.rows[direction], direction)
        if table.empty:
            body = f'<div class="empty">{esc(empty_reason(view.rows[direction], direction))}</div>'
        else:
            body = "".join(render_document(rec, view.documents.get((direction, int(rec.rank))),
                                           config.max_display_tokens) for rec in table.itertuples(index=False))
        columns.append(f'<div><h3>{heading}</h3>{body}</div>')
    return (f'<section class="query card" id="q-{view.index}" data-query-id="{esc(view.query_id)}">'
            f'<div class="nav">{"".join(nav)}</div><h2>Query {view.index + 1}: <code>{esc(view.query_id)}</code></h2>'
            f'{parts}{_img(view.plot, "score distribution")}<div class="cols">{"".join(columns)}</div></section>')


def render_ledger_table(ledger: pd.DataFrame, key: str, head: int = 15, tail: int = 5) -> str:
    """The ledger's most and least valuable entries as an HTML table (all when short)."""
    if len(ledger) > head + tail:
        picked = pd.concat([ledger.head(head), ledger.tail(tail)])
        gap = head
    else:
        picked, gap = ledger, None
    cols = ["net_sum", "net_mean", "positive_sum", "negative_sum", "topk_positive", "topk_negative", "n_docs"]
    rows = []
    for i, rec in enumerate(picked.itertuples(index=False)):
        if gap is not None and i == gap:
            rows.append(f'<tr><td colspan="{len(cols) + 1}" class="meta">… {len(ledger) - head - tail} more '
                        '(see the CSV) …</td></tr>')
        cells = "".join(f'<td class="num">{_num(getattr(rec, c)) if "sum" in c or "mean" in c else int(getattr(rec, c))}</td>'
                        for c in cols)
        rows.append(f"<tr><td><code>{esc(getattr(rec, key))}</code></td>{cells}</tr>")
    header = "".join(f"<th>{c}</th>" for c in [key] + cols)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def render_html(summary: dict, views: list[QueryView], ledgers: list[tuple[str, pd.DataFrame]], plots: dict,
                notes: list[str], config: ReportConfig) -> str:
    """The whole page (CSP-restricted; the only script is ``_SCRIPT``, allowed by its hash)."""
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'; "
           "base-uri 'none'; form-action 'none'")
    nav = "".join(f'<li data-q="q-{v.index}"><a href="#q-{v.index}" title="{esc(v.query_id)}">{v.index + 1}. '
                  f'{esc(v.query_id)}</a></li>' for v in views)
    facts = [("store", summary.get("store")), ("model", (summary.get("model") or {}).get("spec")),
             ("curvature", summary.get("curvature")), ("mode", summary.get("mode")),
             ("queries", summary.get("n_queries")), ("training rows", summary.get("n_rows")),
             ("top-k kept", summary.get("top_k")), ("full matrix", summary.get("full")),
             ("report built in", f"{summary.get('report_seconds')} s")]
    fact_rows = "".join(f"<tr><th>{k}</th><td>{esc(v)}</td></tr>" for k, v in facts)
    note_html = "".join(f'<div class="note">{esc(n)}</div>' for n in notes)
    overview = [f'<figure>{_img(plots.get(name), name)}</figure>' for name in ("spectra", "factors", "self_influence")
                if plots.get(name)]
    ledger_html = "".join(f"<h3>{esc(title)}</h3>{render_ledger_table(table, table.columns[0] if table.columns[0] != 'train_row' else 'train_id')}"
                          for title, table in ledgers)
    body = "".join(render_query(v, len(views), config) for v in views)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>dataworth report</title><style>{_CSS}</style></head>
<body id="top">
<aside id="side"><h1>dataworth report</h1>
<input id="search" type="search" placeholder="Filter queries and documents…" aria-label="filter">
<div id="shown-count"></div>
<div class="sect">Overview</div><ol><li><a href="#overview">Run &amp; plots</a></li><li><a href="#ledger">Data-value ledger</a></li></ol>
<div class="sect">Queries</div><ol>{nav}</ol></aside>
<main>
<section class="card" id="overview"><h2>Run</h2><table>{fact_rows}</table>{note_html}
<p class="legend meta">Sign: positive = up-weighting the training document lowers the query's loss (it helps).
Token colours: <span style="background:rgba(37,99,235,.45)">helps</span><span style="background:rgba(234,88,12,.45)">hurts</span>
intensity ∝ |contribution| within each document; grey text is context (not a loss target); hover a token for its value.
A document's token contributions add up to its score.</p>
<div class="plots">{''.join(overview)}</div></section>
<section class="card" id="ledger"><h2>Data-value ledger</h2>
<p class="meta">Sums of influence over the {esc(summary.get('n_queries'))} queries ({esc(ledgers[0][1].attrs.get('basis', '') if ledgers else '')} basis);
means per (query, document) pair; top-k columns count the queries whose lists hold the document.</p>{ledger_html}</section>
{body}
</main>
<script>{_SCRIPT}</script>
</body></html>
"""


def md(value) -> str:
    """Escape a data string for Markdown (one line): HTML entities, table pipes, emphasis/link characters."""
    text = html.escape(displayable(str(value)), quote=False).replace("\n", " ").replace("\r", " ")
    return re.sub(r"([\\`*_\[\]#|])", r"\\\1", text)


def render_markdown(summary: dict, views: list[QueryView], ledgers: list[tuple[str, pd.DataFrame]],
                    plot_files: dict[str, str], notes: list[str], config: ReportConfig) -> str:
    """``report.md``: the same content as the HTML, without highlighting (document snippets instead)."""
    lines = ["# dataworth report", "",
             f"store {md(summary.get('store'))} · curvature {md(summary.get('curvature'))} · mode "
             f"{md(summary.get('mode'))} · {summary.get('n_queries')} queries × {summary.get('n_rows')} rows", ""]
    lines += [f"> note: {md(n)}" for n in notes]
    lines.append("")
    for name in ("spectra", "factors", "self_influence"):
        if name in plot_files:
            lines += [f"![{name}]({plot_files[name]})", ""]
    for title, table in ledgers:
        key = table.columns[0] if table.columns[0] != "train_row" else "train_id"
        lines += [f"## {md(title)}", "", f"| {key} | net_sum | positive_sum | negative_sum | top-k + | top-k − | docs |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for rec in table.head(20).itertuples(index=False):
            lines.append(f"| {md(getattr(rec, key))} | {_num(rec.net_sum)} | {_num(rec.positive_sum)} | "
                         f"{_num(rec.negative_sum)} | {rec.topk_positive} | {rec.topk_negative} | {rec.n_docs} |")
        if len(table) > 20:
            lines.append(f"| … {len(table) - 20} more (see the CSV) | | | | | | |")
        lines.append("")
    for view in views:
        lines += [f"## Query {view.index + 1}: {md(view.query_id)}", ""]
        lines.append("\n>\n".join(f"> **{md(label)}**: {md(truncate_text(text, 2000))}" for label, text in view.parts))
        if f"q{view.index}" in plot_files:
            lines += ["", f"![score distribution]({plot_files[f'q{view.index}']})"]
        for direction in ("positive", "negative"):
            table = signed_rows(view.rows[direction], direction)
            lines += ["", f"**{'Helps' if direction == 'positive' else 'Hurts'} most**", ""]
            if table.empty:
                lines.append(f"_{empty_reason(view.rows[direction], direction)}_")
                continue
            lines += ["| rank | train_id | score | text |", "|---:|---|---:|---|"]
            for rec in table.itertuples(index=False):
                doc = view.documents.get((direction, int(rec.rank)))
                snippet = truncate_text("".join(doc.token_texts), 160) if doc else "(text not available)"
                lines.append(f"| {rec.rank} | {md(rec.train_id)} | {float(rec.score):+.5g} | {md(snippet)} |")
        lines.append("")
    return "\n".join(lines) + "\n"
