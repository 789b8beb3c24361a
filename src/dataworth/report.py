"""Reports from a scores directory: ``report.md`` and one self-contained ``report.html`` (+ the plots as PNG).

Why a module of its own: an influence score is only believed once a person has read the documents behind
it. The report puts, for each query, its prompt and response next to the training documents that help it
most and hurt it most, each document's text highlighted by *where* in it the influence comes from, and the
data-value ledger (``dataworth.ledger``) that sums the same scores per document and per data source.

Per-token highlighting is exact (DESIGN.md, "Per-token attribution"): with ``p_q = (F + λI)⁻¹ ĝ_q``,

    s(q, n) = Σ_t c_t(q, n),   c_t(q, n) = Σ_m ⟨P_{q,m}, (P_out δ_t)(P_in x_t)ᵀ⟩     (``extract.token_contributions``)

recomputed (one forward and backward pass) only for the documents shown. For ``cosine`` scores each
``c_t`` is divided by ``‖p_q‖ ‖ĝ_n‖``, for ``relative`` by ``s(n, n)`` — the same denominators as the
score — so a document's token contributions always add up to the score printed beside it (up to the
store's storage precision: a float16 store rounds ``ĝ_n``, the recomputation does not).

Safety: every string that comes from data (texts, ids, field values, file names) goes through
``html.escape`` before it reaches the page; the page carries a Content-Security-Policy that allows only
its own script (by hash), inline styles and ``data:`` images, so even a missed escape could not run code
or fetch anything. No data reaches the script: search works on the page's text.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from dataworth.errors import InputError

DEFAULT_MAX_DISPLAY_TOKENS = 1500
DEFAULT_MAX_TEXT_CHARS = 20_000
POSITIVE_RGB = (37, 99, 235)  # blue: the document helps the query
NEGATIVE_RGB = (234, 88, 12)  # orange: the document hurts the query
MAX_ALPHA = 0.75
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


# ---------------------------------------------------------------------------------------------------------
# Configuration and the shown documents


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
    row: object = None  # the query's dataworth.data.Row


# ---------------------------------------------------------------------------------------------------------
# Text handling (pure)


def displayable(text: str) -> str:
    """``text`` made safe to encode and show: lone surrogates → U+FFFD, control characters other than tab and
    newline → a visible ``\\xNN``. (Not HTML escaping: that is :func:`esc`.)"""
    text = _SURROGATE.sub("\ufffd", text)
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def esc(value) -> str:
    """HTML-escape any value for text or a double-quoted attribute (``& < > " '``), after :func:`displayable`."""
    return html.escape(displayable(str(value)), quote=True)


def truncate_text(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with a marker saying how many were left out; unchanged if short."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n… [truncated for display: {len(text) - limit} more characters]"


def token_texts(tokenizer, ids: Sequence[int], context: int = 8) -> list[str]:
    """The text each token adds, so that ``"".join(token_texts(ids)) == decode(ids)`` for usual tokenizers.

    Incremental decoding: token ``i``'s text is ``decode(ids[s:i+1])`` minus ``decode(ids[s:p])`` with ``p`` the
    first token not yet shown and ``s = p - context`` (decoders that drop a leading space need the context).
    A token that ends inside a multi-byte character (byte-level BPE) decodes to U+FFFD; it gets ``""`` and
    the character goes to the token that completes it. ``O(T · context)`` decoding, not ``O(T²)``.
    """
    ids = [int(i) for i in ids]

    def decode(part: Sequence[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    out: list[str] = []
    pending = 0
    for i in range(len(ids)):
        start = max(0, pending - context)
        before = decode(ids[start:pending]) if pending > start else ""
        now = decode(ids[start : i + 1])
        if now.endswith("\ufffd") and i + 1 < len(ids) and i + 1 - pending < 4:
            out.append("")
            continue
        out.append(now[len(before):] if now.startswith(before) else decode(ids[pending : i + 1]))
        pending = i + 1
    return out


def row_parts(row) -> list[tuple[str, str]]:
    """A row as labelled text parts: ``[("text", …)]``, ``[("prompt", …), ("response", …)]`` or one part per
    message (labelled by role)."""
    if row.kind == "text":
        return [("text", row.text)]
    if row.kind == "prompt_response":
        return [("prompt", row.prompt), ("response", row.response)]
    return [(m["role"], m["content"]) for m in row.messages]


def token_colour(contribution: float, scale: float) -> str:
    """CSS background for a contribution: blue (helps) or orange (hurts), opacity ``0.75 · |c| / scale``."""
    if scale <= 0 or contribution == 0 or not math.isfinite(contribution):
        return "transparent"
    r, g, b = POSITIVE_RGB if contribution > 0 else NEGATIVE_RGB
    alpha = MAX_ALPHA * min(abs(contribution) / scale, 1.0)
    return f"rgba({r},{g},{b},{alpha:.3f})"


# ---------------------------------------------------------------------------------------------------------
# Per-token contributions for the shown documents


def mode_denominators(mode: str, curvature, preconditioned64: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
    """``[Q, B]`` divisors turning dot-product contributions into the score's mode (``dataworth.scoring``):
    1 for dot, ``‖p_q‖ ‖ĝ_n‖`` for cosine, ``s(n, n)`` for relative; 0 where the score is defined as 0."""
    q, b = preconditioned64.shape[0], train_rows.shape[0]
    if mode == "dot":
        return np.ones((q, b))
    rows = np.asarray(train_rows, dtype=np.float64)
    if mode == "cosine":
        return np.outer(np.linalg.norm(preconditioned64, axis=1), np.linalg.norm(rows, axis=1))
    if mode == "relative":
        self_inf = np.einsum("bd,bd->b", curvature.precondition64(rows), rows)
        return np.broadcast_to(self_inf, (q, b)).copy()
    raise InputError(f"scores summary.json: field 'mode' is {mode!r}, not one of dot, cosine, relative")


def shown_contributions(store, loaded, encoded_by_row: dict[int, object], needed: dict[int, list[int]],
                        preconditioned64: np.ndarray, mode: str, curvature) -> dict[tuple[int, int], np.ndarray]:
    """``{(query_index, train_row): [T] contributions}`` for the (query, document) pairs in ``needed``
    (train_row → query indices). One forward/backward per document (hooks and projections set up once for
    all of them), contracted against only the queries that show it (``O(Q' · T · D)``): a document shown for
    2 of 240 queries does not pay for 240, and memory stays ``O(Q' · T)``."""
    from dataworth.extract import token_contributions

    out: dict[tuple[int, int], np.ndarray] = {}
    rows = sorted(needed)
    query_lists = [sorted(needed[r]) for r in rows]
    contribs = token_contributions(store, loaded.model, loaded.tokenizer, [encoded_by_row[r] for r in rows],
                                   [preconditioned64[qs].astype(np.float32) for qs in query_lists])
    for r, queries, contrib in zip(rows, query_lists, contribs):
        denom = mode_denominators(mode, curvature, preconditioned64[queries], store.read_rows(r, r + 1))[:, 0]
        for i, q in enumerate(queries):
            values = np.asarray(contrib[i], dtype=np.float64)
            out[(q, r)] = values / denom[i] if denom[i] > 0 else np.zeros_like(values)
    return out


# ---------------------------------------------------------------------------------------------------------
# Plots (matplotlib, PNG bytes)


def _png(fig, tight: bool = False) -> bytes:
    """PNG bytes of a figure (no timestamp/software metadata). ``tight`` crops to the drawn area (slower: it
    draws twice), used only where colour bars make fixed margins awkward."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None}, pil_kwargs={"compress_level": 3},
                **({"bbox_inches": "tight"} if tight else {}))
    return buf.getvalue()


class ScoreDistributionPlotter:
    """Per-query score histograms drawn on one reused figure (a report may hold thousands of queries; creating
    a figure per query costs more than drawing it)."""

    def __init__(self) -> None:
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=(5.6, 2.1))
        self.fig.subplots_adjust(left=0.11, right=0.98, bottom=0.26, top=0.88)
        self.ax = self.fig.subplots()

    def __call__(self, scores: np.ndarray, shown: pd.DataFrame, full: bool, title: str) -> bytes:
        """Histogram of one query's scores (all N rows when ``full``, else its top-k rows), shown rows marked
        (blue: helps, orange: hurts), zero marked black."""
        ax = self.ax
        ax.cla()
        values = np.asarray(scores, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            counts, edges = np.histogram(values, bins=min(60, max(10, values.size // 4)))
            ax.stairs(counts, edges, fill=True, color="#94a3b8")
        transform = ax.get_xaxis_transform()
        for direction, colour in (("positive", "#2563eb"), ("negative", "#ea580c")):
            marks = shown.loc[shown["direction"] == direction, "score"].to_numpy(dtype=np.float64)
            if marks.size:
                ax.vlines(marks, 0, 1, transform=transform, colors=colour, lw=0.8, alpha=0.7)
        ax.axvline(0.0, color="black", lw=0.6)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("influence score" + ("" if full else " (top-k rows only; score --full for all)"), fontsize=8)
        ax.set_ylabel("rows", fontsize=8)
        ax.tick_params(labelsize=7)
        return _png(self.fig)


def plot_score_distribution(scores: np.ndarray, shown: pd.DataFrame, full: bool, title: str) -> bytes:
    """One query's score histogram as PNG bytes (see :class:`ScoreDistributionPlotter`)."""
    return ScoreDistributionPlotter()(scores, shown, full, title)


def plot_spectra(spectra: dict[str, np.ndarray], title: str) -> bytes:
    """Per-module eigenvalues, sorted descending, on a log scale (zeros are left out of the log axis)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.2))
    fig.subplots_adjust(left=0.11, right=0.98, bottom=0.15, top=0.9)
    ax = fig.subplots()
    for name, values in spectra.items():
        values = np.sort(np.asarray(values, dtype=np.float64).ravel())[::-1]
        values = values[values > 0]
        if values.size:
            ax.plot(np.arange(1, values.size + 1), values, lw=1, label=name)
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("eigenvalue index", fontsize=8)
    ax.set_ylabel("eigenvalue", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    if 0 < len(spectra) <= 12:
        ax.legend(fontsize=6, frameon=False)
    return _png(fig)


def plot_factors(module: str, a: np.ndarray, s: np.ndarray) -> bytes:
    """Heatmaps of one module's activation factor ``A`` and gradient factor ``S`` (diverging, centred at 0)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.0, 3.0))
    axes = fig.subplots(1, 2)
    for ax, matrix, name in ((axes[0], a, "A = E[(P_in x)(P_in x)ᵀ]"), (axes[1], s, "S = E[(P_out δ)(P_out δ)ᵀ]")):
        bound = float(np.max(np.abs(matrix))) or 1.0
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
        ax.set_title(f"{name}  {matrix.shape[0]}×{matrix.shape[1]}", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.tick_params(labelsize=6)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.suptitle(module, fontsize=9)
    return _png(fig, tight=True)


def plot_self_influence(values: np.ndarray) -> bytes:
    """Histogram of ``log10 s(n, n)`` over the rows with positive self-influence (zeros counted in the title)."""
    from matplotlib.figure import Figure

    values = np.asarray(values, dtype=np.float64)
    positive = values[values > 0]
    fig = Figure(figsize=(5.6, 2.3))
    fig.subplots_adjust(left=0.11, right=0.98, bottom=0.22, top=0.88)
    ax = fig.subplots()
    if positive.size:
        ax.hist(np.log10(positive), bins=min(60, max(10, positive.size // 4)), color="#64748b")
    ax.set_xlabel("log10 self-influence s(n, n)", fontsize=8)
    ax.set_ylabel("rows", fontsize=8)
    ax.set_title(f"self-influence of {values.size} rows ({values.size - positive.size} zero)", fontsize=8)
    ax.tick_params(labelsize=7)
    return _png(fig)


def module_spectra(store, kind: str) -> tuple[str, dict[str, np.ndarray]] | None:
    """``(title, {module: eigenvalues})`` of the curvature the scores used; for ``none``, of the KFAC factors
    when the store has them; None when there is nothing to show."""
    from dataworth.curvature import KFAC_FACTORS, load_curvature, load_kfac_factors

    if kind != "none":
        curvature = load_curvature(store, kind)
        return (f"{kind} curvature eigenvalues per module (log scale)",
                {m.name: m.eigvals for m in curvature.modules if m.eigvals is not None})
    if store.has(KFAC_FACTORS):
        spectra = {}
        for name, (s, a) in load_kfac_factors(store).items():
            spectra[name] = np.outer(np.linalg.eigvalsh(s), np.linalg.eigvalsh(a))
        return "KFAC (S ⊗ A) eigenvalues per module (the scores used no curvature)", spectra
    return None


def select_layer(names: Sequence[str], layer: str | int | None) -> str:
    """The module named by ``layer``: an exact name, an index, or a substring matching one module."""
    if not names:
        raise InputError("--layer: the store has no modules with KFAC factors")
    if layer is None:
        return names[0]
    text = str(layer)
    if text in names:
        return text
    if re.fullmatch(r"-?\d+", text):
        index = int(text)
        if -len(names) <= index < len(names):
            return names[index]
        raise InputError(f"--layer {text}: index out of range; the store has {len(names)} modules (0..{len(names) - 1})")
    matches = [n for n in names if text in n]
    if len(matches) == 1:
        return matches[0]
    listed = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
    what = "matches several modules" if matches else "matches no module"
    raise InputError(f"--layer {text}: {what}; give an exact name or index (modules: {listed})")


# ---------------------------------------------------------------------------------------------------------
# HTML


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


# ---------------------------------------------------------------------------------------------------------
# Markdown


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


# ---------------------------------------------------------------------------------------------------------
# The entry point


def report(scores_dir, out_dir, store=None, model=None, top_k: int | None = None, layer: str | int | None = None,
           *, by: str | None = None, queries: str | None = None, data: str | None = None,
           max_display_tokens: int = DEFAULT_MAX_DISPLAY_TOKENS, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
           device: str = "cpu") -> Path:
    """``dw.report``: write ``report.md``, ``report.html`` (self-contained), ``plots/*.png`` and the value ledger
    (``value.csv``/``value.parquet``) for the scores in ``scores_dir`` into ``out_dir``; return report.html's path.

    ``store`` / ``model`` / ``queries`` / ``data``: override the paths recorded at scoring/extraction time (the
    defaults re-read exactly what was scored). ``top_k``: documents shown per query and direction (default:
    all that were kept). ``layer``: the module whose KFAC factors are drawn. ``by``: add a ledger grouped by
    that metadata field. Stale inputs — a model with another fingerprint, training rows whose tokens changed
    since extraction, queries missing from the query data — are InputErrors, not silently wrong pictures.
    """
    config = ReportConfig(top_k=top_k, layer=layer, max_display_tokens=max_display_tokens,
                          max_text_chars=max_text_chars, by=by, device=device)
    _check_config(config)
    from dataworth.curvature import load_curvature
    from dataworth.ledger import open_scores_store, value_ledger
    from dataworth.scoring import load_scores

    started = time.perf_counter()
    scores = load_scores(scores_dir)
    summary = scores.summary
    store = open_scores_store(scores, store)
    if store.rows != summary.get("n_rows"):
        raise InputError(f"--store {store.path}: has {store.rows} rows but the scores were computed on "
                         f"{summary.get('n_rows')}; pass the store they were scored against")
    factor_layer = _factor_layer(store, config.layer)
    notes = list(summary.get("notes", []))
    kept = int(summary.get("top_k", 0))
    k = kept if config.top_k is None else min(config.top_k, kept)
    if config.top_k is not None and config.top_k > kept:
        notes.append(f"--top-k {config.top_k}: the scores keep only {kept} per direction; showing {kept}")
    table = scores.to_pandas()
    shown = table[table["rank"] <= k]
    views = _query_views(scores, shown, queries)
    missing = [v.query_id for v in views if v.rows["positive"].empty and v.rows["negative"].empty]
    if missing:
        notes.append(f"{len(missing)} quer{'y has' if len(missing) == 1 else 'ies have'} no scored training rows: "
                     + ", ".join(missing[:5]))
    curvature = load_curvature(store, summary.get("curvature", "none"))
    _attach_documents(views, store, model, data, summary, curvature, config)

    out = Path(out_dir)
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots, plot_files = _make_plots(scores, views, store, summary, factor_layer, notes)
    for name, png in plots.items():
        target = plots_dir / f"{name}.png"
        _atomic_bytes(target, png)
        plot_files[name] = f"plots/{name}.png"
    for view in views:
        if view.plot:
            name = f"scores_q{view.index:04d}"
            _atomic_bytes(plots_dir / f"{name}.png", view.plot)
            plot_files[f"q{view.index}"] = f"plots/{name}.png"

    ledgers = [("Documents by net influence", value_ledger(scores_dir, store=store, out=out))]
    if by is not None:
        ledgers.append((f"By {by}", value_ledger(scores_dir, by, store=store, data=data, out=out)))
    if ledgers[0][1].attrs.get("basis") == "topk":
        notes.append("ledger sums cover only the stored top-k entries (run `dataworth score --full` for exact sums)")
    summary = {**summary, "report_seconds": round(time.perf_counter() - started, 1)}
    _atomic_bytes(out / "report.md", render_markdown(summary, views, ledgers, plot_files, notes, config).encode("utf-8"))
    html_path = out / "report.html"
    _atomic_bytes(html_path, render_html(summary, views, ledgers, plots, notes, config).encode("utf-8"))
    return html_path


def _check_config(config: ReportConfig) -> None:
    if config.top_k is not None and config.top_k < 1:
        raise InputError(f"--top-k: must be >= 1, got {config.top_k}")
    if config.max_display_tokens < 1:
        raise InputError(f"--max-display-tokens: must be >= 1, got {config.max_display_tokens}")
    if config.max_text_chars < 1:
        raise InputError(f"--max-text-chars: must be >= 1, got {config.max_text_chars}")


def _query_views(scores, shown: pd.DataFrame, queries: str | None) -> list[QueryView]:
    """A view per scored query, with its text from the query data (InputError if a query id is not there)."""
    from dataworth.data import load_rows

    spec = queries or scores.summary.get("queries")
    if not isinstance(spec, str) or not spec or (re.fullmatch(r"\d+ rows", spec) and not Path(spec).exists()):
        raise InputError("scores summary.json: field 'queries' names no query file (queries were passed in "
                         "memory); pass --queries with the query data that was scored")
    rows = {r.id: r for r in load_rows(spec)}
    views = []
    for i, qid in enumerate(scores.query_ids):
        if qid not in rows:
            raise InputError(f"--queries {spec}: query id {qid!r} (scored) is not in the query data; pass the "
                             "query data that was scored")
        part = shown[shown["query_id"] == qid]
        views.append(QueryView(i, qid, row_parts(rows[qid]),
                               {d: part[part["direction"] == d].sort_values("rank").reset_index(drop=True)
                                for d in ("positive", "negative")}, row=rows[qid]))
    return views


def _attach_documents(views: list[QueryView], store, model, data, summary: dict, curvature,
                      config: ReportConfig) -> None:
    """Re-encode the shown training rows and the queries, recompute the exact per-token contributions."""
    from dataworth.data import encode_rows
    from dataworth.extract import query_gradients
    from dataworth.ledger import training_rows
    from dataworth.scoring import _load_store_model

    needed: dict[int, list[int]] = {}
    for view in views:
        for d in ("positive", "negative"):
            for row in view.rows[d]["train_row"]:
                needed.setdefault(int(row), [])
                if view.index not in needed[int(row)]:
                    needed[int(row)].append(view.index)
    if not needed:
        return
    loaded = _load_store_model(store, model, config.device)
    expected = store.fingerprint
    if expected and loaded.fingerprint != expected:
        raise InputError(f"--model {loaded.spec}: fingerprint {loaded.fingerprint[:16]}… differs from the store's "
                         f"{expected[:16]}…; report with the model the store was extracted with")
    cfg = store.manifest.get("config", {})
    by_id = {r.id: r for r in training_rows(store, data)}
    train_ids = store.ids
    rows = {}
    for r in needed:
        if train_ids[r] not in by_id:
            raise InputError(f"training data: store row {r} (id {train_ids[r]!r}) is not in the data any more; "
                             "the data changed since extraction (pass --data with the extracted data)")
        rows[r] = by_id[train_ids[r]]
    order = sorted(rows)
    encoded, _ = encode_rows([rows[r] for r in order], loaded.tokenizer, max_length=cfg.get("max_length"),
                             chat=cfg.get("chat", "auto"))
    encoded_by_row = dict(zip(order, encoded))
    for r, e in encoded_by_row.items():
        if e.n_targets != int(store.tokens[r]):
            raise InputError(f"{rows[r].source}: row {e.id!r} now has {e.n_targets} target tokens, the store recorded "
                             f"{int(store.tokens[r])}; the data changed since extraction")
    query_rows = query_gradients(store, loaded.model, loaded.tokenizer, [v.row for v in views])
    preconditioned64 = curvature.precondition64(query_rows)
    contributions = shown_contributions(store, loaded, encoded_by_row, needed, preconditioned64,
                                        summary.get("mode", "dot"), curvature)
    special_ids = set(getattr(loaded.tokenizer, "all_special_ids", []) or [])
    texts = {r: token_texts(loaded.tokenizer, e.input_ids) for r, e in encoded_by_row.items()}
    for view in views:
        for d in ("positive", "negative"):
            for rec in view.rows[d].itertuples(index=False):
                r = int(rec.train_row)
                e = encoded_by_row[r]
                view.documents[(d, int(rec.rank))] = ShownDocument(
                    train_row=r, train_id=str(rec.train_id), source=rows[r].source, kind=rows[r].kind,
                    token_texts=texts[r], contributions=contributions[(view.index, r)],
                    targets=[bool(m) for m in e.loss_mask], special=[i in special_ids for i in e.input_ids],
                    truncated_at_extraction=bool(e.truncated))


def _factor_layer(store, layer: str | int | None) -> str | None:
    """The module whose KFAC factors are drawn (checked before any slow work); None without factors."""
    from dataworth.curvature import KFAC_FACTORS

    if not store.has(KFAC_FACTORS):
        if layer is not None:
            raise InputError(f"--layer {layer}: the store {store.path} has no KFAC factors to draw")
        return None
    return select_layer([m.name for m in store.modules], layer)


def _make_plots(scores, views: list[QueryView], store, summary: dict, layer: str | None,
                notes: list[str]) -> tuple[dict[str, bytes], dict[str, str]]:
    """The overview plots (spectra, factor heatmaps, self-influence) and each view's score distribution."""
    from dataworth.curvature import load_kfac_factors

    plots: dict[str, bytes] = {}
    table = scores.to_pandas()
    plot_scores = ScoreDistributionPlotter()
    for view in views:
        if scores.matrix is not None:
            values = np.asarray(scores.matrix[view.index])
        else:
            values = table.loc[table["query_id"] == view.query_id].drop_duplicates("train_row")["score"].to_numpy()
        shown = pd.concat([view.rows["positive"], view.rows["negative"]])
        view.plot = plot_scores(values, shown, scores.matrix is not None,
                                f"scores of query {displayable(view.query_id)[:60]}")
    spectra = module_spectra(store, summary.get("curvature", "none"))
    if spectra and spectra[1]:
        plots["spectra"] = plot_spectra(spectra[1], spectra[0])
    else:
        notes.append("no curvature spectra: the scores used none and the store has no KFAC factors")
    if layer is not None:
        s, a = load_kfac_factors(store)[layer]
        plots["factors"] = plot_factors(layer, a, s)
    else:
        notes.append("no factor heatmaps: the store has no KFAC factors (dense projection?)")
    if scores.self_influence is not None:
        plots["self_influence"] = plot_self_influence(scores.self_influence["self_influence"].to_numpy())
    return plots, {}


def _atomic_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
