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

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: numpy-only readers need not pay for it
    import torch

import json
import struct
from pathlib import Path

from dataworth.errors import InputError
from dataworth.store.format import store_file
from dataworth.util import atomic_path


def save_tensors(store_path: Path, relpath: str, tensors: dict[str, "torch.Tensor"],
                 metadata: dict[str, str] | None = None) -> Path:
    """Atomically write ``tensors`` to ``store_path/relpath`` as safetensors (contiguous copies, CPU)."""
    from safetensors.torch import save_file

    target = store_file(Path(store_path), relpath)
    if target.suffix != ".safetensors":
        raise ValueError(f"{relpath!r}: tensor files must end in .safetensors")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map str to str")
    target.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    with atomic_path(target) as tmp:
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

    target = store_file(Path(store_path), relpath)
    if not target.is_file():
        raise InputError(f"{target}: missing (run the stage that writes {relpath} first)")
    try:
        return load_file(str(target))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{target}: not a readable safetensors file ({exc})") from exc
