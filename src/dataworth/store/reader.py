"""Reading a store: `open_store` validates it and returns a `Store` that streams float32 row blocks.

Validation on open: manifest format/version, completion, dtype, module layout, shard names and row counts,
each shard's ``.npy`` header and exact size, and (``verify=True``) every SHA-256. A side file (curvature,
covariances) is checked against its ``files`` record the first time it is read. Reading: row blocks are
read with positioned reads (``os.preadv``) into arrays the reader owns, not taken from memory maps — a
mapped page stays in the process's resident set once touched, so streaming a 1.5 GB store through maps
made its whole size count in the peak RSS; blocks may cross shard boundaries, and with ``reuse=True`` the
next block is read and widened by a background thread while the consumer works.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from dataworth.errors import InputError
from dataworth.store.format import (
    FILES_KEY,
    IDS_FILE,
    MANIFEST,
    RAW_DTYPES,
    ModuleSpec,
    file_entries,
    file_records,
    manifest_bytes,
    manifest_field,
    npy_header,
    parse_modules,
    parse_shards,
    raw_to_float32,
    read_manifest,
    read_meta,
    store_digest,
    store_file,
    verify_checksum,
    verify_shards,
    verify_side_file,
)
from dataworth.store.tensors import load_tensors, save_tensors
from dataworth.util import atomic_path, directory_lock, file_record, say

if TYPE_CHECKING:  # torch is imported lazily: numpy-only readers need not pay for it
    import torch

OPEN_SHARD_MAPS = 64  # memory maps a Store keeps open (each holds one file descriptor)
OPEN_SHARD_FILES = 64  # shard files a Store keeps open for block reads

# os.preadv moves at most this many bytes per call on Linux (0x7ffff000); longer reads loop.
PREAD_CHUNK_BYTES = 0x7FFFF000

# Python-side bookkeeping of the prefetching reader (thread, future, queue objects): memory budgets reserve it.
PREFETCH_OVERHEAD_BYTES = 48 * 1024  # measured 27–38 KiB beyond the second block (tracemalloc)

_UNCHECKED_NOTED: set[str] = set()  # stores whose unrecorded side files were already noted (once per process)


class Store:
    """A finished, validated gradient store (read it with ``open_store``).

    ``rows × dim`` float rows in shards, per-row ``ids``/``loss``/``tokens``, the module column layout,
    and safetensors side files (curvature). Row blocks come out as float32 whatever the store dtype.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], modules: list[ModuleSpec]):
        self.path = path
        self.manifest = manifest
        self.rows: int = manifest["rows"]
        self.dim: int = manifest["dim"]
        self.dtype: str = manifest["dtype"]
        self.modules = modules
        self._shards = manifest["shards"]
        self._first_rows = [s["first_row"] for s in self._shards]
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._maps_lock = threading.Lock()  # the prefetch thread opens shards too
        self._files: OrderedDict[int, tuple[Any, int]] = OrderedDict()  # shard → (open file, data offset)
        self._records = file_records(manifest, path / MANIFEST)
        self._checked: set[str] = set()  # side files hashed once per open, not once per read

    def __del__(self) -> None:  # the shard files kept open for block reads
        for f, _offset in getattr(self, "_files", {}).values():
            f.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, rows={self.rows}, dim={self.dim}, dtype={self.dtype!r})"

    def __len__(self) -> int:
        return self.rows

    @property
    def fingerprint(self) -> str | None:
        """The model fingerprint the store was extracted with."""
        return self.manifest.get("model", {}).get("fingerprint")

    @cached_property
    def digest(self) -> str:
        """`dataworth.store.format.store_digest`: which rows this store holds; scores record it."""
        return store_digest(self.manifest)

    def module(self, name: str) -> ModuleSpec:
        """The ``ModuleSpec`` called ``name``."""
        for spec in self.modules:
            if spec.name == name:
                return spec
        known = ", ".join(s.name for s in self.modules[:5]) + (", …" if len(self.modules) > 5 else "")
        raise InputError(f"{self.path}: no module {name!r} in the store (modules: {known})")

    # -- per-row metadata -------------------------------------------------------------------------------
    @cached_property
    def _meta(self) -> pa.Table:
        return read_meta(self.path / IDS_FILE, self.rows)

    @cached_property
    def ids(self) -> list[str]:
        """Row ids, in row order."""
        return self._meta.column("id").to_pylist()

    @cached_property
    def loss(self) -> np.ndarray:
        """Per-row loss (float64), summed over the row's target tokens."""
        return self._meta.column("loss").to_numpy()

    @cached_property
    def tokens(self) -> np.ndarray:
        """Per-row number of target tokens (int64)."""
        return self._meta.column("tokens").to_numpy()

    # -- rows ---------------------------------------------------------------------------------------------
    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / s["file"] for s in self._shards]

    def shard_array(self, i: int) -> np.ndarray:
        """Shard ``i`` as a read-only memmap ``[rows_i, dim]`` of the raw dtype (``uint16`` bits for bf16), for
        callers that want random access; the block readers below use positioned reads instead.

        The last `OPEN_SHARD_MAPS` maps are kept (a new map faults in every page it touches again).
        """
        with self._maps_lock:
            mapped = self._maps.pop(i, None)
            if mapped is None:
                mapped = np.load(self.path / self._shards[i]["file"], mmap_mode="r", allow_pickle=False)
            self._maps[i] = mapped
            while len(self._maps) > OPEN_SHARD_MAPS:
                self._maps.popitem(last=False)
            return mapped

    def read_rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` as float32 ``[stop - start, dim]``, across shard boundaries, written into
        ``out`` when given (float32, that shape), else into a new array."""
        if out is None:
            out = np.empty((max(stop - start, 0), self.dim), dtype=np.float32)
        elif out.dtype != np.float32 or out.shape != (stop - start, self.dim):
            raise ValueError(f"out must be float32 {(stop - start, self.dim)}, got {out.dtype} {out.shape}")
        for offset, shard, row, take in self._pieces(start, stop):
            target = out[offset : offset + take]
            if self.dtype == "float32" and target.flags.c_contiguous:
                self._read_shard(shard, row, target)
            else:
                raw = np.empty((take, self.dim), dtype=RAW_DTYPES[self.dtype])
                raw_to_float32(self._read_shard(shard, row, raw), self.dtype, out=target)
        return out

    def iter_blocks(self, block_rows: int | None = None, *, reuse: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_row, block)``, float32 blocks ``[≤ block_rows, dim]`` in row order.

        Blocks ignore shard boundaries (default ``block_rows`` = the store's ``shard_rows``); peak memory
        is ``O(block_rows × dim)`` floats: one block, or two with ``reuse`` (see `iter_row_ranges`).
        """
        block_rows = block_rows or self.manifest.get("shard_rows") or max(self.rows, 1)
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        ranges = ((start, min(start + block_rows, self.rows)) for start in range(0, self.rows, block_rows))
        yield from self.iter_row_ranges(ranges, reuse=reuse)

    def iter_row_ranges(self, ranges: Iterable[tuple[int, int]], *, reuse: bool = False,
                        raw: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, rows [start, stop))`` as float32 for each ``(start, stop)`` of ``ranges``.

        ``reuse=False``: every block is a new array. ``reuse=True`` (streaming consumers that use each block
        once, e.g. scoring): a block is valid only until the next one is requested and must not be written.
        Two buffers are refilled in turn, the next block by a background thread while the consumer works on
        the current one (reading and float16 → float32 widening overlap the consumer's matrix products; both
        release the GIL). ``raw=True``: the rows as stored (float16, bfloat16 bits as uint16, or float32), not
        widened — for consumers that widen a few rows at a time while they are still in cache; raw blocks
        are always reused (as ``reuse=True``).
        """
        if not reuse and not raw:
            for start, stop in ranges:
                yield start, self.read_rows(start, stop)
            return
        widen = not raw and self.dtype != "float32"
        buffers: list[np.ndarray | None] = [None, None]  # the blocks handed out
        raws: list[np.ndarray | None] = [None, None]  # float16 / bfloat16 blocks as read, before widening

        def grown(held: list, slot: int, rows: int, dtype) -> np.ndarray:
            if held[slot] is None or held[slot].shape[0] < rows:
                held[slot] = np.empty((rows, self.dim), dtype=dtype)
            return held[slot][:rows]

        def load(slot: int, start: int, stop: int) -> np.ndarray:
            out = grown(buffers, slot, stop - start, np.float32 if not raw else RAW_DTYPES[self.dtype])
            target = grown(raws, slot, stop - start, RAW_DTYPES[self.dtype]) if widen else out
            for offset, shard, row, take in self._pieces(start, stop):
                self._read_shard(shard, row, target[offset : offset + take])
            return raw_to_float32(target, self.dtype, out=out) if widen else out

        todo = iter(ranges)  # consumed lazily: a small budget may mean very many ranges
        current = next(todo, None)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dataworth-prefetch") as pool:
            pending = pool.submit(load, 0, *current) if current is not None else None
            slot = 0
            while current is not None:
                block = pending.result()
                following = next(todo, None)
                # the other slot held the previous block, released when the consumer asked for this one
                slot = 1 - slot
                pending = pool.submit(load, slot, *following) if following is not None else None
                yield current[0], block
                current = following

    def raw_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` in the store's on-disk dtype (``uint16`` bits for bfloat16), as a new array."""
        out = np.empty((max(stop - start, 0), self.dim), dtype=RAW_DTYPES[self.dtype])
        for offset, shard, row, take in self._pieces(start, stop):
            self._read_shard(shard, row, out[offset : offset + take])
        return out

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """``(offset from start, shard, first row within the shard, rows)`` of each shard's part of rows
        ``[start, stop)``."""
        if not 0 <= start <= stop <= self.rows:
            raise IndexError(f"rows [{start}, {stop}) out of range for a store of {self.rows} rows")
        shard = max(bisect.bisect_right(self._first_rows, start) - 1, 0)
        row = start
        while row < stop:
            first = self._first_rows[shard]
            take = min(stop, first + self._shards[shard]["rows"]) - row
            yield row - start, shard, row - first, take
            row += take
            shard += 1

    def _shard_file(self, i: int) -> tuple[Any, int]:
        """Shard ``i``'s open file and the byte offset of its first row (the last `OPEN_SHARD_FILES` kept;
        call with ``_maps_lock`` held)."""
        entry = self._files.pop(i, None)
        if entry is None:
            path = self.path / self._shards[i]["file"]
            f = open(path, "rb", buffering=0)  # noqa: SIM115  (kept open, closed on eviction)
            entry = (f, npy_header(f, path)[3])
        self._files[i] = entry
        while len(self._files) > OPEN_SHARD_FILES:
            self._files.popitem(last=False)[1][0].close()
        return entry

    def _read_shard(self, shard: int, row: int, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` (C-contiguous ``[n, dim]`` of the raw dtype) with rows ``row …`` of ``shard``.

        Under the lock, so that no other thread closes the file mid-read (reads come from the page cache; the
        prefetch thread's widening and the consumer's products run outside it)."""
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        target = memoryview(out.reshape(-1).view(np.uint8))
        with self._maps_lock:
            f, data_offset = self._shard_file(shard)
            position = data_offset + row * self.dim * out.itemsize
            done = 0
            while done < len(target):
                got = os.preadv(f.fileno(), [target[done : done + PREAD_CHUNK_BYTES]], position + done)
                if got <= 0:
                    raise InputError(f"{self.path / self._shards[shard]['file']}: ended early (shard truncated "
                                     "after the store was opened)")
                done += got
        return out

    def matrix(self) -> np.ndarray:
        """All rows as one float32 array ``[rows, dim]`` (small stores and tests)."""
        return self.read_rows(0, self.rows)

    def module_rows(self, block: np.ndarray, name: str) -> np.ndarray:
        """View of module ``name`` in a ``[b, dim]`` block as ``[b, k_out, k_in]`` (``in_out`` transposed back)."""
        spec = self.module(name)
        if block.ndim != 2 or block.shape[1] != self.dim:
            raise ValueError(f"block must be [b, {self.dim}], got {list(block.shape)}")
        cols = block[:, spec.columns]
        if spec.layout == "in_out":
            return cols.reshape(len(block), spec.k_in, spec.k_out).transpose(0, 2, 1)
        return cols.reshape(len(block), spec.k_out, spec.k_in)

    # -- safetensors side files ---------------------------------------------------------------------------
    def has(self, relpath: str) -> bool:
        """Whether the store holds the file ``relpath`` (e.g. ``"curvature/kfac.safetensors"``)."""
        return store_file(self.path, relpath).is_file()

    def load_tensors(self, relpath: str) -> dict[str, "torch.Tensor"]:
        """Load a safetensors file of the store (no pickle), checked against its SHA-256 record first."""
        self.check_file(relpath)
        return load_tensors(self.path, relpath)

    def load_tensor_metadata(self, relpath: str) -> dict[str, str]:
        """The string metadata stored with a safetensors file."""
        from safetensors import SafetensorError, safe_open

        target = store_file(self.path, relpath)
        if not target.is_file():
            raise InputError(f"{target}: missing (run the stage that writes {relpath} first)")
        self.check_file(relpath)
        try:
            with safe_open(target, framework="pt") as f:
                return dict(f.metadata() or {})
        except (SafetensorError, OSError) as exc:
            raise InputError(f"{target}: not a readable safetensors file ({exc})") from exc

    def check_file(self, relpath: str) -> None:
        """Check a side file against the manifest's ``files`` record, once per open Store. A file without a
        record (a store from before records, or a file an older dataworth wrote) is read with a one-time
        note; a missing file is left to the reader's own message."""
        if relpath in self._checked or not store_file(self.path, relpath).is_file():
            return
        if not verify_side_file(self.path, relpath, self._records):
            key = str(self.path.resolve())
            if key not in _UNCHECKED_NOTED:
                _UNCHECKED_NOTED.add(key)
                say(f"note: {self.path}: {relpath} has no checksum in the manifest (written by an older dataworth); "
                    "read unchecked — fit again (or extract with --overwrite) to record one")
        self._checked.add(relpath)

    def save_tensors(self, relpath: str, tensors: dict[str, "torch.Tensor"],
                     metadata: dict[str, str] | None = None) -> Path:
        """Write a safetensors file into the store atomically (curvature written by later stages) and record
        its SHA-256 in the manifest, holding the store's writer lock meanwhile."""
        with directory_lock(self.path, "store"):
            target = save_tensors(self.path, relpath, tensors, metadata)
            self._record(relpath, file_record(target))
        self._checked.add(relpath)
        return target

    def _record(self, relpath: str, record: dict[str, Any]) -> None:
        """Add a ``files`` record to the manifest on disk (re-read under the lock: it must still describe these
        rows) and to this Store."""
        current = read_manifest(self.path)
        if store_digest(current) != self.digest:
            raise InputError(f"{self.path}: the store was rewritten since it was opened; open it again")
        records = {**file_records(current, self.path / MANIFEST), relpath: record}
        current[FILES_KEY] = file_entries(records)
        with atomic_path(self.path / MANIFEST) as tmp:
            tmp.write_bytes(manifest_bytes(current))
        self.manifest = current
        self._records = records


def open_store(path: str | os.PathLike, verify: bool = True) -> Store:
    """Open and validate a finished store.

    Checks: manifest format/version, completion, dtype, that module offsets + sizes tile ``[0, dim)``,
    shard names/row counts, each shard's ``.npy`` header and exact size, and (``verify=True``) the SHA-256
    of every shard, shard meta and ``ids.parquet``. ``verify=False`` skips the hashing (huge stores).
    Raises ``InputError`` naming the path / shard for anything wrong.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: no such store directory")
    manifest = read_manifest(path)
    mpath = path / MANIFEST
    shards = parse_shards(manifest, mpath)
    if manifest.get("complete") is not True:
        raise InputError(
            f"{path}: store is incomplete ({len(shards)} shards written); run extract again to resume"
        )
    dim = manifest_field(manifest, "dim", int, mpath)
    rows = manifest_field(manifest, "rows", int, mpath)
    dtype = manifest.get("dtype")
    if dtype not in RAW_DTYPES:
        raise InputError(f"{mpath}: field 'dtype' is {dtype!r}, expected one of {', '.join(RAW_DTYPES)}")
    modules = parse_modules(manifest, dim, mpath)
    if sum(s["rows"] for s in shards) != rows:
        raise InputError(f"{mpath}: field 'rows' is {rows} but the shards hold {sum(s['rows'] for s in shards)}")
    verify_shards(path, shards, dim, dtype, verify)
    ids = manifest.get("ids")
    if not isinstance(ids, dict) or ids.get("file") != IDS_FILE or ids.get("rows") != rows:
        raise InputError(f"{mpath}: field 'ids' must be {{file: {IDS_FILE!r}, rows: {rows}, sha256}}")
    if not (path / IDS_FILE).is_file():
        raise InputError(f"{path / IDS_FILE}: missing (the store is damaged; run extract again)")
    if verify:
        verify_checksum(path / IDS_FILE, IDS_FILE, ids.get("sha256"))
    return Store(path, manifest, modules)


def check_side_file(path: str | os.PathLike, relpath: str) -> None:
    """Check one side file of a store that may still be unfinished (e.g. the PCA covariances a resumed extract
    reuses) against its manifest record; a file without a record is accepted as it is."""
    path = Path(path)
    verify_side_file(path, relpath, file_records(read_manifest(path), path / MANIFEST))
