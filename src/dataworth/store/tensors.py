"""Safetensors side files of a store (curvature, covariances, PCA), written atomically with sorted metadata.

Never pickle: a store someone else made must be safe to open. Paths stay inside the store (`store_file`).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from dataworth.errors import InputError
from dataworth.store.format import store_file
from dataworth.util import atomic_path

if TYPE_CHECKING:  # torch is imported lazily: numpy-only readers need not pay for it
    import torch


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
