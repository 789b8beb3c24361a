"""Approximate top-k over huge stores with a FAISS index, and its recall against exact search.

Why a module of its own: exact scoring reads every store row once per query batch (``dataworth.influence.scores``);
for billions of rows and interactive queries an approximate nearest-neighbour index answers top-k in
sub-linear time. It is optional (``pip install 'dataworth[faiss]'`` installs ``faiss-cpu``) and never
replaces exact scoring silently: `index_recall` measures, on the store's own data, how many of the exact
top-k rows the index returns (recall@k), and ``dataworth index recall`` prints it.

What is indexed: the raw store rows ``ĝ_n`` (float32) under the inner-product metric. A query is
preconditioned first (``p_q = (F + λI)⁻¹ ĝ_q``, the fitted curvature), so the index ranks rows by
``p_qᵀ ĝ_n = s(q, n)`` — the ``dot`` score of ``dataworth.influence.scores``. The most *negative* rows are the top-k
of ``−p_q``. (``cosine`` / ``relative`` re-normalise per row and are not served by this index.)

Files (inside the store): ``index/faiss.index`` (FAISS's own binary format, read with ``faiss.read_index``;
no pickle) and ``index/faiss.json`` (factory string, rows, dim, the ids checksum it was built for).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np

from dataworth.errors import InputError
from dataworth.influence.curvature import load_curvature
from dataworth.influence.scores import score_rows
from dataworth.store.reader import open_store
from dataworth.util import atomic_write, write_json_atomic

INDEX_FILE = "index/faiss.index"
INDEX_META = "index/faiss.json"
DEFAULT_BLOCK_ROWS = 65536


def _faiss():
    try:
        import faiss
    except ImportError:
        raise InputError("the FAISS index needs faiss-cpu: pip install 'dataworth[faiss]'") from None
    return faiss


def default_factory(n_rows: int) -> str:
    """``IVF{nlist},Flat`` with ``nlist ≈ √N`` (at least 1, at most N/39 so every list gets training rows)."""
    nlist = max(1, min(int(math.sqrt(n_rows)), n_rows // 39 or 1))
    return f"IVF{nlist},Flat"


def training_rows(store, count: int) -> np.ndarray:
    """``count`` rows spread evenly over the store (deterministic), float32 — the index's training sample."""
    picks = np.unique(np.linspace(0, store.rows - 1, num=min(count, store.rows)).astype(np.int64))
    return np.concatenate([store.read_rows(int(r), int(r) + 1) for r in picks])


def build_index(store_path, factory: str | None = None, block_rows: int = DEFAULT_BLOCK_ROWS,
                train_size: int | None = None) -> dict:
    """Build a FAISS inner-product index over every store row and save it in the store; returns its metadata.

    ``factory``: a ``faiss.index_factory`` string (default `default_factory`, e.g. ``IVF64,Flat``; ``Flat`` is
    exact; ``IVF4096,PQ64`` compresses rows for stores that do not fit in memory). Trained on an evenly
    spread sample (``train_size``, default ``max(40·nlist, 10000)`` rows), filled block by block.
    """
    faiss = _faiss()
    store = open_store(store_path, verify=False)
    if store.rows == 0:
        raise InputError(f"{store.path}: empty store, nothing to index")
    factory = factory or default_factory(store.rows)
    try:
        index = faiss.index_factory(store.dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise InputError(f"--factory {factory!r}: not a FAISS index factory string ({str(exc).splitlines()[0]})") from None
    started = time.perf_counter()
    if not index.is_trained:
        nlist = _clusters(faiss, index)
        sample = min(train_size or max(40 * nlist, 10000), store.rows)
        if nlist > sample:
            cause = f"--train-size is {sample}" if sample < store.rows else f"the store has {store.rows}"
            raise InputError(f"--factory {factory!r}: {nlist} clusters need at least {nlist} training rows and "
                             f"{cause}; use at most {sample} clusters (IVF{sample},…; FAISS advises 39 rows per "
                             "cluster)")
        try:
            index.train(training_rows(store, sample))
        except RuntimeError as exc:
            raise InputError(f"--factory {factory!r}: FAISS cannot train it on {sample} rows "
                             f"({_faiss_reason(exc)})") from None
    for _start, block in store.iter_blocks(block_rows, reuse=True):
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    meta = {"format": "dataworth-faiss-index", "version": 1, "factory": factory, "rows": store.rows,
            "dim": store.dim, "metric": "inner_product", "ids_sha256": store.manifest["ids"]["sha256"],
            "build_s": round(time.perf_counter() - started, 6)}
    atomic_write(store.path / INDEX_FILE, lambda tmp: faiss.write_index(index, str(tmp)))
    write_json_atomic(store.path / INDEX_META, meta, indent=1, sort_keys=False)
    return meta


def _clusters(faiss, index) -> int:
    """The IVF list count of an index (inside any pre-transform), 1 when it has no inverted lists."""
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return 1


def _faiss_reason(exc: RuntimeError) -> str:
    """The useful part of a FAISS C++ assertion (``Error: 'nx >= k' failed: Number of training points …``)."""
    text = " ".join(str(exc).split())
    return text.split("failed: ", 1)[-1] if "failed: " in text else text


def load_index(store):
    """The saved index of ``store`` (an open Store); InputError if missing or built for other rows."""
    faiss = _faiss()
    meta_path = store.path / INDEX_META
    if not meta_path.is_file() or not (store.path / INDEX_FILE).is_file():
        raise InputError(f"{store.path}: no FAISS index; run `dataworth index build --store {store.path}` first")
    meta = json.loads(meta_path.read_text())
    if meta.get("rows") != store.rows or meta.get("ids_sha256") != store.manifest["ids"]["sha256"]:
        raise InputError(f"{meta_path}: index built for {meta.get('rows')} rows of another store state; rebuild it")
    return faiss.read_index(str(store.path / INDEX_FILE)), meta


def search(index, preconditioned: np.ndarray, k: int, nprobe: int | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Approximate top-k by ``dot`` score for preconditioned queries ``[Q, D]``.

    Returns ``(pos_values, pos_rows, neg_values, neg_rows)``, each ``[Q, k]``: the largest ``p_qᵀ ĝ_n`` and,
    from a search with ``−p_q``, the most negative (values given as scores, i.e. sign restored).
    Rows an index could not fill are ``-1``.
    """
    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = int(nprobe)
    q = np.ascontiguousarray(preconditioned, dtype=np.float32)
    pos_values, pos_rows = index.search(q, k)
    neg_values, neg_rows = index.search(np.ascontiguousarray(-q), k)
    return pos_values, pos_rows.astype(np.int64), -neg_values, neg_rows.astype(np.int64)


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean over queries of ``|approx ∩ exact| / k`` for ``[Q, k]`` row-index arrays (``-1`` never counts)."""
    approx_rows, exact_rows = np.asarray(approx_rows), np.asarray(exact_rows)
    if approx_rows.shape != exact_rows.shape or exact_rows.ndim != 2 or exact_rows.shape[1] == 0:
        raise ValueError(f"expected two [Q, k] arrays with k >= 1, got {approx_rows.shape} and {exact_rows.shape}")
    hits = [len(set(a[a >= 0]) & set(e)) for a, e in zip(approx_rows, exact_rows)]
    return float(np.mean(hits) / exact_rows.shape[1])


def sample_query_rows(store, count: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``count`` store rows chosen at random (seeded) to serve as query gradients, with their ids."""
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(store.rows, size=min(count, store.rows), replace=False))
    rows = np.concatenate([store.read_rows(int(r), int(r) + 1) for r in picks])
    ids = [f"row{int(r)}" for r in picks]
    return rows, ids


def index_recall(store_path, query_rows: np.ndarray | None = None, *, curvature: str = "none", k: int = 10,
                 nprobe: int | None = None, sample: int = 100, seed: int = 0, block_rows: int = 4096) -> dict:
    """recall@k of the saved index against exact ``dot`` scoring (both directions), with timings.

    ``query_rows`` ``[Q, D]`` (query gradients), or ``sample`` store rows picked at random. Exact top-k comes
    from ``dataworth.scoring.score_rows``; returns ``{"recall@k": …, "recall@k_positive": …,
    "recall@k_negative": …, "queries", "k", "nprobe", "factory", "exact_s", "approx_s", "speedup"}``.
    """
    store = open_store(store_path, verify=False)
    index, meta = load_index(store)
    fitted = load_curvature(store, curvature)
    if query_rows is None:
        query_rows, ids = sample_query_rows(store, sample, seed)
    else:
        query_rows = np.asarray(query_rows, dtype=np.float32)
        ids = [f"q{i}" for i in range(len(query_rows))]
    k = min(int(k), store.rows)
    t0 = time.perf_counter()
    exact = score_rows(store, query_rows, ids, fitted, "dot", top_k=k, block_rows=block_rows)
    exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pre = fitted.precondition(query_rows)
    _pv, pos_rows, _nv, neg_rows = search(index, pre, k, nprobe)
    approx_s = time.perf_counter() - t0
    table = exact.table
    exact_pos = table[table["direction"] == "positive"]["train_row"].to_numpy().reshape(len(ids), k)
    exact_neg = table[table["direction"] == "negative"]["train_row"].to_numpy().reshape(len(ids), k)
    r_pos, r_neg = recall_at_k(pos_rows, exact_pos), recall_at_k(neg_rows, exact_neg)
    return {f"recall@{k}": (r_pos + r_neg) / 2, f"recall@{k}_positive": r_pos, f"recall@{k}_negative": r_neg,
            "queries": len(ids), "k": k, "nprobe": getattr(index, "nprobe", None), "factory": meta["factory"],
            "rows": store.rows, "exact_s": round(exact_s, 6), "approx_s": round(approx_s, 6),
            "speedup": round(exact_s / approx_s, 2) if approx_s > 0 else None}
