"""The data-value ledger: what each training document — and each data source — is worth over a query set.

Why a module of its own: the question in LoGra's title ("What is your data worth to GPT?") is asked per
*data provider* as often as per document. The ledger turns a scores directory (``dataworth.influence.scores``) into one
row per training document, or per value of any metadata field of the training rows (``source``, ``task``,
``person``, …), with the same columns either way, so it can be read as a CSV/parquet or as a report section.

For ``Q`` queries, training rows ``n`` and scores ``s(q, n)`` (sign convention of ``dataworth.influence.scores``:
positive = the row helps the query):

    positive_sum(n) = Σ_q max(s(q, n), 0)        negative_sum(n) = Σ_q min(s(q, n), 0)
    net_sum(n)      = Σ_q s(q, n)                 (= positive_sum + negative_sum)
    *_mean(n)       = *_sum(n) / Q
    topk_positive(n) / topk_negative(n) = number of queries whose positive / negative top-k lists hold n

A group ``G`` of documents (``by=FIELD``) adds its documents' sums and counts; its means are per
(query, document) pair: ``*_mean(G) = *_sum(G) / (Q · |G|)``, so a document is a group of one.

Basis: with the full ``[Q, N]`` matrix (``dataworth score --full``) the sums run over every query; without
it only the stored top-k entries are known, so the sums run over those (``basis = "topk"``, recorded in
``DataFrame.attrs`` and printed): a lower bound in magnitude for each sign. A row that is in both the
positive and the negative top-k of one query (possible when ``2k > N``) is counted once in the sums.
Documents that never appear are listed with zeros — never dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from dataworth.data.rows import load_rows
from dataworth.errors import InputError
from dataworth.influence.scores import Scores, load_scores, open_scores_store
from dataworth.util import atomic_write

MISSING = "<missing>"
LEDGER_COLUMNS = ["n_docs", "positive_sum", "positive_mean", "negative_sum", "negative_mean", "net_sum", "net_mean",
                  "topk_positive", "topk_negative"]
QUERY_BLOCK = 256


def document_sums_from_matrix(matrix: np.ndarray, block: int = QUERY_BLOCK) -> dict[str, np.ndarray]:
    """``positive_sum``, ``negative_sum``, ``net_sum`` ``[N]`` float64 of a ``[Q, N]`` score matrix.

    Streams blocks of query rows (contiguous in a C-order memmap), so memory is ``O(block · N)``.
    """
    n = matrix.shape[1]
    pos, neg = np.zeros(n), np.zeros(n)
    for start in range(0, matrix.shape[0], block):
        part = np.asarray(matrix[start : start + block], dtype=np.float64)
        pos += np.where(part > 0, part, 0.0).sum(axis=0)
        neg += np.where(part < 0, part, 0.0).sum(axis=0)
    return {"positive_sum": pos, "negative_sum": neg, "net_sum": pos + neg}


def document_sums_from_topk(table: pd.DataFrame, n_rows: int) -> dict[str, np.ndarray]:
    """The same sums from a top-k table only (each (query, row) pair counted once): ``[N]`` float64 each."""
    pairs = table.drop_duplicates(["query_id", "train_row"])
    rows = pairs["train_row"].to_numpy(dtype=np.int64)
    scores = pairs["score"].to_numpy(dtype=np.float64)
    pos = np.bincount(rows, weights=np.where(scores > 0, scores, 0.0), minlength=n_rows)
    neg = np.bincount(rows, weights=np.where(scores < 0, scores, 0.0), minlength=n_rows)
    return {"positive_sum": pos, "negative_sum": neg, "net_sum": pos + neg}


def topk_counts(table: pd.DataFrame, n_rows: int) -> dict[str, np.ndarray]:
    """``topk_positive`` / ``topk_negative`` ``[N]`` int64: in how many queries' top-k lists each row is."""
    out = {}
    for direction in ("positive", "negative"):
        part = table[table["direction"] == direction].drop_duplicates(["query_id", "train_row"])
        out[f"topk_{direction}"] = np.bincount(part["train_row"].to_numpy(dtype=np.int64), minlength=n_rows)
    return out


def document_ledger(sums: dict[str, np.ndarray], counts: dict[str, np.ndarray], train_ids: Sequence[str],
                    n_queries: int) -> pd.DataFrame:
    """One row per training document (``train_row``, ``train_id`` + ``LEDGER_COLUMNS``), by ``net_sum`` descending
    (ties by row order)."""
    n = len(train_ids)
    table = pd.DataFrame({"train_row": np.arange(n, dtype=np.int64), "train_id": list(train_ids),
                          "n_docs": np.ones(n, dtype=np.int64), **sums, **counts})
    return _finish(table, n_queries)


def group_ledger(documents: pd.DataFrame, keys: Sequence[str], field: str, n_queries: int) -> pd.DataFrame:
    """Aggregate a document ledger by ``keys`` (one key per document, in ``train_row`` order) → one row per
    distinct key (column ``field``): sums and counts added, means per (query, document) pair."""
    by_row = documents.sort_values("train_row")
    frame = pd.DataFrame({field: list(keys), "n_docs": 1, **{c: by_row[c].to_numpy() for c in
                                                          ("positive_sum", "negative_sum", "net_sum",
                                                           "topk_positive", "topk_negative")}})
    grouped = frame.groupby(field, sort=False, dropna=False).sum().reset_index()
    return _finish(grouped, n_queries)


def _finish(table: pd.DataFrame, n_queries: int) -> pd.DataFrame:
    pairs = np.maximum(table["n_docs"].to_numpy(dtype=np.float64) * n_queries, 1.0)
    for name in ("positive", "negative", "net"):
        table[f"{name}_mean"] = table[f"{name}_sum"].to_numpy(dtype=np.float64) / pairs
    key_columns = [c for c in table.columns if c not in LEDGER_COLUMNS]
    table = table[key_columns + LEDGER_COLUMNS]
    return table.sort_values("net_sum", ascending=False, kind="stable").reset_index(drop=True)


def field_value(value) -> str:
    """A metadata value as a group key: strings as they are, other JSON values as compact sorted JSON."""
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def group_keys(train_ids: Sequence[str], rows_by_id: dict, field: str) -> list[str]:
    """The ``field`` value of each training row (``MISSING`` where a row lacks it or is not in the data).

    ``field="file"``, when no row has a ``file`` field, is the file (or dataset) a row came from, i.e.
    ``Row.source`` without its ``:line`` / ``#index`` suffix. InputError when no row has ``field`` at all.
    """
    rows = [rows_by_id.get(str(i)) for i in train_ids]
    present = [r for r in rows if r is not None]
    has_field = any(field in r.data for r in present)
    if not has_field and field == "file":
        return [MISSING if r is None else _source_file(r.source) for r in rows]
    if not has_field:
        seen = sorted({k for r in present[:1000] for k in r.data})
        raise InputError(f"--by {field}: no training row has field {field!r} "
                         f"(fields seen: {', '.join(seen) or 'none'}; 'file' groups by the file a row came from)")
    return [MISSING if r is None else field_value(r.data.get(field)) for r in rows]


def _source_file(source: str) -> str:
    if "#" in source:
        return source.rsplit("#", 1)[0]
    head, _, tail = source.rpartition(":")
    return head if head and tail.isdigit() else source


def value_ledger(scores_dir, by: str | None = None, *, store=None, data: str | None = None,
                 out: str | os.PathLike | None = None) -> pd.DataFrame:
    """``dw.value_ledger``: the worth of every training document (or of every value of field ``by``).

    ``scores_dir``: a directory written by ``dataworth score`` (or its `Scores`, already loaded). ``store``: the
    gradient store (an open Store or a path; default: the one recorded in the scores' summary) — needed for
    the row ids, so documents never in any top-k are listed too; it must be the store that was scored
    (`open_scores_store`). ``data``: the training data spec (default: the store's recorded one), read
    only when ``by`` is given. ``out``: also write ``value.csv`` / ``value.parquet`` (``value_by_{by}.*``)
    there. Columns and formulas: see the module docstring; ``attrs`` holds ``basis`` ("full" or "topk"),
    ``n_queries``, ``n_rows`` and ``by``.
    """
    scores = scores_dir if isinstance(scores_dir, Scores) else load_scores(scores_dir)
    scores_dir = scores.directory or "memory"
    store = open_scores_store(scores, store)
    table = scores.to_pandas()
    n_rows, n_queries = store.rows, len(scores.query_ids)
    if n_rows != scores.summary.get("n_rows", n_rows):
        raise InputError(f"--store {store.path}: has {n_rows} rows but the scores in {scores_dir} were computed "
                         f"on {scores.summary.get('n_rows')} rows; pass the store they were scored against")
    if scores.matrix is not None:
        if scores.matrix.shape != (n_queries, n_rows):
            raise InputError(f"{Path(scores_dir) / 'scores.npy'}: shape {scores.matrix.shape}, expected "
                             f"({n_queries}, {n_rows}); re-run `dataworth score --full`")
        sums, basis = document_sums_from_matrix(scores.matrix), "full"
    else:
        sums, basis = document_sums_from_topk(table, n_rows), "topk"
    train_ids = [str(i) for i in store.ids]
    ledger = document_ledger(sums, topk_counts(table, n_rows), train_ids, n_queries)
    if by is not None:
        if by in LEDGER_COLUMNS or by in ("train_row", "train_id"):
            raise InputError(f"--by {by}: that name is a ledger column; group by a metadata field of the training rows")
        rows_by_id = {r.id: r for r in training_rows(store, data)}
        ledger = group_ledger(ledger, group_keys(train_ids, rows_by_id, by), by, n_queries)
    ledger.attrs.update({"basis": basis, "n_queries": n_queries, "n_rows": n_rows, "by": by})
    if out is not None:
        save_ledger(ledger, out, by)
    return ledger


def training_rows(store, data: str | None = None) -> list:
    """The training rows of ``store`` re-read from ``data`` (default: the spec recorded at extraction).

    Bad rows are skipped (they were never in the store either); a missing spec → InputError.
    """
    spec = data or store.manifest.get("data", {}).get("spec") or store.manifest.get("config", {}).get("data")
    if not spec:
        raise InputError(f"{store.path}/manifest.json: no recorded data spec; pass --data")
    return load_rows(str(spec), skip_bad=True)


def ledger_name(by: str | None) -> str:
    """File stem of a saved ledger: ``value`` or ``value_by_{field}`` (field made file-name safe)."""
    if by is None:
        return "value"
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in by)
    return f"value_by_{safe}"


def save_ledger(ledger: pd.DataFrame, out_dir, by: str | None = None) -> tuple[Path, Path]:
    """Write ``{stem}.csv`` and ``{stem}.parquet`` into ``out_dir`` atomically; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = ledger_name(by)
    paths = (out / f"{stem}.csv", out / f"{stem}.parquet")
    plain = pd.DataFrame(ledger)
    plain.attrs = {}
    atomic_write(paths[0], lambda p: plain.to_csv(p, index=False))
    atomic_write(paths[1], lambda p: plain.to_parquet(p, index=False))
    return paths
