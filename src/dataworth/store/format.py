"""The gradient store: the on-disk contract between extraction and curvature / scoring.

Why a module of its own: every later stage (``fit``, ``score``, ``select``, ``eval``) reads only what
extraction wrote, possibly on another machine, possibly from a store someone else made. So the store is a
small, boring thing — plain ``.npy`` shards, parquet side tables, safetensors for curvature, and one JSON
manifest that is validated on reopen. Nothing is pickled: opening a stranger's store runs no code.

Layout (``docs/design.md``, "Store on disk")::

    manifest.json                 format, version, complete, rows, dim, dtype, modules, projection,
                                  model, data, config, shard_rows, shards[{file, rows, sha256, first_row,
                                  meta, meta_sha256}], ids{file, rows, sha256} (after finalize),
                                  files[{file, sha256, size}] (every other file the store holds)
    shards/NNNNN.npy              [rows, dim] C-order, dtype '<f2' | '<u2' (bfloat16 bits) | '<f4'
    shards/NNNNN.meta.parquet     id (string), loss (float64), tokens (int64), one row per shard row
    ids.parquet                   the shard metas concatenated, one row per store row, same order
    curvature/*.safetensors       KFAC factors (extract) and fitted curvatures (``fit``)
    covariance/…, projection/…    per-shard covariance partials, PCA covariances (extract)
    nonfinite.json                ids of rows whose gradient was not finite (``--skip-nonfinite``)
    .dataworth.lock               while a writer runs: its pid (`dataworth.util.acquire_directory_lock`)

Every file is covered by a SHA-256 recorded when it was written and checked when it is read: shards, metas
and ids in their own entries, all other files in ``files`` (a store written before ``files`` existed is
read with a note that its side files are unchecked). ``store_digest`` — a hash of the manifest without
``files`` — names the rows a store holds; scores record it so they are never joined with another store.

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

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dataworth.errors import InputError, one_line
from dataworth.util import verify_file

FORMAT = "dataworth-store"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST = "manifest.json"
IDS_FILE = "ids.parquet"
SHARD_DIR = "shards"
LAYOUTS = ("out_in", "in_out")
HEADER_SECTIONS = ("projection", "model", "data", "config")
# Side files later stages read: KFAC factors of the projected gradients (extract, dw.watch), the full-size
# covariances of a PCA first pass and the projections' own covariances.
KFAC_FILE = "curvature/kfac_factors.safetensors"
PCA_FILE = "projection/pca.safetensors"
FULL_COV_FILE = "covariance/full.safetensors"

# Store dtype name -> dtype of the raw numbers in the .npy file (bfloat16 has no numpy dtype: raw bits).
RAW_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
}
STORE_DTYPES = tuple(RAW_DTYPES)
TMP_FILE = re.compile(r"\.tmp-\d+$")
SHARD_FILE = re.compile(r"^(\d{5,})\.(npy|meta\.parquet)$")
FILES_KEY = "files"
RESERVED_KEYS = ("format", "version", "complete", "rows", "dim", "dtype", "shard_rows", "modules",
                 "shards", "ids", FILES_KEY)
# What a store writer owns (and ``--overwrite`` may delete): store-relative paths, tmp suffix stripped.
# Anything else in the directory belongs to the user and is never touched.
OWNED_FILE = re.compile(
    r"^(manifest\.json|manifest\.rank-\d+\.json|ids\.parquet|nonfinite\.json"
    r"|shards/\d{5,}\.(npy|meta\.parquet)|curvature/[^/]+\.safetensors|covariance/partial/\d{5,}\.safetensors"
    r"|covariance/full\.safetensors|projection/pca\.safetensors)$"
)
OWNED_DIRS = ("shards", "curvature", "covariance/partial", "covariance", "projection")
DAMAGED_REMEDY = "the store is damaged; run extract again with --overwrite to rebuild it"
FRAGMENT_FORMAT = "dataworth-store-fragment"
FRAGMENT_FILE = re.compile(r"^manifest\.rank-(\d+)\.json$")


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
    with warnings.catch_warnings():  # raw may be a read-only array; torch only reads from this tensor
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


def canonical_json(value: Any) -> Any:
    """JSON round trip with sorted dict keys: equal content ⇒ equal bytes, tuples become lists."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"store header must be plain JSON (no NaN, no objects): {exc}") from exc


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
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


def shard_file(index: int) -> str:
    return f"{SHARD_DIR}/{index:05d}.npy"


def meta_file(index: int) -> str:
    return f"{SHARD_DIR}/{index:05d}.meta.parquet"


def is_owned_file(relpath: str) -> bool:
    """Whether a store-relative path is one a store writer writes (`OWNED_FILE`; ``*.tmp-<pid>`` of one too)."""
    return bool(OWNED_FILE.match(TMP_FILE.sub("", relpath)))


def store_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest without ``files``: equal exactly when two stores hold the same rows (header,
    modules, every shard's and the ids' checksums) — fitting a curvature does not change it."""
    body = {k: v for k, v in manifest.items() if k != FILES_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def file_records(manifest: dict[str, Any], mpath: Path) -> dict[str, dict[str, Any]]:
    """``{relpath: {sha256, size}}`` from the manifest's ``files`` list (empty for stores written before it)."""
    raw = manifest.get(FILES_KEY, [])
    if not isinstance(raw, list):
        raise InputError(f"{mpath}: field '{FILES_KEY}' is not a list; {DAMAGED_REMEDY}")
    records = {}
    for i, entry in enumerate(raw):
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("size"), int)):
            raise InputError(f"{mpath}: field '{FILES_KEY}[{i}]' must be {{file, sha256, size}}; {DAMAGED_REMEDY}")
        records[entry["file"]] = {"sha256": entry["sha256"], "size": entry["size"]}
    return records


def file_entries(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The manifest's ``files`` list for ``records``, sorted by path (equal records ⇒ equal bytes)."""
    return [{"file": rel, **records[rel]} for rel in sorted(records)]


def store_file(store: Path, relpath: str) -> Path:
    """Resolve ``relpath`` inside the store; refuse absolute paths and ``..`` (a store must stay a box)."""
    rel = Path(relpath)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise InputError(f"{store}: path {relpath!r} must be relative and stay inside the store")
    return store / rel


def read_meta(path: Path, rows: int) -> pa.Table:
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


def npy_header(f, path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data offset)`` of the ``.npy`` file open as ``f`` (read from its start)."""
    try:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = readers[version](f)
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: not a valid .npy file ({exc})") from exc
    return shape, fortran, dtype, f.tell()


def check_npy(path: Path, rel: str, rows: int, dim: int, raw_dtype: np.dtype) -> None:
    """Check a shard's ``.npy`` header (shape, dtype, C order) and exact file size without reading data."""
    if not path.is_file():
        raise InputError(f"{path}: missing shard {rel} (the store is damaged; run extract again)")
    with open(path, "rb") as f:
        shape, fortran, dtype, header_end = npy_header(f, path)
    if shape != (rows, dim) or fortran or dtype != raw_dtype:
        raise InputError(
            f"{path}: holds {shape} {dtype}{' (Fortran order)' if fortran else ''}, "
            f"manifest says ({rows}, {dim}) {raw_dtype}"
        )
    expected = header_end + rows * dim * raw_dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise InputError(f"{path}: size {actual} bytes, expected {expected} (truncated or padded shard {rel})")


def verify_checksum(path: Path, rel: str, sha256: str) -> None:
    """InputError naming ``rel`` unless the file's SHA-256 is the one the manifest lists."""
    verify_file(path, rel, sha256, source="the manifest", remedy=DAMAGED_REMEDY)


def verify_side_file(store: Path, rel: str, records: dict[str, dict[str, Any]]) -> bool:
    """Check a side file (curvature, covariances, …) against its ``files`` record; False when none is recorded
    (a store written before records existed) so the caller can say the file is unchecked."""
    record = records.get(rel)
    if record is None:
        return False
    verify_file(store_file(store, rel), rel, record, source=f"{store / MANIFEST}",
                remedy=f"re-run the stage that writes {rel} (or extract with --overwrite)")
    return True


def read_manifest(path: Path) -> dict[str, Any]:
    """Read ``manifest.json``; InputError if unreadable, not ours, or of an unsupported version."""
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"{path}: not a gradient store (no {MANIFEST})") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{mpath}: not valid JSON ({one_line(exc)}); {DAMAGED_REMEDY}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise InputError(f"{mpath}: field 'format' is {got!r}, expected {FORMAT!r} (not a gradient store)")
    if manifest.get("version") not in SUPPORTED_VERSIONS:
        raise InputError(
            f"{mpath}: field 'version' is {manifest.get('version')!r}; this dataworth reads store versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
        )
    return manifest


def manifest_field(manifest: dict[str, Any], key: str, kind: type | tuple[type, ...], mpath: Path) -> Any:
    value = manifest.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InputError(f"{mpath}: field '{key}' is missing or has the wrong type ({value!r})")
    return value


def parse_modules(manifest: dict[str, Any], dim: int, mpath: Path) -> list[ModuleSpec]:
    raw = manifest_field(manifest, "modules", list, mpath)
    specs = []
    for i, m in enumerate(raw):
        try:
            specs.append(ModuleSpec(str(m["name"]), int(m["k_out"]), int(m["k_in"]), int(m["offset"]),
                                    int(m["size"]), str(m.get("layout", "out_in"))))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{mpath}: field 'modules[{i}]' is malformed ({exc!r})") from exc
    check_modules(specs, dim, where=f"{mpath}: modules")
    return specs


def parse_shards(manifest: dict[str, Any], mpath: Path) -> list[dict[str, Any]]:
    """Check the shard list: expected file names (no path tricks), positive row counts, contiguous rows."""
    shards = manifest_field(manifest, "shards", list, mpath)
    first_row = 0
    for i, s in enumerate(shards):
        at = f"{mpath}: field 'shards[{i}]'"
        if not isinstance(s, dict):
            raise InputError(f"{at} is not an object")
        if s.get("file") != shard_file(i) or s.get("meta") != meta_file(i):
            raise InputError(f"{at}: files {s.get('file')!r}/{s.get('meta')!r}, expected {shard_file(i)!r}")
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


def verify_shards(path: Path, shards: list[dict[str, Any]], dim: int, dtype: str, verify: bool) -> None:
    for s in shards:
        check_npy(path / s["file"], s["file"], s["rows"], dim, RAW_DTYPES[dtype])
        meta = path / s["meta"]
        if not meta.is_file():
            raise InputError(f"{meta}: missing shard metadata {s['meta']} (the store is damaged)")
        if verify:
            verify_checksum(path / s["file"], s["file"], s["sha256"])
            verify_checksum(meta, s["meta"], s["meta_sha256"])
