"""Writing a store: `StoreWriter` (append-only, resumable) and rank-local shard files and fragments.

Completion and resume: a shard is complete iff the manifest lists it. ``write_shard`` writes the ``.npy``
(tmp + ``os.replace``), then the meta parquet, then rewrites the manifest atomically, so a killed run leaves
at worst an unlisted shard, which the next ``StoreWriter`` with the same header deletes and rewrites. The
manifest carries no timestamps and is written canonically (nested header dicts with sorted keys), so a
resumed store is byte-identical to an uninterrupted one.

Rank-local writing (several processes filling one store, `dataworth.distributed`): shard ``i`` is always
the same rows whoever writes it, so ranks write shard files out of order with `write_shard_files` and list
each finished shard in their own fragment ``manifest.rank-R.json`` (`write_fragment`); one process then
hands the entries to ``StoreWriter.adopt_shards`` in shard order and finalizes. A fragment records the
writer's `identity_digest`, so fragments of another configuration are never adopted.

One writer at a time: a ``StoreWriter`` holds the store's writer lock (`dataworth.util.acquire_directory_lock`)
from construction until ``finalize`` / ``close``, so a second extract (or fit, or ``--overwrite``) on the same
directory is refused naming the first one's pid instead of deleting its half-written files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dataworth.errors import InputError
from dataworth.store.format import (
    FILES_KEY,
    FORMAT,
    FRAGMENT_FILE,
    FRAGMENT_FORMAT,
    HEADER_SECTIONS,
    IDS_FILE,
    MANIFEST,
    OWNED_DIRS,
    RESERVED_KEYS,
    SHARD_DIR,
    SHARD_FILE,
    TMP_FILE,
    VERSION,
    ModuleSpec,
    canonical_json,
    check_modules,
    file_entries,
    file_records,
    is_owned_file,
    manifest_bytes,
    meta_file,
    normalize_dtype,
    parse_shards,
    read_manifest,
    read_meta,
    shard_file,
    store_file,
    to_store_dtype,
    verify_shards,
    verify_side_file,
)
from dataworth.store.reader import Store, open_store
from dataworth.store.tensors import load_tensors, save_tensors
from dataworth.util import (
    LOCK_FILE,
    acquire_directory_lock,
    atomic_path,
    file_record,
    file_sha256,
    first_difference,
    release_directory_lock,
    short,
    write_json_atomic,
)

if TYPE_CHECKING:  # torch is imported lazily: numpy-only readers need not pay for it
    import torch


class _HashingWriter:
    """File-like object that hashes what it writes; ``np.lib.format.write_array`` streams through it."""

    def __init__(self, fh):
        self._fh = fh
        self.sha256 = hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self._fh.write(data)


def _write_npy(path: Path, raw: np.ndarray) -> str:
    """Write ``raw`` as a plain ``.npy`` atomically; return its SHA-256."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        hashing = _HashingWriter(fh)
        np.lib.format.write_array(hashing, raw, allow_pickle=False)
    return hashing.sha256.hexdigest()


def _meta_table(ids: Sequence[str], loss: np.ndarray, tokens: np.ndarray) -> pa.Table:
    return pa.table({
        "id": pa.array(list(ids), type=pa.string()),
        "loss": pa.array(loss, type=pa.float64()),
        "tokens": pa.array(tokens, type=pa.int64()),
    })


def _write_parquet(path: Path, table: pa.Table) -> str:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return file_sha256(path)


def _store_entries(path: Path) -> list[Path]:
    return sorted(path.iterdir()) if path.is_dir() else []


def _tmp_files(path: Path) -> list[Path]:
    """``*.tmp-<pid>`` files of store files anywhere in the store: half-written files of a killed run."""
    return sorted(p for p in path.rglob("*.tmp-*") if p.is_file() and TMP_FILE.search(p.name)
                  and is_owned_file(p.relative_to(path).as_posix()))


def _owned_files(path: Path) -> list[Path]:
    """Every file of the store directory that a store writer owns (`is_owned_file`), user files excluded."""
    return sorted(p for p in path.rglob("*") if p.is_file() and is_owned_file(p.relative_to(path).as_posix()))


def _parses_as_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def _looks_like_store(path: Path) -> bool:
    """A directory whose manifest is unreadable but that is recognisably a store: the manifest text names our
    format, or ``shards/`` holds shard files. Only then may ``--overwrite`` clear it."""
    try:
        if FORMAT.encode() in (path / MANIFEST).read_bytes()[:4096]:
            return True
    except OSError:
        pass
    shards = path / SHARD_DIR
    return shards.is_dir() and any(SHARD_FILE.match(e.name) for e in shards.iterdir())


class StoreWriter:
    """Append-only, resumable writer of a store.

    ``header`` holds the ``projection``, ``model``, ``data`` and ``config`` dicts (plain JSON; extra keys are
    kept). Opening a directory:

    - missing or empty → a new store (manifest with ``complete=false``, no shards);
    - a store with the same header, modules, dtype and shard_rows → resume: ``done_shards`` is the number of
      listed shards (each verified by size and SHA-256); unlisted shard files and tmp files of a killed run
      are deleted;
    - a store with a different header → ``InputError`` naming the first differing key, unless
      ``overwrite=True``, which removes the old store's files first;
    - a non-empty directory that is not a store → ``InputError`` (user files are never deleted).

    ``prune=False`` keeps shard files the manifest does not list (other ranks' finished shards, listed in
    their fragments; see the module docstring) and deletes only tmp files.

    The writer holds the store's lock until ``finalize`` or ``close``; files it writes besides shards
    (``save_tensors``, ``write_json``, ``record_file``) are listed with their SHA-256 in ``files``.
    """

    def __init__(self, path: str | os.PathLike, *, modules: Sequence[ModuleSpec], dtype: object,
                 shard_rows: int, header: dict[str, Any], overwrite: bool = False, verify: bool = True,
                 prune: bool = True):
        self.path = Path(path)
        self._prune = prune
        self.dtype = normalize_dtype(dtype)
        self.modules = list(modules)
        self.dim = sum(m.size for m in self.modules)
        if not self.modules:
            raise ValueError("a store needs at least one module")
        check_modules(self.modules, self.dim, where="modules")
        if not isinstance(shard_rows, int) or shard_rows < 1:
            raise ValueError(f"shard_rows must be a positive integer, got {shard_rows!r}")
        self.shard_rows = shard_rows
        self._header = self._check_header(header)
        self._shards: list[dict[str, Any]] = []
        self._complete = False
        self._ids_entry: dict[str, Any] | None = None
        self._files: dict[str, dict[str, Any]] = {}
        self._lock = None
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path}: exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = acquire_directory_lock(self.path, "store")
        try:
            self._open(overwrite, verify)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Give up the writer lock if this writer took it (``finalize`` does this too)."""
        if self._lock is not None:
            release_directory_lock(self.path, self._lock)
            self._lock = None

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the kernel drops the flock anyway
            pass

    # -- construction -------------------------------------------------------------------------------------
    @staticmethod
    def _check_header(header: dict[str, Any]) -> dict[str, Any]:
        missing = [k for k in HEADER_SECTIONS if not isinstance(header.get(k), dict)]
        if missing:
            raise ValueError(f"store header needs dicts for {', '.join(missing)}")
        clash = [k for k in header if k in RESERVED_KEYS]
        if clash:
            raise ValueError(f"store header keys {clash} are reserved for the manifest")
        extras = sorted(k for k in header if k not in HEADER_SECTIONS)
        return {k: canonical_json(header[k]) for k in (*HEADER_SECTIONS, *extras)}

    def _identity(self) -> dict[str, Any]:
        """What must match for a resume: everything but the shard list and completion."""
        return {"dim": self.dim, "dtype": self.dtype, "shard_rows": self.shard_rows,
                "modules": [m.to_json() for m in self.modules], **self._header}

    def _open(self, overwrite: bool, verify: bool) -> None:
        entries = [e for e in _store_entries(self.path) if e.name != LOCK_FILE]
        if not (self.path / MANIFEST).exists():
            stray = [e for e in entries if not (e.is_file() and e.name.startswith(f"{MANIFEST}.tmp-"))]
            if stray:
                raise InputError(
                    f"{self.path}: directory is not empty and not a gradient store ({stray[0].name}); "
                    "choose an empty or new directory"
                )
            for e in entries:  # a tmp manifest of a run killed before its first manifest
                e.unlink()
            self._create()
            return
        try:
            manifest = read_manifest(self.path)
        except InputError:
            if not overwrite:
                raise
            if self._is_ours(self.path / MANIFEST) or _looks_like_store(self.path):
                self._remove_store_files()
                self._create()
                return
            if _parses_as_json(self.path / MANIFEST):  # another tool's manifest: the error says what it is
                raise
            raise InputError(f"{self.path / MANIFEST}: unreadable and {self.path} does not look like a gradient "
                             "store; --overwrite deletes nothing here (remove it yourself or choose another "
                             "directory)") from None
        if overwrite:
            self._remove_store_files()
            self._create()
            return
        self._resume(manifest, verify)

    @staticmethod
    def _is_ours(mpath: Path) -> bool:
        """A manifest of our format (any version): safe to delete with ``overwrite``."""
        try:
            return json.loads(mpath.read_text(encoding="utf-8")).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            return False

    def _remove_store_files(self) -> None:
        """Delete what a store writer wrote (`is_owned_file`: shards, metas, ids, side files, fragments, tmp
        files), then the store's own directories left empty; the manifest goes last, so a crash here leaves
        something still recognisable as a store. A user's file — anywhere, ``shards/`` included — stays."""
        manifest = self.path / MANIFEST
        for e in _owned_files(self.path):
            if e != manifest:
                e.unlink(missing_ok=True)
        for rel in OWNED_DIRS:
            d = self.path / rel
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        manifest.unlink(missing_ok=True)

    def _create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_manifest()  # first, so the directory is recognisably a store from now on
        (self.path / SHARD_DIR).mkdir(exist_ok=True)

    def _resume(self, manifest: dict[str, Any], verify: bool) -> None:
        existing = {k: manifest.get(k, "<missing>") for k in self._identity()}
        extra = {k: manifest[k] for k in manifest if k not in existing and k not in RESERVED_KEYS}
        diff = first_difference({**existing, **extra}, self._identity())
        if diff:
            key, old, new = diff
            raise InputError(
                f"{self.path}: store {key} {short(old, 40)} != requested {short(new, 40)}; "
                "pass --overwrite to replace the store"
            )
        mpath = self.path / MANIFEST
        shards = parse_shards(manifest, mpath)
        verify_shards(self.path, shards, self.dim, self.dtype, verify)
        self._shards = shards
        self._complete = manifest.get("complete") is True
        self._ids_entry = manifest.get("ids") if self._complete else None
        self._files = file_records(manifest, mpath)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Delete files a killed run left behind: tmp files and shards the manifest does not list."""
        shard_dir = self.path / SHARD_DIR
        shard_dir.mkdir(exist_ok=True)
        for e in _store_entries(shard_dir) if self._prune else []:
            m = SHARD_FILE.match(e.name)
            if e.is_file() and m and int(m.group(1)) >= len(self._shards):
                e.unlink()
        for e in _tmp_files(self.path):
            e.unlink()
        if not self._complete:
            (self.path / IDS_FILE).unlink(missing_ok=True)  # stale: rows were appended after a finalize

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def done_shards(self) -> int:
        """Number of finished shards (listed in the manifest); the next ``write_shard`` index."""
        return len(self._shards)

    @property
    def done_rows(self) -> int:
        """Number of rows in finished shards."""
        return sum(s["rows"] for s in self._shards)

    @property
    def complete(self) -> bool:
        """Whether the store was finalized (a resumed, finished store needs no more shards)."""
        return self._complete

    def _manifest(self) -> dict[str, Any]:
        manifest = {
            "format": FORMAT, "version": VERSION, "complete": self._complete, "rows": self.done_rows,
            "dim": self.dim, "dtype": self.dtype, "shard_rows": self.shard_rows,
            "modules": [m.to_json() for m in self.modules], **self._header, "shards": self._shards,
        }
        if self._ids_entry is not None:
            manifest["ids"] = self._ids_entry
        manifest[FILES_KEY] = file_entries(self._files)
        return manifest

    def _write_manifest(self) -> None:
        data = manifest_bytes(self._manifest())
        with atomic_path(self.path / MANIFEST) as tmp:
            tmp.write_bytes(data)

    # -- writing --------------------------------------------------------------------------------------------
    def write_shard(self, index: int, rows: Any, ids: Sequence[str], loss: Any, tokens: Any) -> None:
        """Append shard ``index`` (must equal ``done_shards``): ``rows [n, dim]`` (any float array or tensor),
        ``ids``/``loss``/``tokens`` of length ``n`` (``1 <= n <= shard_rows``).

        Rows are converted to the store dtype via float32 (round-to-nearest-even). Writes the ``.npy``, then
        the meta parquet, then the manifest listing the shard — the shard counts only once listed.
        """
        if index != self.done_shards:
            raise ValueError(f"{self.path}: shard {index} written out of order; next shard is {self.done_shards}")
        entry = write_shard_files(self.path, index, rows, ids, loss, tokens, dtype=self.dtype, dim=self.dim,
                                  shard_rows=self.shard_rows)
        self._shards.append({**entry, "first_row": self.done_rows})
        self._complete, self._ids_entry = False, None
        self._write_manifest()
        (self.path / IDS_FILE).unlink(missing_ok=True)  # only exists if this appends to a finalized store

    def adopt_shards(self, entries: Sequence[dict[str, Any]], verify: bool = True) -> None:
        """Append shards written elsewhere by `write_shard_files` (other ranks), in order.

        ``entries[j]`` must describe shard ``done_shards + j`` (file names fixed by the index); each file is
        checked (``.npy`` header and size, and with ``verify`` the SHA-256 recorded when it was written)
        before the manifest lists it, so a store never lists a shard that is not whole.
        """
        added = []
        first_row = self.done_rows
        for j, entry in enumerate(entries):
            index = self.done_shards + j
            keys = ("file", "rows", "sha256", "meta", "meta_sha256")
            item = {k: entry.get(k) for k in keys}
            if item["file"] != shard_file(index) or item["meta"] != meta_file(index):
                raise InputError(f"{self.path}: shard entry {item['file']!r} adopted as shard {index} "
                                 f"(expected {shard_file(index)!r}); shards must be adopted in order")
            item["first_row"] = first_row
            first_row += int(item["rows"])
            added.append(item)
        verify_shards(self.path, added, self.dim, self.dtype, verify)
        if not added:
            return
        self._shards.extend(added)
        self._complete, self._ids_entry = False, None
        self._write_manifest()
        (self.path / IDS_FILE).unlink(missing_ok=True)

    def identity_digest(self) -> str:
        """SHA-256 of what must match for a resume (header, modules, dtype, shard_rows): tags fragments."""
        return hashlib.sha256(json.dumps(self._identity(), sort_keys=True).encode("utf-8")).hexdigest()

    def save_tensors(self, relpath: str, tensors: dict[str, "torch.Tensor"],
                     metadata: dict[str, str] | None = None) -> Path:
        """Atomically write a safetensors file under the store (e.g. ``"curvature/kfac.safetensors"``) and list
        it with its SHA-256 in the manifest's ``files``."""
        target = save_tensors(self.path, relpath, tensors, metadata)
        self.record_file(relpath)
        return target

    def write_json(self, relpath: str, value: Any) -> Path:
        """Atomically write a small JSON side file (``nonfinite.json``) and list it in ``files``."""
        target = write_json_atomic(store_file(self.path, relpath), value, indent=1, sort_keys=False)
        self.record_file(relpath)
        return target

    def record_file(self, relpath: str, record: dict[str, Any] | None = None) -> None:
        """List ``relpath`` in ``files`` (``record``: its `dataworth.util.file_record` as its writer computed
        it — another rank —, else hashed here) and rewrite the manifest, so the record is durable before the
        file is read by a resumed run."""
        self._files[relpath] = record if record is not None else file_record(store_file(self.path, relpath))
        self._write_manifest()

    def load_tensors(self, relpath: str) -> dict[str, "torch.Tensor"]:
        """Load a side file this store lists, after checking it against its ``files`` record."""
        verify_side_file(self.path, relpath, self._files)
        return load_tensors(self.path, relpath)

    def finalize(self, verify: bool = False) -> Store:
        """Write ``ids.parquet`` (shard metas concatenated), mark the store complete, release the writer lock,
        and open the store.

        ``verify=True`` re-hashes every shard on the way (they were hashed while written, so off by default).
        """
        try:
            tables = [read_meta(self.path / s["meta"], s["rows"]) for s in self._shards]
            empty = _meta_table([], np.zeros(0, np.float64), np.zeros(0, np.int64))
            table = pa.concat_tables(tables) if tables else empty
            sha = _write_parquet(self.path / IDS_FILE, table.combine_chunks())
            self._ids_entry = {"file": IDS_FILE, "rows": self.done_rows, "sha256": sha}
            self._complete = True
            self._write_manifest()
        finally:
            # The whole process lets go: a writer resumed inside this one (tests, notebooks) is finished too.
            release_directory_lock(self.path)
            self._lock = None
        return open_store(self.path, verify=verify)


def _as_float_matrix(rows: Any) -> np.ndarray:
    """numpy view of rows given as a numpy array or a torch tensor (any float dtype, any device)."""
    if hasattr(rows, "detach"):  # torch.Tensor, without importing torch here
        rows = rows.detach().to("cpu").float().numpy()
    arr = np.asarray(rows)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"rows must be floating point, got {arr.dtype}")
    return arr


def _check_meta(index: int, n: int, ids: Sequence[str], loss: Any, tokens: Any
                ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Validate per-row metadata of one shard: ``n`` string ids, float losses, integral token counts."""
    ids = list(ids)
    loss = np.asarray(loss, dtype=np.float64).reshape(-1)
    tokens_in = np.asarray(tokens).reshape(-1)
    if not (len(ids) == len(loss) == len(tokens_in) == n):
        raise ValueError(f"shard {index}: {n} rows but {len(ids)} ids, {len(loss)} losses, {len(tokens_in)} tokens")
    if not all(isinstance(i, str) for i in ids):
        raise ValueError(f"shard {index}: ids must be strings")
    tokens = tokens_in.astype(np.int64)
    if not np.array_equal(tokens, tokens_in):
        raise ValueError(f"shard {index}: token counts must be integers")
    return ids, loss, tokens


def write_shard_files(path: str | os.PathLike, index: int, rows: Any, ids: Sequence[str], loss: Any, tokens: Any,
                      *, dtype: str, dim: int, shard_rows: int) -> dict[str, Any]:
    """Write shard ``index`` (``.npy`` then meta parquet, each atomically) and return its manifest entry
    ``{file, rows, sha256, meta, meta_sha256}`` (without ``first_row``, which depends on the shards before it).

    Rows are converted to the store dtype via float32 (round-to-nearest-even), as ``StoreWriter.write_shard``.
    """
    path = Path(path)
    matrix = _as_float_matrix(rows)
    n = matrix.shape[0] if matrix.ndim == 2 else -1
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        raise ValueError(f"shard {index}: rows have shape {list(matrix.shape)}, expected [n, {dim}]")
    if not 1 <= n <= shard_rows:
        raise ValueError(f"shard {index}: {n} rows, expected 1..{shard_rows} (shard_rows)")
    ids, loss, tokens = _check_meta(index, n, ids, loss, tokens)
    raw = to_store_dtype(matrix, normalize_dtype(dtype))
    (path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    sha = _write_npy(path / shard_file(index), raw)
    meta_sha = _write_parquet(path / meta_file(index), _meta_table(ids, loss, tokens))
    return {"file": shard_file(index), "rows": n, "sha256": sha, "meta": meta_file(index), "meta_sha256": meta_sha}


def fragment_name(rank: int) -> str:
    """File name of rank ``rank``'s fragment: ``manifest.rank-R.json``."""
    return f"manifest.rank-{int(rank)}.json"


def fragment_paths(path: str | os.PathLike) -> list[Path]:
    """The fragment files in a store directory, by rank."""
    path = Path(path)
    found = [(int(m.group(1)), e) for e in _store_entries(path) if (m := FRAGMENT_FILE.match(e.name))]
    return [e for _rank, e in sorted(found)]


def write_fragment(path: str | os.PathLike, rank: int, identity: str, shards: Sequence[dict[str, Any]],
                   extra: dict[str, Any] | None = None) -> Path:
    """Atomically (re)write rank ``rank``'s fragment listing its finished ``shards`` (entries with an
    ``index``), tagged with the writer's ``identity`` digest."""
    body = {"format": FRAGMENT_FORMAT, "version": VERSION, "rank": int(rank), "identity": identity,
            **(extra or {}), "shards": sorted(shards, key=lambda e: e["index"])}
    target = Path(path) / fragment_name(rank)
    with atomic_path(target) as tmp:
        tmp.write_bytes(manifest_bytes(body))
    return target


def read_fragment_entries(path: str | os.PathLike, identity: str) -> dict[int, dict[str, Any]]:
    """``{shard index: entry}`` from every fragment of the store written under ``identity`` (each entry gets
    ``writer``: the rank whose fragment lists it).

    A fragment of another configuration (different identity) → ``InputError`` naming it (``--overwrite``
    replaces it); two fragments listing the same shard with different checksums → ``InputError``.
    """
    out: dict[int, dict[str, Any]] = {}
    for fpath in fragment_paths(path):
        try:
            body = json.loads(fpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{fpath}: not valid JSON ({exc}); delete it to recompute its shards") from exc
        if not isinstance(body, dict) or body.get("format") != FRAGMENT_FORMAT or not isinstance(body.get("shards"), list):
            raise InputError(f"{fpath}: field 'format' is not {FRAGMENT_FORMAT!r}; not a store fragment")
        if body.get("identity") != identity:
            raise InputError(f"{fpath}: written for another configuration of this store (identity differs); "
                             "pass --overwrite to replace the store")
        for i, entry in enumerate(body["shards"]):
            index = entry.get("index") if isinstance(entry, dict) else None
            if not isinstance(index, int) or entry.get("file") != shard_file(index) or entry.get("meta") != meta_file(index):
                raise InputError(f"{fpath}: field 'shards[{i}]' is malformed")
            if index in out and out[index]["sha256"] != entry.get("sha256"):
                raise InputError(f"{fpath}: shard {index} listed with a different sha256 than in another fragment")
            out[index] = {**entry, "writer": body.get("rank")}
    return out


def shard_entry_is_whole(path: str | os.PathLike, entry: dict[str, Any], dim: int, dtype: str) -> bool:
    """Whether the files of a fragment entry exist with the recorded size and SHA-256."""
    try:
        verify_shards(Path(path), [entry], dim, dtype, verify=True)
    except InputError:
        return False
    return True
