"""Influence scores of every store row on every query: blocked streaming product, exact top-k, optional full matrix.

Why a module of its own: a store may hold millions of rows, so scoring must stream it in blocks with memory
that does not grow with the store, while still returning exact results (top-k with defined tie-breaking, and
the full ``Q × N`` matrix written block by block when asked).

The score (LoGra, Choe et al. 2024, "What is Your Data Worth to GPT?", eq. 2; Koh & Liang 2017) of training
row ``n`` for query ``q``::

    s(q, n) = ĝ_qᵀ (F + λI)⁻¹ ĝ_n            ĝ: projected gradient rows [D], F: fitted curvature

SIGN CONVENTION (used everywhere in dataworth): ``s(q, n) > 0`` means up-weighting training example ``n``
*lowers* the query's loss — ``n`` helps ``q``. The number approximates the first-order change
``−dL_q/dε_n`` of the query loss (summed over its target tokens) when example ``n``'s loss (summed over its
tokens) is up-weighted by ``ε`` in the training objective (up to the objective's positive normalisation,
e.g. ``1/N`` for a mean over examples). ``s(q, n) < 0``: ``n`` hurts ``q`` (opposes it).

Modes:
- ``dot``      ``s(q, n)`` as above.
- ``cosine``   ``cos(p_q, ĝ_n) = s(q, n) / (‖p_q‖ ‖ĝ_n‖)`` with ``p_q = (F + λI)⁻¹ ĝ_q`` the *preconditioned*
               query and ``ĝ_n`` the raw training row; lies in ``[-1, 1]``; ``0`` where a norm is 0.
- ``relative`` ``s(q, n) / s(n, n)`` with ``s(n, n) = ĝ_nᵀ (F + λI)⁻¹ ĝ_n`` the self-influence of ``n``
               (RelatIF, Barshan et al. 2020); ``0`` where ``s(n, n) = 0`` (a zero gradient row).

Top-k: for each query the ``K`` most positive and the ``K`` most negative rows, ties broken by row order
(lower store row first), ranks 1-based; exact (a streaming merge, not an approximation).

A scores directory describes exactly one run: `Scores.save` fills a staging sibling and swaps it in whole
(`dataworth.util.swap_directory`), ``summary.json`` records a ``run_id``, the SHA-256 and size of every
other file (``checksums``) and the store's digest (``store_digest``); each parquet file carries the run id
in its key-value metadata. `load_scores` reads only the files the summary lists and refuses one that does
not match it, naming the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dataworth.distributed import (
    SINGLE,
    DistContext,
    all_gather_objects,
    all_reduce_arrays,
    all_reduce_count,
    barrier,
    broadcast_object,
    iter_owned_blocks,
    merge_topk,
)
from dataworth.errors import InputError, one_line
from dataworth.influence.curvature import Curvature, check_memory_budget
from dataworth.store.format import RAW_DTYPES, TMP_FILE, raw_to_float32
from dataworth.store.reader import PREFETCH_OVERHEAD_BYTES, open_store
from dataworth.util import (
    atomic_write,
    file_record,
    say,
    staging_directory,
    swap_directory,
    verify_file,
    write_json_atomic,
)

SCORE_MODES = ("dot", "cosine", "relative")
DIRECTIONS = ("positive", "negative")
SCORES_FORMAT = "dataworth-scores"
SCORES_VERSION = 1
DEFAULT_BLOCK_ROWS = 4096
# Without --memory-budget, store blocks are also capped at this many MiB of buffers: 4096 rows of exact
# gradients of a 0.7 M-parameter GPT-2 are 6 GiB (two blocks are held while the next is read ahead).
# 128, like `influence.curvature.DEFAULT_FIT_BUDGET_MB` (measured there).
DEFAULT_SCORE_BUDGET_MB = 128
TOPK_COLUMNS = ["query_id", "direction", "rank", "train_id", "train_row", "score"]
SCORES_FILES = {"topk": "topk.parquet", "topk_jsonl": "topk.jsonl", "queries": "queries.parquet",
                "matrix": "scores.npy", "self_influence": "self_influence.parquet"}
SUMMARY_FILE = "summary.json"
RUN_ID_KEY = b"dataworth.run_id"  # parquet key-value metadata: the run a file belongs to
# Files that commands derive from a scores directory and may write into it (`value`, `report --out` there):
# replaced with the directory, since they describe the run being replaced.
DERIVED_FILE = re.compile(r"^(value(_by_[\w-]+)?\.(csv|parquet)|report\.(md|html))$")
_LEGACY_NOTED: set[str] = set()

# Rows widened to float32 at a time when scoring a float16 / bfloat16 store: 256 × D floats (4 MiB at
# D = 4096) stay in cache while they are multiplied, so the widened copy never travels to main memory and the
# store is read at half the bytes of float32 (measured: 2-3× faster than widening 4096-row blocks first).
SUB_BLOCK_ROWS = 256


def block_dots(preconditioned: np.ndarray, rows: np.ndarray, dtype: str = "float32", *,
               with_norms: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """``(P Bᵀ [Q, B] float32, ‖ĝ_n‖ [B] float64 or None)`` for queries ``P [Q, D]`` float32 and store rows
    ``B [B, D]`` as stored (``dtype``: float32, float16, or bfloat16 bits as uint16; see `Store.raw_rows`).

    Rows are taken `SUB_BLOCK_ROWS` at a time: float32 as they are (a memory-mapped shard is not copied) and
    multiplied by numpy; other dtypes widened exactly into one small buffer by torch and multiplied by torch
    while in cache. A row's score therefore depends only on the store's dtype, not on the block it came in.
    Row norms are float64 sums of the float32 rows.
    """
    n = rows.shape[0]
    products = np.empty((n, preconditioned.shape[0]), dtype=np.float32)
    norms = np.empty(n, dtype=np.float64) if with_norms else None
    queries = np.ascontiguousarray(preconditioned, dtype=np.float32)
    work = None if dtype == "float32" else np.empty((min(SUB_BLOCK_ROWS, n), rows.shape[1]), dtype=np.float32)
    for a in range(0, n, SUB_BLOCK_ROWS):
        b = min(a + SUB_BLOCK_ROWS, n)
        if work is None:
            block = rows[a:b]
            np.matmul(block, queries.T, out=products[a:b])
        else:
            block = raw_to_float32(rows[a:b], dtype, out=work[: b - a])
            _torch_matmul(block, queries, products[a:b])
        if norms is not None:
            norms[a:b] = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))  # float64 sums, no f64 copy
    return np.ascontiguousarray(products.T), norms


def _torch_matmul(block: np.ndarray, queries: np.ndarray, out: np.ndarray) -> None:
    """``out = block @ queries.T`` through torch. Used right after torch widened ``block``: handing the product
    to numpy's BLAS threads while torch's OpenMP threads still spin made it up to 50× slower on 2 cores."""
    import torch

    torch.mm(torch.from_numpy(block), torch.from_numpy(queries).T, out=torch.from_numpy(out))


def score_block(mode: str, preconditioned: np.ndarray, block: np.ndarray, query_norms: np.ndarray | None = None,
                self_influence: np.ndarray | None = None, dtype: str = "float32") -> np.ndarray:
    """Scores ``[Q, B]`` float32 of a block of store rows ``[B, D]`` against preconditioned queries ``[Q, D]``.

    ``dot``: ``P Bᵀ`` (float32 product). ``cosine``: divided by ``‖p_q‖`` (``query_norms [Q]``) and ``‖ĝ_n‖``.
    ``relative``: divided by ``s(n, n)`` (``self_influence [B]``). Division by a zero norm or self-influence
    gives 0 (the numerator is then 0 as well). ``block`` may be raw store rows of ``dtype`` (`block_dots`).
    """
    dots, row_norms = block_dots(preconditioned, block, dtype, with_norms=mode == "cosine")
    if mode == "dot":
        return dots
    if mode == "cosine":
        denom = np.outer(query_norms, row_norms)
    elif mode == "relative":
        denom = np.broadcast_to(self_influence, dots.shape)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    out = np.zeros(dots.shape, dtype=np.float64)
    np.divide(dots, denom, out=out, where=denom > 0)
    return out.astype(np.float32)


def self_influence_block(curvature: Curvature, block: np.ndarray) -> np.ndarray:
    """``s(n, n) = ĝ_nᵀ (F + λI)⁻¹ ĝ_n`` for a block ``[B, D]`` → ``[B]`` float64 (≥ 0, as ``F + λI`` is PD)."""
    return curvature.self_inner(block)


@dataclass
class StreamingTopK:
    """The ``k`` largest (``descending``) or smallest values per query seen so far, with their row indices.

    ``update(values [Q, B], first_row)`` merges a block whose columns are rows ``first_row … first_row+B-1``:
    the block's own best ``k`` (ties to the lower row) are selected by partition, then merged with the kept
    ``k``. Blocks must arrive in row order: the kept candidates then all precede the block's rows, so a
    *stable* sort of ``[kept | block best]`` orders ties by row index — exact top-k, ties broken by row order.
    Values must not be NaN (``score_rows`` checks). ``allow_gaps``: rows may be skipped (a rank sees only
    its own shards) as long as they increase — the argument above still holds.
    """

    n_queries: int
    k: int
    descending: bool
    allow_gaps: bool = False
    values: np.ndarray | None = None
    rows: np.ndarray | None = None
    next_row: int = 0

    def __post_init__(self) -> None:
        self.values = np.empty((self.n_queries, 0), dtype=np.float32)
        self.rows = np.empty((self.n_queries, 0), dtype=np.int64)

    def update(self, values: np.ndarray, first_row: int) -> None:
        if first_row < self.next_row or (first_row != self.next_row and not self.allow_gaps):
            raise ValueError(f"blocks out of order: expected row {self.next_row}, got {first_row}")
        n = values.shape[1]
        self.next_row = first_row + n
        values = values.astype(np.float32, copy=False)
        key = -values if self.descending else values
        cols = best_columns(key, self.k)
        candidates = np.concatenate([self.values, np.take_along_axis(values, cols, axis=1)], axis=1)
        rows = np.concatenate([self.rows, cols + first_row], axis=1)
        merge_key = -candidates if self.descending else candidates
        order = np.argsort(merge_key, axis=1, kind="stable")[:, : self.k]
        self.values = np.take_along_axis(candidates, order, axis=1)
        self.rows = np.take_along_axis(rows, order, axis=1)


def best_columns(key: np.ndarray, k: int) -> np.ndarray:
    """Column indices ``[Q, min(k, B)]``, ascending, of the ``k`` smallest ``key`` values per row of ``[Q, B]``,
    ties at the boundary going to the lower column — exact, in ``O(B)`` per row (``np.partition``) instead of
    a full sort. ``key`` must hold no NaN."""
    n_queries, n_cols = key.shape
    if k >= n_cols:
        return np.broadcast_to(np.arange(n_cols, dtype=np.int64), key.shape)
    kth = np.partition(key, k - 1, axis=1)[:, k - 1 : k]
    better = key < kth
    tied = key == kth
    room = k - better.sum(axis=1, keepdims=True)
    if (tied.sum(axis=1, keepdims=True) > room).any():  # ties straddle the boundary: lower columns first
        chosen = better | (tied & (np.cumsum(tied, axis=1) <= room))
    else:  # the usual case (distinct values): a cumulative count over the whole block is not needed
        chosen = better | tied
    return np.nonzero(chosen)[1].reshape(n_queries, k).astype(np.int64)


def top_k_reference(matrix: np.ndarray, k: int, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k of a full ``[Q, N]`` matrix: stable argsort (ties by column order) → (rows, values)."""
    key = -matrix if descending else matrix
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(matrix, order, axis=1)


@dataclass(eq=False)
class Scores:
    """Scores of a query set against a store.

    ``table``: the long top-k table (``query_id, direction, rank, train_id, train_row, score``), ranks
    1-based per (query, direction). ``matrix``: ``[Q, N]`` float32 (``np.ndarray`` or a read-only memmap of
    ``scores.npy``), or None unless the full matrix was asked for. ``self_influence``: table
    (``train_row, train_id, self_influence``) or None. ``summary``: what was run and how long it took.
    ``directory``: the scores directory it was saved to or loaded from, if any.
    """

    table: pd.DataFrame
    summary: dict
    query_ids: list[str]
    matrix: np.ndarray | None = None
    self_influence: pd.DataFrame | None = None
    directory: Path | None = None  # where the scores were saved or loaded from

    def top_k(self, query_id: str | None = None, direction: str = "positive") -> pd.DataFrame:
        """Top-k rows of one query (or all queries when ``query_id`` is None) in one direction, by rank."""
        if direction not in DIRECTIONS:
            raise InputError(f"direction: expected one of {', '.join(DIRECTIONS)}, got {direction!r}")
        table = self.table[self.table["direction"] == direction]
        if query_id is not None:
            if str(query_id) not in set(self.query_ids):
                raise InputError(f"query_id: {query_id!r} is not one of the {len(self.query_ids)} scored queries")
            table = table[table["query_id"] == str(query_id)]
        return table.reset_index(drop=True)

    def to_pandas(self) -> pd.DataFrame:
        """The long top-k table: ``query_id, direction, rank, train_id, train_row, score``."""
        return self.table.copy()

    def save(self, out_dir: str | os.PathLike, *, staging: str | os.PathLike | None = None) -> Path:
        """Replace ``out_dir`` by a directory holding exactly this run: ``topk.parquet``, ``topk.jsonl``,
        ``queries.parquet``, ``summary.json``, and ``scores.npy`` (when a matrix is held) /
        ``self_influence.parquet`` (when computed).

        The files go into ``staging`` (default: a new sibling, `prepare_scores_dir`), which is then swapped in
        whole, so no file of an earlier run survives and a reader sees the old run or the new one. A matrix
        memory-mapped from ``out_dir/scores.npy`` or from ``staging`` (written there by `score_rows`) is moved,
        not copied. ``out_dir`` must be new, empty or a scores directory (`check_scores_dir`).
        """
        out = Path(out_dir)
        staging = Path(staging) if staging is not None else prepare_scores_dir(out)
        try:
            self._write_run(staging, out)
            swap_directory(staging, out)
        except OSError as exc:  # name the file where the user asked for it, not its staging twin
            shutil.rmtree(staging, ignore_errors=True)
            name = str(exc.filename or "")
            if name.startswith(str(staging)):
                raise OSError(exc.errno, exc.strerror, str(out) + name[len(str(staging)):]) from exc
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.matrix is not None:
            self.matrix = np.load(out / SCORES_FILES["matrix"], mmap_mode="r")
        self.directory = out
        return out

    def _write_run(self, directory: Path, out: Path) -> None:
        """Every file of this run into ``directory``, each tagged with one new run id, and the summary last."""
        run_id = uuid.uuid4().hex
        files = {k: SCORES_FILES[k] for k in ("topk", "topk_jsonl", "queries")}
        _write_parquet(directory / files["topk"], self.table, run_id)
        atomic_write(directory / files["topk_jsonl"],
                     lambda p: self.table.to_json(p, orient="records", lines=True, force_ascii=False))
        queries = pd.DataFrame({"query_row": np.arange(len(self.query_ids)), "query_id": self.query_ids})
        _write_parquet(directory / files["queries"], queries, run_id)
        if self.matrix is not None:
            files["matrix"] = SCORES_FILES["matrix"]
            _place_matrix(self.matrix, directory / files["matrix"], out)
        if self.self_influence is not None:
            files["self_influence"] = SCORES_FILES["self_influence"]
            _write_parquet(directory / files["self_influence"], self.self_influence, run_id)
        checksums = {name: file_record(directory / name) for name in files.values()}
        summary = {**self.summary, "files": files, "run_id": run_id, "checksums": checksums}
        write_json_atomic(directory / SUMMARY_FILE, summary, sort_keys=False)
        self.summary = summary


def _write_parquet(path: Path, frame: pd.DataFrame, run_id: str) -> None:
    """``frame`` as parquet (no index) with ``run_id`` in the file's key-value metadata."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), RUN_ID_KEY: run_id.encode("ascii")})
    atomic_write(path, lambda p: pq.write_table(table, p))


def _place_matrix(matrix: np.ndarray, target: Path, out: Path) -> None:
    """Put the ``[Q, N]`` matrix at ``target``: move the file it is memory-mapped from when `score_rows` wrote
    it into the staging directory or into ``out``, else write a copy."""
    backing = getattr(matrix, "filename", None)
    if backing is not None:
        backing = Path(backing).resolve()
        if backing == target.resolve():
            matrix.flush()
            return
        if backing.name == target.name and backing.parent == Path(os.path.realpath(out)) and backing.is_file():
            matrix.flush()
            os.replace(backing, target)
            return
    atomic_write(target, lambda p: _save_npy(p, matrix))


def _save_npy(path: str, matrix: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, np.asarray(matrix, dtype=np.float32))


def check_scores_dir(out: str | os.PathLike) -> None:
    """InputError unless ``out`` may be replaced by a scores run: absent, empty, or a scores directory holding
    only what dataworth writes there (scores files, ledgers and reports derived from them, ``plots/``).

    `Scores.save` replaces the whole directory, so anything else in it — a user's file — is refused
    here, before any work, rather than deleted.
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    summary = out / SUMMARY_FILE
    if summary.is_file():
        try:
            ours = json.loads(summary.read_text(encoding="utf-8")).get("format") == SCORES_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise InputError(f"--out {out}: {summary} is not a dataworth scores summary; `score --out` replaces "
                             "the whole directory, so choose an empty or new one")
    for entry in sorted(out.iterdir()):
        if not _is_scores_entry(entry):
            raise InputError(f"--out {out}: holds {entry.name}, which `dataworth score` did not write; `score --out` "
                             f"replaces the whole directory, so move {entry.name} away or choose an empty or new one")


def _is_scores_entry(entry: Path) -> bool:
    name = TMP_FILE.sub("", entry.name)
    if entry.is_dir() and not entry.is_symlink():
        return name == "plots" and all(p.is_file() and p.suffix == ".png" for p in entry.iterdir())
    return name in SCORES_FILES.values() or name == SUMMARY_FILE or bool(DERIVED_FILE.match(name))


def prepare_scores_dir(out: str | os.PathLike, token: int | None = None) -> Path:
    """Check that ``out`` may be replaced (`check_scores_dir`) and make the staging sibling a run fills
    (``token``: a name the ranks of one run share)."""
    check_scores_dir(out)
    return staging_directory(out, token)


def load_scores(out_dir: str | os.PathLike) -> Scores:
    """Read a directory written by :meth:`Scores.save`; InputError naming the file if it is missing, of
    another format, damaged, or not of the run ``summary.json`` describes.

    Only the files ``summary.json`` lists are read, each checked against its recorded size and SHA-256 (once,
    here) and, for parquet, its run id. A directory written before run ids existed is read with a note.
    """
    out = Path(out_dir)
    summary_path = out / SUMMARY_FILE
    summary = _read_summary(out, summary_path)
    files = summary.get("files")
    if files is None and summary.get("run_id") is None:
        files = _legacy_files(out, summary)
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise InputError(f"{summary_path}: field 'files' is missing or malformed; re-run `dataworth score`")
    run = _RunCheck(out, summary_path, summary)
    table = run.read_parquet(files.get("topk", SCORES_FILES["topk"]))
    missing = [c for c in TOPK_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"{out / files.get('topk', SCORES_FILES['topk'])}: column '{missing[0]}' missing; "
                         "re-run `dataworth score`")
    queries = run.read_parquet(files.get("queries", SCORES_FILES["queries"]))
    if "query_id" not in queries.columns:
        raise InputError(f"{out / SCORES_FILES['queries']}: column 'query_id' missing; re-run `dataworth score`")
    query_ids = [str(q) for q in queries["query_id"]]
    matrix = run.read_npy(files["matrix"]) if "matrix" in files else None
    self_inf = run.read_parquet(files["self_influence"]) if "self_influence" in files else None
    run.note_unlisted(files)
    return Scores(table=table, summary=summary, query_ids=query_ids, matrix=matrix, self_influence=self_inf,
                  directory=out)


def open_scores_store(scores, store=None):
    """The store a scores directory was computed on: ``store`` (Store or path) or the summary's ``store``.

    Refused (InputError naming both digests) when it is not the store that was scored: the summary's
    ``store_digest`` must equal the store's `dataworth.store.reader.Store.digest` — a store with other rows
    in the same number would otherwise credit the wrong documents. Scores written before digests existed
    are only checked by row count, by the callers.
    """
    if store is not None and hasattr(store, "iter_blocks"):
        opened = store
    else:
        path = store if store is not None else scores.summary.get("store")
        if not path:
            raise InputError("scores summary.json: field 'store' is empty; pass --store")
        if not Path(path).is_dir():
            raise InputError(f"--store {path}: no such store directory (recorded in the scores' summary.json); "
                             "pass --store with the store the scores were computed on")
        opened = open_store(path, verify=False)
    expected = scores.summary.get("store_digest")
    if expected and opened.digest != expected:
        raise InputError(f"--store {opened.path}: store digest {opened.digest[:16]}… differs from the digest "
                         f"{expected[:16]}… of the store the scores were computed on "
                         f"({scores.summary.get('store')}); pass that store, or score again against this one")
    return opened


def _legacy_files(out: Path, summary: dict) -> dict[str, str]:
    """The files of a summary written before it listed them: what its own flags say the run wrote."""
    files = {k: SCORES_FILES[k] for k in ("topk", "queries")}
    for key, flag in (("matrix", "full"), ("self_influence", "self_influence")):
        if summary.get(flag) and (out / SCORES_FILES[key]).is_file():
            files[key] = SCORES_FILES[key]
    return files


def _read_summary(out: Path, summary_path: Path) -> dict:
    if not summary_path.is_file():
        raise InputError(f"{out}: not a scores directory (no summary.json); run `dataworth score --out {out}` first")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{summary_path}:{exc.lineno}: invalid JSON ({exc.msg}); re-run `dataworth score`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{summary_path}: unreadable ({one_line(exc)})") from None
    if not isinstance(summary, dict) or summary.get("format") != SCORES_FORMAT:
        raise InputError(f"{summary_path}: field 'format' is not {SCORES_FORMAT!r}; not a dataworth scores directory")
    if summary.get("version") != SCORES_VERSION:
        raise InputError(
            f"{summary_path}: field 'version' is {summary.get('version')!r}, this dataworth reads version "
            f"{SCORES_VERSION}; re-run `dataworth score`"
        )
    return summary


class _RunCheck:
    """Reads the files of one scores run, refusing any that does not belong to it (see `load_scores`)."""

    def __init__(self, out: Path, summary_path: Path, summary: dict):
        self.out, self.summary_path = out, summary_path
        self.run_id = summary.get("run_id")
        self.checksums = summary.get("checksums") if isinstance(summary.get("checksums"), dict) else {}
        self.remedy = f"re-run `dataworth score --out {out}`"
        if self.run_id is None and str(out.resolve()) not in _LEGACY_NOTED:
            _LEGACY_NOTED.add(str(out.resolve()))
            say(f"note: {out}: written by an older dataworth (no run id or checksums in summary.json); its files "
                "are read unchecked")

    def path(self, name: str) -> Path:
        """The listed file ``name``, checked against its record (size, SHA-256) when the run has records."""
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise InputError(f"{self.summary_path}: file {name!r} must stay inside the scores directory")
        path = self.out / rel
        if not path.is_file():
            raise InputError(f"{path}: missing; the scores directory is incomplete, {self.remedy}")
        if self.run_id is not None:
            record = self.checksums.get(name)
            if not isinstance(record, dict):
                raise InputError(f"{path}: no checksum in {self.summary_path} for this file; {self.remedy}")
            verify_file(path, name, record, source=str(self.summary_path), remedy=self.remedy)
        return path

    def read_parquet(self, name: str) -> pd.DataFrame:
        path = self.path(name)
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{path}: not a readable parquet file ({one_line(exc)}); {self.remedy}") from None
        found = (table.schema.metadata or {}).get(RUN_ID_KEY)
        if self.run_id is not None and (found or b"").decode("ascii", "replace") != self.run_id:
            got = found.decode("ascii", "replace") if found else "none"
            raise InputError(f"{path}: belongs to run {got}, but {self.summary_path} describes run {self.run_id}; "
                             f"{self.remedy}")
        return table.to_pandas()

    def read_npy(self, name: str) -> np.ndarray:
        path = self.path(name)
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable .npy file ({one_line(exc)}); {self.remedy}") from None

    def note_unlisted(self, files: dict) -> None:
        """Say so when a scores file lies in the directory without being listed (left by an older dataworth's
        earlier run): it is not read."""
        listed = set(files.values())
        for name in SCORES_FILES.values():
            if name not in listed and (self.out / name).is_file():
                say(f"note: {self.out / name}: not listed in {self.summary_path} (left by an earlier run?); ignored")


def check_mode(mode: str, flag: str = "--mode") -> str:
    if mode not in SCORE_MODES:
        raise InputError(f"{flag}: unknown mode {mode!r}; choose one of {', '.join(SCORE_MODES)}")
    return mode


def self_influence(store, curvature: Curvature, block_rows: int = DEFAULT_BLOCK_ROWS) -> np.ndarray:
    """``s(n, n)`` for every store row ``[N]`` float64, streaming the store in blocks."""
    parts = [self_influence_block(curvature, block) for _start, block in store.iter_blocks(block_rows, reuse=True)]
    return np.concatenate(parts) if parts else np.zeros(0)


def score_rows(
    store,
    query_rows: np.ndarray,
    query_ids: Sequence[str],
    curvature: Curvature,
    mode: str = "dot",
    top_k: int = 10,
    full: bool = False,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    *,
    with_self_influence: bool = False,
    out_dir: str | os.PathLike | None = None,
    memory_budget_mb: float | None = None,
    dist: DistContext | None = None,
) -> Scores:
    """Score ``query_rows`` ``[Q, D]`` against every row of ``store``; see the module docstring for the maths.

    The queries are preconditioned once (``p_q = (F + λI)⁻¹ ĝ_q``, float64 inside, float32 after); then
    the store is streamed in blocks of ``block_rows`` rows: memory is ``O(Q · (block_rows + top_k) + D ·
    block_rows)`` whatever the store size. ``full`` keeps the ``[Q, N]`` float32 matrix — written block by
    block to ``out_dir/scores.npy`` (a memmap) when ``out_dir`` is given, in memory otherwise.
    ``top_k`` larger than the store is clamped to the store size (``summary["clamped"]`` and a note say so).

    ``memory_budget_mb``: choose ``block_rows`` and a query batch size so that the buffers stay within the
    budget (`score_budget`); each query batch reads the store once (``summary["store_passes"]``).
    ``dist``: a `DistContext` of ranks that all call this with the same arguments: each scores the shards it
    owns, the top-k lists are merged exactly (ties to the lower store row), the full matrix is written
    column block by column block by the rank that owns them; every rank returns the same `Scores`.
    """
    ctx = dist or SINGLE
    started = time.perf_counter()
    check_mode(mode)
    query_rows = np.asarray(query_rows)
    query_ids = [str(q) for q in query_ids]
    if query_rows.ndim != 2 or query_rows.shape[1] != store.dim:
        raise InputError(
            f"queries: rows have shape {tuple(query_rows.shape)}, the store's rows have {store.dim} columns"
        )
    if len(query_ids) != query_rows.shape[0]:
        raise InputError(f"queries: {len(query_ids)} ids for {query_rows.shape[0]} rows")
    if query_rows.shape[0] == 0:
        raise InputError("queries: no query rows to score")
    duplicated = pd.Index(query_ids)[pd.Index(query_ids).duplicated()]
    if len(duplicated):
        raise InputError(f"queries: duplicate query id {duplicated[0]!r}; query ids must be unique")
    if not np.isfinite(query_rows).all():
        bad = [query_ids[i] for i in np.flatnonzero(~np.isfinite(query_rows).all(axis=1))]
        raise InputError(f"queries: non-finite gradient in query {', '.join(bad[:5])}")
    if int(top_k) < 1:
        raise InputError(f"--top-k: must be >= 1, got {top_k}")
    if block_rows < 1:
        raise InputError(f"block_rows must be >= 1, got {block_rows}")
    if curvature.dim != store.dim:
        raise InputError(f"curvature has {curvature.dim} columns but the store has {store.dim}; re-run dataworth fit")

    n_rows = store.rows
    n_queries = query_rows.shape[0]
    k = min(int(top_k), n_rows)
    notes = []
    if k < int(top_k):
        notes.append(f"--top-k {top_k} is larger than the store ({n_rows} rows): clamped to {k}")
    need_self = mode == "relative" or with_self_influence
    query_batch = n_queries
    if memory_budget_mb is not None:
        block_rows, query_batch = score_budget(memory_budget_mb, store, n_queries, k, mode, need_self)
    else:  # blocks of exact gradients are GBs: cap them (the order of the sums changes, not the scores)
        try:
            block_rows = min(block_rows, score_budget(DEFAULT_SCORE_BUDGET_MB, store, n_queries, k, mode,
                                                      need_self)[0])
        except InputError:  # the default budget cannot hold the queries themselves: keep the asked blocks
            pass

    matrix, matrix_tmp, matrix_path = None, None, None
    if full:
        matrix, matrix_tmp, matrix_path = _open_matrix(ctx, out_dir, n_queries, n_rows)

    positive_parts, negative_parts = [], []
    self_parts: list[np.ndarray] = []
    self_rows: list[int] = []
    precondition_s = 0.0
    passes = 0
    try:
        for q0 in range(0, n_queries, query_batch):
            q1 = min(n_queries, q0 + query_batch)
            t0 = time.perf_counter()
            preconditioned64 = curvature.precondition64(query_rows[q0:q1])
            preconditioned = preconditioned64.astype(np.float32)
            query_norms = np.linalg.norm(preconditioned64, axis=1)
            del preconditioned64
            precondition_s += time.perf_counter() - t0
            positive = StreamingTopK(q1 - q0, k, descending=True, allow_gaps=ctx.active)
            negative = StreamingTopK(q1 - q0, k, descending=False, allow_gaps=ctx.active)
            seen = 0
            # Rows arrive as stored and are widened piecewise inside `block_dots`; self-influence needs whole
            # float32 blocks, widened here into one reused buffer (the scores still come from the raw rows, so
            # they are the same with or without self-influence).
            widened = None
            for start, block in iter_owned_blocks(store, block_rows, ctx, raw=True):
                self_inf = None
                if need_self:
                    rows32 = block
                    if store.dtype != "float32":
                        if widened is None or len(widened) < len(block):
                            widened = np.empty((len(block), store.dim), dtype=np.float32)
                        rows32 = raw_to_float32(block, store.dtype, out=widened[: len(block)])
                    self_inf = self_influence_block(curvature, rows32)
                    del rows32
                if with_self_influence and passes == 0:
                    self_parts.append(self_inf)
                    self_rows.append(start)
                values = score_block(mode, preconditioned, block, query_norms, self_inf, dtype=store.dtype)
                del block
                if np.isnan(values).any():
                    bad = start + int(np.flatnonzero(np.isnan(values).any(axis=0))[0])
                    raise InputError(f"{store.path}: NaN score for store row {bad} (id "
                                     f"{row_ids(store, np.array([bad]))[0]!r}); the row or the curvature holds "
                                     "non-finite numbers")
                positive.update(values, start)
                negative.update(values, start)
                if matrix is not None:
                    matrix[q0:q1, start : start + values.shape[1]] = values
                seen += values.shape[1]
                del values
            passes += 1
            seen = all_reduce_count(ctx, seen)
            if seen != n_rows:
                raise InputError(f"{store.path}: manifest says {n_rows} rows but the shards hold {seen}")
            positive_parts.append(_merge_ranks(ctx, positive))
            negative_parts.append(_merge_ranks(ctx, negative))
        matrix = _close_matrix(ctx, matrix, matrix_tmp, matrix_path)
    finally:
        if matrix_tmp is not None and ctx.is_main and matrix_tmp.exists():
            matrix_tmp.unlink()
    scoring_s = time.perf_counter() - started - precondition_s

    positive = _stack_topk(positive_parts)
    negative = _stack_topk(negative_parts)
    table = topk_table(query_ids, lambda rows: row_ids(store, rows), positive, negative)
    self_table = None
    if with_self_influence:
        values = _gather_rows(ctx, self_rows, self_parts, n_rows)
        train_ids = [str(i) for i in store.ids]
        self_table = pd.DataFrame({"train_row": np.arange(n_rows), "train_id": train_ids, "self_influence": values})
    total_s = time.perf_counter() - started
    summary = {
        "format": SCORES_FORMAT,
        "version": SCORES_VERSION,
        "store": str(Path(store.path).resolve()),
        "store_digest": getattr(store, "digest", None),
        "curvature": curvature.kind,
        "damping": curvature.damping_spec.to_json(),
        "damping_values": curvature.damping,
        "mode": mode,
        "sign": "positive = up-weighting the training row lowers the query loss (helps); approximates -dL_q/d eps_n",
        "n_queries": n_queries,
        "n_rows": n_rows,
        "dim": store.dim,
        "top_k": k,
        "top_k_requested": int(top_k),
        "clamped": k < int(top_k),
        "full": bool(full),
        "self_influence": bool(with_self_influence),
        "block_rows": int(block_rows),
        "query_batch": int(query_batch),
        "store_passes": passes,
        "memory_budget_mb": memory_budget_mb,
        "world_size": ctx.world_size,
        "notes": notes,
        "timings": {
            "precondition_s": round(precondition_s, 6),
            "scoring_s": round(scoring_s, 6),
            "total_s": round(total_s, 6),
            "rows_per_s": round(n_rows * passes / scoring_s, 1) if scoring_s > 0 else None,
        },
    }
    return Scores(table=table, summary=summary, query_ids=query_ids, matrix=matrix, self_influence=self_table)


def score_budget(memory_budget_mb: float, store, n_queries: int, top_k: int, mode: str,
                 need_self: bool) -> tuple[int, int]:
    """``(block_rows, query_batch)`` whose buffers fit in ``memory_budget_mb`` MiB.

    Accounted (bytes): a query batch ``Qb × D × 20`` (float64 preconditioning result + float32 copy +
    float64 product temporaries) and top-k state ``Qb × k × 48``, at most half the budget; a block of ``B``
    rows ``B × ((16 + 2s)·D + 32·D_max + 48·Qb)`` (the block as read from its shard and the next one, read
    ahead, ``s`` bytes a number; the float32 widening of the block for self-influence and of its
    `SUB_BLOCK_ROWS`-row pieces, with room to spare; float64 per-module work of cosine / self-influence, ``[Qb, B]`` scores and their temporaries),
    after a fixed reserve of ``PREFETCH_OVERHEAD_BYTES`` (the block reader's, kept for its other users). Each
    query batch streams the store once, so the store is read ``ceil(Q / Qb)`` times. A budget too small for
    one row of one query → InputError naming ``--memory-budget``.
    """
    budget = check_memory_budget(memory_budget_mb) * 2**20 - PREFETCH_OVERHEAD_BYTES
    dim = store.dim
    d_max = max((m.size for m in store.modules), default=dim)
    per_query = dim * 20 + top_k * 48
    query_batch = int(min(n_queries, (budget / 2) // per_query))
    raw_bytes = np.dtype(RAW_DTYPES[store.dtype]).itemsize
    per_row = lambda qb: (16 + 2 * raw_bytes) * dim + (32 * d_max if (mode == "cosine" or need_self) else 0) + 48 * qb  # noqa: E731
    if query_batch < 1 or (budget / 2) // per_row(1) < 1:
        need = (2 * (per_query + per_row(1)) + PREFETCH_OVERHEAD_BYTES) / 2**20
        raise InputError(f"--memory-budget {memory_budget_mb} MiB is too small for rows of {dim} columns; "
                         f"at least {need:.3f} MiB is needed")
    block_rows = int((budget / 2) // per_row(query_batch))
    return max(1, block_rows), query_batch


def row_ids(store, rows: np.ndarray) -> np.ndarray:
    """Ids of the given store rows (any shape), reading only the metadata of the shards that hold them.

    Bounded memory whatever the store size (``store.ids`` would hold every id); falls back to ``store.ids``
    for store objects without per-shard metadata.
    """
    rows = np.asarray(rows, dtype=np.int64)
    shards = getattr(store, "manifest", {}).get("shards") or []
    if not shards or not all("meta" in s for s in shards):
        ids = np.asarray([str(i) for i in store.ids], dtype=object)
        return ids[rows] if rows.size else np.zeros(rows.shape, dtype=object)
    import pyarrow.parquet as pq

    wanted = np.unique(rows)
    firsts = np.asarray([s["first_row"] for s in shards], dtype=np.int64)
    owner = np.searchsorted(firsts, wanted, side="right") - 1
    found: dict[int, str] = {}
    for shard in np.unique(owner):
        column = pq.read_table(Path(store.path) / shards[shard]["meta"], columns=["id"]).column("id")
        for row in wanted[owner == shard]:
            found[int(row)] = str(column[int(row - firsts[shard])].as_py())
    return np.asarray([found[int(r)] for r in rows.reshape(-1)], dtype=object).reshape(rows.shape)


def _merge_ranks(ctx, state: "StreamingTopK") -> tuple[np.ndarray, np.ndarray]:
    """Every rank's top-k of one query batch → the exact global top-k (``dataworth.distributed.merge_topk``)."""
    if not ctx.active:
        return state.values, state.rows
    parts = all_gather_objects(ctx, (state.values, state.rows))
    return merge_topk([p[0] for p in parts], [p[1] for p in parts], state.k, state.descending)


def _stack_topk(parts: list[tuple[np.ndarray, np.ndarray]]):
    from types import SimpleNamespace

    return SimpleNamespace(values=np.concatenate([p[0] for p in parts], axis=0),
                           rows=np.concatenate([p[1] for p in parts], axis=0))


def _gather_rows(ctx, starts: list[int], parts: list[np.ndarray], n_rows: int) -> np.ndarray:
    """Per-row values computed block by block on each rank → one ``[N]`` array on every rank."""
    gathered = all_gather_objects(ctx, list(zip(starts, parts))) if ctx.active else [list(zip(starts, parts))]
    out = np.zeros(n_rows, dtype=np.float64)
    for rank_parts in gathered:
        for start, values in rank_parts:
            out[start : start + len(values)] = values
    return out


def _open_matrix(ctx, out_dir, n_queries: int, n_rows: int):
    """The full ``[Q, N]`` float32 matrix: a memmap ``out_dir/scores.npy.tmp-<pid of rank 0>`` every rank writes
    its columns into (rank 0 creates it; the directory must be shared), or an in-memory array."""
    if out_dir is None:
        return np.zeros((n_queries, n_rows), dtype=np.float32), None, None
    matrix_path = Path(out_dir) / "scores.npy"
    matrix_tmp = matrix_path.with_name(f"scores.npy.tmp-{broadcast_object(ctx, os.getpid())}")
    if ctx.is_main:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        matrix = np.lib.format.open_memmap(matrix_tmp, mode="w+", dtype=np.float32, shape=(n_queries, n_rows))
    barrier(ctx)
    if not ctx.is_main:
        matrix = np.load(matrix_tmp, mmap_mode="r+")
    return matrix, matrix_tmp, matrix_path


def _close_matrix(ctx, matrix, matrix_tmp, matrix_path):
    """Flush every rank's columns, then rank 0 moves the file into place; in memory: sum the ranks' columns
    (each column is written by exactly one rank, the others hold zeros there)."""
    if matrix is None:
        return None
    if matrix_tmp is None:
        if ctx.active:
            matrix = all_reduce_arrays(ctx, [matrix.astype(np.float64)])[0].astype(np.float32)
        return matrix
    matrix.flush()
    del matrix
    barrier(ctx)
    if ctx.is_main:
        os.replace(matrix_tmp, matrix_path)
    barrier(ctx)
    return np.load(matrix_path, mmap_mode="r")


def topk_table(query_ids: Sequence[str], train_ids, positive: StreamingTopK,
               negative: StreamingTopK) -> pd.DataFrame:
    """Long table ``query_id, direction, rank, train_id, train_row, score`` from the two top-k states
    (anything with ``rows``/``values`` ``[Q, k]``). ``train_ids``: every row's id, or a function rows → ids."""
    frames = []
    if not callable(train_ids):
        all_ids = np.asarray(train_ids, dtype=object)
        train_ids = lambda rows: all_ids[rows]  # noqa: E731
    for direction, state in (("positive", positive), ("negative", negative)):
        q, k = state.rows.shape
        frames.append(pd.DataFrame({
            "query_id": np.repeat(np.asarray(query_ids, dtype=object), k),
            "direction": direction,
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int64), q),
            "train_id": train_ids(state.rows.reshape(-1)) if k else np.zeros(0, dtype=object),
            "train_row": state.rows.reshape(-1),
            "score": state.values.reshape(-1).astype(np.float64),
        }))
    table = pd.concat(frames, ignore_index=True)
    order = {q: i for i, q in enumerate(query_ids)}
    table["_q"] = table["query_id"].map(order)
    table["_d"] = (table["direction"] == "negative").astype(int)
    table = table.sort_values(["_q", "_d", "rank"], kind="stable").drop(columns=["_q", "_d"])
    return table[TOPK_COLUMNS].reset_index(drop=True)
