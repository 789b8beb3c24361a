"""`dw.report`: ``report.md``, one self-contained ``report.html`` (+ the plots as PNG) from a scores directory.

Why a module of its own: an influence score is only believed once a person has read the documents behind
it. The report puts, for each query, its prompt and response next to the training documents that help it
most and hurt it most, each document's text highlighted by *where* in it the influence comes from, and the
data-value ledger (`dataworth.reports.ledger`) that sums the same scores per document and per data source.

Per-token highlighting is exact (docs/design.md, "Per-token attribution"): with ``p_q = (F + λI)⁻¹ ĝ_q``,

    s(q, n) = Σ_t c_t(q, n),   c_t(q, n) = Σ_m ⟨P_{q,m}, (P_out δ_t)(P_in x_t)ᵀ⟩   (``gradients.queries.token_contributions``)

recomputed (one forward and backward pass) only for the documents shown. For ``cosine`` scores each
``c_t`` is divided by ``‖p_q‖ ‖ĝ_n‖``, for ``relative`` by ``s(n, n)`` — the same denominators as the
score — so a document's token contributions always add up to the score printed beside it (up to the
store's storage precision: a float16 store rounds ``ĝ_n``, the recomputation does not).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from dataworth.data.encode import encode_rows
from dataworth.data.rows import load_rows
from dataworth.errors import InputError
from dataworth.gradients.queries import query_gradients, token_contributions
from dataworth.influence.curvature import load_curvature, load_kfac_factors
from dataworth.influence.score import load_store_model
from dataworth.influence.scores import load_scores, open_scores_store
from dataworth.reports.ledger import training_rows, value_ledger
from dataworth.reports.plots import (
    ScoreDistributionPlotter,
    module_spectra,
    plot_factors,
    plot_self_influence,
    plot_spectra,
)
from dataworth.reports.render import (
    DEFAULT_MAX_DISPLAY_TOKENS,
    DEFAULT_MAX_TEXT_CHARS,
    QueryView,
    ReportConfig,
    ShownDocument,
    displayable,
    render_html,
    render_markdown,
)
from dataworth.store.format import KFAC_FILE
from dataworth.util import write_bytes_atomic


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


def mode_denominators(mode: str, curvature, preconditioned64: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
    """``[Q, B]`` divisors turning dot-product contributions into the score's mode (``dataworth.influence.scores``):
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
        write_bytes_atomic(target, png)
        plot_files[name] = f"plots/{name}.png"
    for view in views:
        if view.plot:
            name = f"scores_q{view.index:04d}"
            write_bytes_atomic(plots_dir / f"{name}.png", view.plot)
            plot_files[f"q{view.index}"] = f"plots/{name}.png"

    ledgers = [("Documents by net influence", value_ledger(scores, store=store, out=out))]
    if by is not None:  # the scores loaded (and checked) above: their files are hashed once per report
        ledgers.append((f"By {by}", value_ledger(scores, by, store=store, data=data, out=out)))
    if ledgers[0][1].attrs.get("basis") == "topk":
        notes.append("ledger sums cover only the stored top-k entries (run `dataworth score --full` for exact sums)")
    summary = {**summary, "report_seconds": round(time.perf_counter() - started, 1)}
    write_bytes_atomic(out / "report.md", render_markdown(summary, views, ledgers, plot_files, notes, config).encode("utf-8"))
    html_path = out / "report.html"
    write_bytes_atomic(html_path, render_html(summary, views, ledgers, plots, notes, config).encode("utf-8"))
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
    needed: dict[int, list[int]] = {}
    for view in views:
        for d in ("positive", "negative"):
            for row in view.rows[d]["train_row"]:
                needed.setdefault(int(row), [])
                if view.index not in needed[int(row)]:
                    needed[int(row)].append(view.index)
    if not needed:
        return
    loaded = load_store_model(store, model, config.device)
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
    if not store.has(KFAC_FILE):
        if layer is not None:
            raise InputError(f"--layer {layer}: the store {store.path} has no KFAC factors to draw")
        return None
    return select_layer([m.name for m in store.modules], layer)


def _make_plots(scores, views: list[QueryView], store, summary: dict, layer: str | None,
                notes: list[str]) -> tuple[dict[str, bytes], dict[str, str]]:
    """The overview plots (spectra, factor heatmaps, self-influence) and each view's score distribution."""
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
