"""The gradient store: the on-disk contract between extraction and curvature / scoring.

Why a module of its own: every later stage (``fit``, ``score``, ``select``, ``eval``) reads only what
extraction wrote, possibly on another machine, possibly from a store someone else made. So the store is a
small, boring thing — plain ``.npy`` shards, parquet side tables, safetensors for curvature, and one JSON
manifest that is validated on reopen. Nothing is pickled: opening a stranger's store runs no code.

Layout (``DESIGN.md``, "Store on disk")::

    manifest.json                 format, version, complete, rows, dim, dtype, modules, projection,
                                  model, data, config, shard_rows, shards[{file, rows, sha256, first_row,
                                  meta, meta_sha256}], ids{file, rows, sha256} (after finalize)
    shards/NNNNN.npy              [rows, dim] C-order, dtype '<f2' | '<u2' (bfloat16 bits) | '<f4'
    shards/NNNNN.meta.parquet     id (string), loss (float64), tokens (int64), one row per shard row
    ids.parquet                   the shard metas concatenated, one row per store row, same order
    curvature/*.safetensors       written by later stages (``save_tensors``)

Row ``r`` is the concatenation, in manifest module order, of each module's projected gradient
``Ĝ`` (``k_out × k_in``) flattened row-major; ``layout == "in_out"`` means the module stored ``Ĝᵀ``
(``k_in × k_out``, e.g. HF ``Conv1D``), and ``Store.module_rows`` undoes that so callers always see
``[b, k_out, k_in]``.

Completion and resume: a shard is complete iff the manifest lists it. ``write_shard`` writes the ``.npy``
(tmp + ``os.replace``), then the meta parquet, then rewrites the manifest atomically, so a killed run leaves
at worst an unlisted shard, which the next ``StoreWriter`` with the same header deletes and rewrites. The
manifest carries no timestamps and is written canonically (nested header dicts with sorted keys), so a
resumed store is byte-identical to an uninterrupted one.

Rank-local writing (several processes filling one store, ``dataworth.distributed``): shard ``i`` is always
the same rows whoever writes it, so ranks write shard files out of order with `write_shard_files` and list
each finished shard in their own fragment ``manifest.rank-R.json`` (`write_fragment`); one process then
hands the entries to ``StoreWriter.adopt_shards`` in shard order and finalizes. A fragment records the
writer's `identity_digest`, so fragments of another configuration are never adopted.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dataworth.errors import InputError

if TYPE_CHECKING:  # torch is imported lazily: numpy-only readers need not pay for it
    import torch

FORMAT = "dataworth-store"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST = "manifest.json"
IDS_FILE = "ids.parquet"
SHARD_DIR = "shards"
LAYOUTS = ("out_in", "in_out")
HEADER_SECTIONS = ("projection", "model", "data", "config")

# Store dtype name -> dtype of the raw numbers in the .npy file (bfloat16 has no numpy dtype: raw bits).
RAW_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
}
_TMP_SUFFIX = re.compile(r"\.tmp-\d+$")
_SHARD_FILE = re.compile(r"^(\d{5,})\.(npy|meta\.parquet)$")
_RESERVED_KEYS = ("format", "version", "complete", "rows", "dim", "dtype", "shard_rows", "modules",
                  "shards", "ids")
_HASH_CHUNK = 1 << 24  # 16 MiB: hashing a shard never holds more than this in memory
FRAGMENT_FORMAT = "dataworth-store-fragment"
_FRAGMENT_FILE = re.compile(r"^manifest\.rank-(\d+)\.json$")


# ---------------------------------------------------------------------------------------------------------
# bfloat16 <-> float32 (numpy only, bit-exact with torch for every non-NaN value)


def float32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16, returned as the raw ``uint16`` bits.

    bfloat16 is the top 16 bits of a float32. Round-to-nearest-even on the bit pattern ``u``:
    ``bits = (u + 0x7FFF + ((u >> 16) & 1)) >> 16``. Overflow rounds to ±inf, subnormals are kept (as torch
    does on CPU). NaN maps to the canonical quiet NaN ``0x7FC0`` (torch's bit pattern for NaN differs between
    its scalar and vectorised paths, so only "NaN stays NaN" is promised). Non-float32 input is converted to
    float32 first, so float64 input is rounded twice (to float32, then to bfloat16) — the same as
    ``torch.tensor(a, dtype=float32).to(bfloat16)``.
    """
    x = np.ascontiguousarray(a, dtype=np.float32)
    u = x.view(np.uint32)
    # In place on one uint32 temporary (this runs on every shard). Only NaN patterns can wrap around
    # 2**32 in the sum (finite values stay <= 0xFF807FFF); they are overwritten below.
    rounded = (u >> np.uint32(16)) & np.uint32(1)
    rounded += np.uint32(0x7FFF)
    rounded += u
    rounded >>= np.uint32(16)
    bits = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        bits[nan] = np.uint16(0x7FC0)
    return bits


def bf16_bits_to_float32(u: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (``uint16``) to float32 exactly: ``float32 bits = u << 16``."""
    bits = np.asarray(u)
    if bits.dtype != np.uint16:
        raise ValueError(f"bfloat16 bits must be uint16, got {bits.dtype}")
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_store_dtype(rows: np.ndarray, dtype: str) -> np.ndarray:
    """Convert float rows to the raw on-disk dtype of ``dtype`` (via float32; round-to-nearest-even)."""
    x = np.ascontiguousarray(rows, dtype=np.float32)
    if dtype == "bfloat16":
        return float32_to_bf16_bits(x)
    return x.astype(RAW_DTYPES[dtype], copy=False)


def raw_to_float32(raw: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Widen raw on-disk numbers of store dtype ``dtype`` exactly to float32, into ``out`` (same shape) or a
    new array.

    The widening runs through torch's vectorised copy (F16C / AVX on x86): numpy's element-wise half → float
    loop is about 5× slower, and scoring a float16 store is bound by this widening. Passing a reused ``out``
    also avoids the page faults of a fresh large array on every block.
    """
    import torch

    raw = np.asarray(raw)
    if out is None:
        out = np.empty(raw.shape, dtype=np.float32)
    if dtype == "float32":
        np.copyto(out, raw)
        return out
    with warnings.catch_warnings():  # shards are read-only memmaps; torch only reads from this tensor
        warnings.simplefilter("ignore", UserWarning)
        source = torch.from_numpy(raw)
    if dtype == "bfloat16":
        if raw.dtype != np.uint16:
            raise ValueError(f"bfloat16 bits must be uint16, got {raw.dtype}")
        source = source.view(torch.bfloat16)
    torch.from_numpy(out).copy_(source)
    return out


def normalize_dtype(dtype: object) -> str:
    """``"float16" | "bfloat16" | "float32"`` (also accepts ``torch.float16`` etc. and ``"fp16"``-style names)."""
    name = str(dtype).removeprefix("torch.")
    name = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}.get(
        name, name
    )
    if name not in RAW_DTYPES:
        raise InputError(f"store dtype {dtype!r} is not one of {', '.join(RAW_DTYPES)}")
    return name


# ---------------------------------------------------------------------------------------------------------
# Module layout


@dataclass(frozen=True)
class ModuleSpec:
    """Where one module's projected gradient ``Ĝ`` (``k_out × k_in``) lives in a store row.

    Columns ``[offset, offset + size)`` with ``size = k_out * k_in``. ``layout="out_in"``: the columns are
    ``Ĝ`` flattened row-major; ``"in_out"``: they are ``Ĝᵀ`` flattened row-major (weights stored ``in × out``,
    e.g. HF ``Conv1D``).
    """

    name: str
    k_out: int
    k_in: int
    offset: int
    size: int
    layout: str = "out_in"

    @property
    def columns(self) -> slice:
        """The slice of a store row holding this module."""
        return slice(self.offset, self.offset + self.size)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "k_out": self.k_out, "k_in": self.k_in, "offset": self.offset,
                "size": self.size, "layout": self.layout}


def modules_layout(shapes: Iterable[ModuleSpec | Sequence[Any]]) -> list[ModuleSpec]:
    """Assign consecutive offsets, in the given order, to modules given as ``(name, k_out, k_in[, layout])``.

    ``ModuleSpec`` entries are accepted too (their offset/size are recomputed). The result tiles
    ``[0, D)`` with ``D = Σ k_out·k_in``.
    """
    specs: list[ModuleSpec] = []
    offset = 0
    for item in shapes:
        if isinstance(item, ModuleSpec):
            name, k_out, k_in, layout = item.name, item.k_out, item.k_in, item.layout
        else:
            name, k_out, k_in, *rest = item
            layout = rest[0] if rest else "out_in"
        size = int(k_out) * int(k_in)
        specs.append(ModuleSpec(str(name), int(k_out), int(k_in), offset, size, str(layout)))
        offset += size
    check_modules(specs, sum(s.size for s in specs), where="modules")
    return specs


def check_modules(specs: Sequence[ModuleSpec], dim: int, where: str) -> None:
    """Raise ``InputError`` unless the modules have unique names and tile ``[0, dim)`` in order."""
    names: set[str] = set()
    position = 0
    for i, s in enumerate(specs):
        at = f"{where}[{i}] ({s.name!r})"
        if not s.name or s.name in names:
            raise InputError(f"{at}: module name is empty or repeated")
        names.add(s.name)
        if s.layout not in LAYOUTS:
            raise InputError(f"{at}: layout {s.layout!r} is not one of {', '.join(LAYOUTS)}")
        if s.k_out < 1 or s.k_in < 1 or s.size != s.k_out * s.k_in:
            raise InputError(f"{at}: size {s.size} != k_out {s.k_out} × k_in {s.k_in} (both must be >= 1)")
        if s.offset != position:
            raise InputError(f"{at}: offset {s.offset} != {position}; offsets + sizes must tile [0, dim)")
        position += s.size
    if position != dim:
        raise InputError(f"{where}: module sizes add up to {position} but dim is {dim}")


# ---------------------------------------------------------------------------------------------------------
# Small file helpers: atomic writes, hashing, canonical JSON


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield ``path.tmp-<pid>`` to write; on success fsync it and ``os.replace`` it onto ``path``."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: some filesystems refuse fsync on directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _HashingWriter:
    """File-like object that hashes what it writes; ``np.lib.format.write_array`` streams through it."""

    def __init__(self, fh):
        self._fh = fh
        self.sha256 = hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self._fh.write(data)


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _canonical(value: Any) -> Any:
    """JSON round trip with sorted dict keys: equal content ⇒ equal bytes, tuples become lists."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"store header must be plain JSON (no NaN, no objects): {exc}") from exc


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Manifest text: one top-level key per line and one line per module / shard entry.

    Compact because the manifest is rewritten after every shard; readable because people open it.
    """

    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)

    lines = []
    for key, value in manifest.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            entries = ",\n".join(f"    {dump(v)}" for v in value)
            lines.append(f"  {dump(key)}: [\n{entries}\n  ]")
        else:
            lines.append(f"  {dump(key)}: {dump(value)}")
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode("utf-8")


def first_difference(old: Any, new: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key (``model.fingerprint``, ``modules[2].k_out``) where two JSON-like values differ,
    with both values; None when equal. Lists and tuples compare alike; ``1`` and ``1.0`` differ.
    Shared by store resumption, distributed agreement checks and the retrain cache."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(new) + [k for k in old if k not in new]:
            sub = f"{key}.{k}" if key else str(k)
            if k not in old or k not in new:
                return sub, old.get(k, "<missing>"), new.get(k, "<missing>")
            found = first_difference(old[k], new[k], sub)
            if found:
                return found
        return None
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        for i, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{key}[{i}]")
            if found:
                return found
        if len(old) != len(new):
            return f"{key} length", len(old), len(new)
        return None
    if old != new or type(old) is not type(new):
        return key, old, new
    return None


_first_difference = first_difference


def _short(value: Any, limit: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shard_name(index: int) -> str:
    return f"{SHARD_DIR}/{index:05d}.npy"


def _meta_name(index: int) -> str:
    return f"{SHARD_DIR}/{index:05d}.meta.parquet"


def _check_relpath(store: Path, relpath: str) -> Path:
    """Resolve ``relpath`` inside the store; refuse absolute paths and ``..`` (a store must stay a box)."""
    rel = Path(relpath)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise InputError(f"{store}: path {relpath!r} must be relative and stay inside the store")
    return store / rel


# ---------------------------------------------------------------------------------------------------------
# Shard I/O


def _write_npy(path: Path, raw: np.ndarray) -> str:
    """Write ``raw`` as a plain ``.npy`` atomically; return its SHA-256."""
    with _atomic_target(path) as tmp, open(tmp, "wb") as fh:
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
    with _atomic_target(path) as tmp:
        pq.write_table(table, tmp)
    return file_sha256(path)


def _read_meta(path: Path, rows: int) -> pa.Table:
    """Read a meta/ids parquet, checking its columns, types and row count."""
    if not path.is_file():
        raise InputError(f"{path}: missing (the store is damaged; run extract again with --overwrite)")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: not a readable parquet file ({exc})") from exc
    expected = {"id": pa.string(), "loss": pa.float64(), "tokens": pa.int64()}
    for name, typ in expected.items():
        if name not in table.column_names or table.schema.field(name).type != typ:
            raise InputError(f"{path}: column '{name}' missing or not {typ}")
    if table.num_rows != rows:
        raise InputError(f"{path}: {table.num_rows} rows but the manifest says {rows}")
    return table.select(list(expected))


def _check_npy(path: Path, rel: str, rows: int, dim: int, raw_dtype: np.dtype) -> None:
    """Check a shard's ``.npy`` header (shape, dtype, C order) and exact file size without reading data."""
    if not path.is_file():
        raise InputError(f"{path}: missing shard {rel} (the store is damaged; run extract again)")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, fortran, dtype = readers[version](f)
        except (ValueError, OSError) as exc:
            raise InputError(f"{path}: not a valid .npy file ({exc})") from exc
        header_end = f.tell()
    if shape != (rows, dim) or fortran or dtype != raw_dtype:
        raise InputError(
            f"{path}: holds {shape} {dtype}{' (Fortran order)' if fortran else ''}, "
            f"manifest says ({rows}, {dim}) {raw_dtype}"
        )
    expected = header_end + rows * dim * raw_dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise InputError(f"{path}: size {actual} bytes, expected {expected} (truncated or padded shard {rel})")


def _verify_checksum(path: Path, rel: str, sha256: str) -> None:
    if file_sha256(path) != sha256:
        raise InputError(f"{path}: checksum error in {rel} (sha256 differs from the manifest)")


# ---------------------------------------------------------------------------------------------------------
# Manifest reading and validation


def _read_manifest(path: Path) -> dict[str, Any]:
    """Read ``manifest.json``; InputError if unreadable, not ours, or of an unsupported version."""
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"{path}: not a gradient store (no {MANIFEST})") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{mpath}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise InputError(f"{mpath}: field 'format' is {got!r}, expected {FORMAT!r} (not a gradient store)")
    if manifest.get("version") not in SUPPORTED_VERSIONS:
        raise InputError(
            f"{mpath}: field 'version' is {manifest.get('version')!r}; this dataworth reads store versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
        )
    return manifest


def _field(manifest: dict[str, Any], key: str, kind: type | tuple[type, ...], mpath: Path) -> Any:
    value = manifest.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InputError(f"{mpath}: field '{key}' is missing or has the wrong type ({value!r})")
    return value


def _parse_modules(manifest: dict[str, Any], dim: int, mpath: Path) -> list[ModuleSpec]:
    raw = _field(manifest, "modules", list, mpath)
    specs = []
    for i, m in enumerate(raw):
        try:
            specs.append(ModuleSpec(str(m["name"]), int(m["k_out"]), int(m["k_in"]), int(m["offset"]),
                                    int(m["size"]), str(m.get("layout", "out_in"))))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{mpath}: field 'modules[{i}]' is malformed ({exc!r})") from exc
    check_modules(specs, dim, where=f"{mpath}: modules")
    return specs


def _parse_shards(manifest: dict[str, Any], mpath: Path) -> list[dict[str, Any]]:
    """Check the shard list: expected file names (no path tricks), positive row counts, contiguous rows."""
    shards = _field(manifest, "shards", list, mpath)
    first_row = 0
    for i, s in enumerate(shards):
        at = f"{mpath}: field 'shards[{i}]'"
        if not isinstance(s, dict):
            raise InputError(f"{at} is not an object")
        if s.get("file") != _shard_name(i) or s.get("meta") != _meta_name(i):
            raise InputError(f"{at}: files {s.get('file')!r}/{s.get('meta')!r}, expected {_shard_name(i)!r}")
        rows = s.get("rows")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
            raise InputError(f"{at}: 'rows' must be a positive integer, got {rows!r}")
        if s.get("first_row") != first_row:
            raise InputError(f"{at}: 'first_row' is {s.get('first_row')!r}, expected {first_row}")
        for key in ("sha256", "meta_sha256"):
            if not isinstance(s.get(key), str):
                raise InputError(f"{at}: '{key}' missing")
        first_row += rows
    return shards


def _verify_shards(path: Path, shards: list[dict[str, Any]], dim: int, dtype: str, verify: bool) -> None:
    for s in shards:
        _check_npy(path / s["file"], s["file"], s["rows"], dim, RAW_DTYPES[dtype])
        meta = path / s["meta"]
        if not meta.is_file():
            raise InputError(f"{meta}: missing shard metadata {s['meta']} (the store is damaged)")
        if verify:
            _verify_checksum(path / s["file"], s["file"], s["sha256"])
            _verify_checksum(meta, s["meta"], s["meta_sha256"])


# ---------------------------------------------------------------------------------------------------------
# Reading


OPEN_SHARD_MAPS = 64  # memory maps a Store keeps open (each holds one file descriptor)
# Python-side bookkeeping of the prefetching reader (thread, future, queue objects): memory budgets reserve it.
PREFETCH_OVERHEAD_BYTES = 48 * 1024  # measured 27–38 KiB beyond the second block (tracemalloc)


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

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, rows={self.rows}, dim={self.dim}, dtype={self.dtype!r})"

    def __len__(self) -> int:
        return self.rows

    @property
    def fingerprint(self) -> str | None:
        """The model fingerprint the store was extracted with."""
        return self.manifest.get("model", {}).get("fingerprint")

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
        return _read_meta(self.path / IDS_FILE, self.rows)

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
        """Shard ``i`` as a read-only memmap ``[rows_i, dim]`` of the raw dtype (``uint16`` bits for bf16).

        The last `OPEN_SHARD_MAPS` maps are kept: a new map must fault in every page it touches again (a
        float32 GEMV over page-cached shards: 0.09 s fresh vs 0.067 s kept, for 1.6 GB), and each query batch
        or curvature pass reads every shard. Kept maps pin no memory (clean page-cache pages).
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
        for offset, raw in self._raw_pieces(start, stop):
            raw_to_float32(raw, self.dtype, out=out[offset : offset + len(raw)])
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
        release the GIL); a float32 range inside one shard is a read-only view of the memory-mapped shard.
        ``raw=True``: the rows as stored (`raw_rows`: float16, bfloat16 bits as uint16, or float32), not
        widened — for consumers that widen a few rows at a time while they are still in cache.
        """
        if raw:
            for start, stop in ranges:
                yield start, self.raw_rows(start, stop)
            return
        if not reuse:
            for start, stop in ranges:
                yield start, self.read_rows(start, stop)
            return
        buffers: list[np.ndarray | None] = [None, None]

        def load(slot: int, start: int, stop: int) -> np.ndarray:
            view = self._shard_view(start, stop) if self.dtype == "float32" else None
            if view is not None:
                return view
            if buffers[slot] is None or buffers[slot].shape[0] < stop - start:
                buffers[slot] = np.empty((stop - start, self.dim), dtype=np.float32)
            return self.read_rows(start, stop, out=buffers[slot][: stop - start])

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
        """Rows ``[start, stop)`` in the store's on-disk dtype (``uint16`` bits for bfloat16): a read-only view
        of the memory-mapped shard when the range lies in one shard, else a new array joining the pieces."""
        pieces = [raw for _offset, raw in self._raw_pieces(start, stop)]
        if not pieces:
            return np.empty((0, self.dim), dtype=RAW_DTYPES[self.dtype])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _raw_pieces(self, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(offset from start, raw memory-mapped rows)`` of each shard's part of rows ``[start, stop)``."""
        if not 0 <= start <= stop <= self.rows:
            raise IndexError(f"rows [{start}, {stop}) out of range for a store of {self.rows} rows")
        shard = max(bisect.bisect_right(self._first_rows, start) - 1, 0)
        row = start
        while row < stop:
            first = self._first_rows[shard]
            take = min(stop, first + self._shards[shard]["rows"]) - row
            yield row - start, self.shard_array(shard)[row - first : row - first + take]
            row += take
            shard += 1

    def _shard_view(self, start: int, stop: int) -> np.ndarray | None:
        """Rows ``[start, stop)`` of a float32 store as a read-only view of one shard, or None across shards."""
        pieces = list(self._raw_pieces(start, stop))
        return pieces[0][1] if len(pieces) == 1 else None

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
        return _check_relpath(self.path, relpath).is_file()

    def load_tensors(self, relpath: str) -> dict[str, "torch.Tensor"]:
        """Load a safetensors file of the store (no pickle)."""
        return load_tensors(self.path, relpath)

    def load_tensor_metadata(self, relpath: str) -> dict[str, str]:
        """The string metadata stored with a safetensors file."""
        from safetensors import safe_open

        target = _check_relpath(self.path, relpath)
        if not target.is_file():
            raise InputError(f"{target}: missing (run the stage that writes {relpath} first)")
        with safe_open(target, framework="pt") as f:
            return dict(f.metadata() or {})

    def save_tensors(self, relpath: str, tensors: dict[str, "torch.Tensor"],
                     metadata: dict[str, str] | None = None) -> Path:
        """Write a safetensors file into the store atomically (curvature written by later stages)."""
        return save_tensors(self.path, relpath, tensors, metadata)


def save_tensors(store_path: Path, relpath: str, tensors: dict[str, "torch.Tensor"],
                 metadata: dict[str, str] | None = None) -> Path:
    """Atomically write ``tensors`` to ``store_path/relpath`` as safetensors (contiguous copies, CPU)."""
    from safetensors.torch import save_file

    target = _check_relpath(Path(store_path), relpath)
    if target.suffix != ".safetensors":
        raise ValueError(f"{relpath!r}: tensor files must end in .safetensors")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map str to str")
    target.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    with _atomic_target(target) as tmp:
        save_file(plain, str(tmp), metadata=metadata)
        _sort_safetensors_metadata(tmp)
    return target


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a safetensors header with ``__metadata__`` keys sorted.

    safetensors serialises ``__metadata__`` from a Rust ``HashMap``, whose order changes from call to call;
    sorting makes equal inputs give equal bytes (a resumed store must be byte-identical). The header is
    ``u64 little-endian length`` + JSON padded with spaces; only the metadata order changes, so the
    compact re-serialisation has the same length and is patched in place.
    """
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        metadata = header.get("__metadata__")
        if not metadata or len(metadata) < 2:
            return
        header["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # an escaping difference from serde_json; keep the library's bytes
            return
        f.seek(8)
        f.write(text + b" " * (length - len(text)))


def load_tensors(store_path: Path, relpath: str) -> dict[str, "torch.Tensor"]:
    """Load ``store_path/relpath`` (safetensors); InputError naming the file if it is missing or broken."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    target = _check_relpath(Path(store_path), relpath)
    if not target.is_file():
        raise InputError(f"{target}: missing (run the stage that writes {relpath} first)")
    try:
        return load_file(str(target))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{target}: not a readable safetensors file ({exc})") from exc


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
    manifest = _read_manifest(path)
    mpath = path / MANIFEST
    shards = _parse_shards(manifest, mpath)
    if manifest.get("complete") is not True:
        raise InputError(
            f"{path}: store is incomplete ({len(shards)} shards written); run extract again to resume"
        )
    dim = _field(manifest, "dim", int, mpath)
    rows = _field(manifest, "rows", int, mpath)
    dtype = manifest.get("dtype")
    if dtype not in RAW_DTYPES:
        raise InputError(f"{mpath}: field 'dtype' is {dtype!r}, expected one of {', '.join(RAW_DTYPES)}")
    modules = _parse_modules(manifest, dim, mpath)
    if sum(s["rows"] for s in shards) != rows:
        raise InputError(f"{mpath}: field 'rows' is {rows} but the shards hold {sum(s['rows'] for s in shards)}")
    _verify_shards(path, shards, dim, dtype, verify)
    ids = manifest.get("ids")
    if not isinstance(ids, dict) or ids.get("file") != IDS_FILE or ids.get("rows") != rows:
        raise InputError(f"{mpath}: field 'ids' must be {{file: {IDS_FILE!r}, rows: {rows}, sha256}}")
    if not (path / IDS_FILE).is_file():
        raise InputError(f"{path / IDS_FILE}: missing (the store is damaged; run extract again)")
    if verify:
        _verify_checksum(path / IDS_FILE, IDS_FILE, ids.get("sha256"))
    return Store(path, manifest, modules)


# ---------------------------------------------------------------------------------------------------------
# Writing


def _store_entries(path: Path) -> list[Path]:
    return sorted(path.iterdir()) if path.is_dir() else []


def _tmp_files(path: Path) -> list[Path]:
    """``*.tmp-<pid>`` files anywhere in the store: half-written files of a killed run."""
    return sorted(p for p in path.rglob("*.tmp-*") if p.is_file() and _TMP_SUFFIX.search(p.name))


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
        self._open(overwrite, verify)

    # -- construction -------------------------------------------------------------------------------------
    @staticmethod
    def _check_header(header: dict[str, Any]) -> dict[str, Any]:
        missing = [k for k in HEADER_SECTIONS if not isinstance(header.get(k), dict)]
        if missing:
            raise ValueError(f"store header needs dicts for {', '.join(missing)}")
        clash = [k for k in header if k in _RESERVED_KEYS]
        if clash:
            raise ValueError(f"store header keys {clash} are reserved for the manifest")
        extras = sorted(k for k in header if k not in HEADER_SECTIONS)
        return {k: _canonical(header[k]) for k in (*HEADER_SECTIONS, *extras)}

    def _identity(self) -> dict[str, Any]:
        """What must match for a resume: everything but the shard list and completion."""
        return {"dim": self.dim, "dtype": self.dtype, "shard_rows": self.shard_rows,
                "modules": [m.to_json() for m in self.modules], **self._header}

    def _open(self, overwrite: bool, verify: bool) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path}: exists and is not a directory")
        entries = _store_entries(self.path)
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
            manifest = _read_manifest(self.path)
        except InputError:
            if overwrite and self._is_ours(self.path / MANIFEST):
                self._remove_store_files()
                self._create()
                return
            raise
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
        """Delete what a store consists of: shards, ``ids.parquet``, every ``*.safetensors`` (curvature,
        covariances) and tmp file, then directories left empty; the manifest goes last, so a crash here
        leaves something still recognisable as a store. Files of other kinds are left alone."""
        shutil.rmtree(self.path / SHARD_DIR, ignore_errors=True)
        (self.path / IDS_FILE).unlink(missing_ok=True)
        for e in _tmp_files(self.path) + sorted(self.path.rglob("*.safetensors")) + fragment_paths(self.path):
            e.unlink(missing_ok=True)
        for d in sorted((d for d in self.path.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
            if not any(d.iterdir()):
                d.rmdir()
        (self.path / MANIFEST).unlink()

    def _create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_manifest()  # first, so the directory is recognisably a store from now on
        (self.path / SHARD_DIR).mkdir(exist_ok=True)

    def _resume(self, manifest: dict[str, Any], verify: bool) -> None:
        existing = {k: manifest.get(k, "<missing>") for k in self._identity()}
        extra = {k: manifest[k] for k in manifest if k not in existing and k not in _RESERVED_KEYS}
        diff = _first_difference({**existing, **extra}, self._identity())
        if diff:
            key, old, new = diff
            raise InputError(
                f"{self.path}: store {key} {_short(old)} != requested {_short(new)}; "
                "pass --overwrite to replace the store"
            )
        mpath = self.path / MANIFEST
        shards = _parse_shards(manifest, mpath)
        _verify_shards(self.path, shards, self.dim, self.dtype, verify)
        self._shards = shards
        self._complete = manifest.get("complete") is True
        self._ids_entry = manifest.get("ids") if self._complete else None
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Delete files a killed run left behind: tmp files and shards the manifest does not list."""
        shard_dir = self.path / SHARD_DIR
        shard_dir.mkdir(exist_ok=True)
        for e in _store_entries(shard_dir) if self._prune else []:
            m = _SHARD_FILE.match(e.name)
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
        return manifest

    def _write_manifest(self) -> None:
        data = _manifest_bytes(self._manifest())
        with _atomic_target(self.path / MANIFEST) as tmp:
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
            if item["file"] != _shard_name(index) or item["meta"] != _meta_name(index):
                raise InputError(f"{self.path}: shard entry {item['file']!r} adopted as shard {index} "
                                 f"(expected {_shard_name(index)!r}); shards must be adopted in order")
            item["first_row"] = first_row
            first_row += int(item["rows"])
            added.append(item)
        _verify_shards(self.path, added, self.dim, self.dtype, verify)
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
        """Atomically write a safetensors file under the store (e.g. ``"curvature/kfac.safetensors"``)."""
        return save_tensors(self.path, relpath, tensors, metadata)

    def finalize(self, verify: bool = False) -> Store:
        """Write ``ids.parquet`` (shard metas concatenated), mark the store complete, and open it.

        ``verify=True`` re-hashes every shard on the way (they were hashed while written, so off by default).
        """
        tables = [_read_meta(self.path / s["meta"], s["rows"]) for s in self._shards]
        empty = _meta_table([], np.zeros(0, np.float64), np.zeros(0, np.int64))
        table = pa.concat_tables(tables) if tables else empty
        sha = _write_parquet(self.path / IDS_FILE, table.combine_chunks())
        self._ids_entry = {"file": IDS_FILE, "rows": self.done_rows, "sha256": sha}
        self._complete = True
        self._write_manifest()
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


# ---------------------------------------------------------------------------------------------------------
# Rank-local writing: shard files out of order, per-rank fragments


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
    sha = _write_npy(path / _shard_name(index), raw)
    meta_sha = _write_parquet(path / _meta_name(index), _meta_table(ids, loss, tokens))
    return {"file": _shard_name(index), "rows": n, "sha256": sha, "meta": _meta_name(index), "meta_sha256": meta_sha}


def fragment_name(rank: int) -> str:
    """File name of rank ``rank``'s fragment: ``manifest.rank-R.json``."""
    return f"manifest.rank-{int(rank)}.json"


def fragment_paths(path: str | os.PathLike) -> list[Path]:
    """The fragment files in a store directory, by rank."""
    path = Path(path)
    found = [(int(m.group(1)), e) for e in _store_entries(path) if (m := _FRAGMENT_FILE.match(e.name))]
    return [e for _rank, e in sorted(found)]


def write_fragment(path: str | os.PathLike, rank: int, identity: str, shards: Sequence[dict[str, Any]],
                   extra: dict[str, Any] | None = None) -> Path:
    """Atomically (re)write rank ``rank``'s fragment listing its finished ``shards`` (entries with an
    ``index``), tagged with the writer's ``identity`` digest."""
    body = {"format": FRAGMENT_FORMAT, "version": VERSION, "rank": int(rank), "identity": identity,
            **(extra or {}), "shards": sorted(shards, key=lambda e: e["index"])}
    target = Path(path) / fragment_name(rank)
    with _atomic_target(target) as tmp:
        tmp.write_bytes(_manifest_bytes(body))
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
            if not isinstance(index, int) or entry.get("file") != _shard_name(index) or entry.get("meta") != _meta_name(index):
                raise InputError(f"{fpath}: field 'shards[{i}]' is malformed")
            if index in out and out[index]["sha256"] != entry.get("sha256"):
                raise InputError(f"{fpath}: shard {index} listed with a different sha256 than in another fragment")
            out[index] = {**entry, "writer": body.get("rank")}
    return out


def shard_entry_is_whole(path: str | os.PathLike, entry: dict[str, Any], dim: int, dtype: str) -> bool:
    """Whether the files of a fragment entry exist with the recorded size and SHA-256."""
    try:
        _verify_shards(Path(path), [entry], dim, dtype, verify=True)
    except InputError:
        return False
    return True
