"""Several processes (ranks), one result: the data-parallel plumbing of extract, fit and score.

Why a module of its own: every stage must give the *same* answer whether it runs in one process or under
``torchrun --nproc-per-node N -m dataworth …`` / ``accelerate launch -m dataworth …`` on one or many
machines. torch.distributed is the engine (we do not write our own); this module holds the few decisions
that make the result independent of the world size:

- **The shard is the unit of work.** Shard ``i`` covers dataset rows ``[i·R, (i+1)·R)`` (``R`` =
  ``shard_rows``) and rank ``r`` of ``W`` owns the shards ``i ≡ r (mod W)`` (`owned_shards`). A shard's
  rows do not depend on who computes it, so an ``N``-rank store is the same set of files as a
  single-process store, a killed run resumes with any world size, and partial stores of different world
  sizes merge by construction.
- **Sums are reduced, then divided by global counts.** Covariances (PCA first pass), second moments
  (``raw``), EKFAC eigenvalue sums: each rank sums over its rows in float64, `all_reduce_sums` adds the
  partial sums, and every rank divides by the global count.
- **Top-k is merged exactly.** Each rank keeps its local top-k per query; `merge_topk` orders the union by
  ``(score, global row)``, so ties go to the lower store row exactly as in one process.
- **Ranks agree before any work.** `check_agreement` gathers every rank's configuration and refuses, on
  every rank, with a message naming the first rank and key that differ from rank 0.

Single-process runs never import or initialise torch.distributed (`DistContext()` is the 1-rank context).
Multi-node runs need the store directory on a filesystem every rank sees (shards are files).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from dataworth.errors import InputError
from dataworth.util import first_difference, short

if TYPE_CHECKING:  # torch is imported lazily: numpy-only readers need not pay for it
    import torch

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# How long a rank waits in a collective for the others (a dead rank under torchrun is noticed sooner:
# the launcher stops the whole group).
DEFAULT_TIMEOUT_MIN = 30


@dataclass(frozen=True)
class DistContext:
    """Who this process is: ``rank`` of ``world_size`` (``local_rank`` on its machine) and the backend.

    ``DistContext()`` is a single process (``backend=None``): every collective is the identity.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        """Whether other ranks take part (collectives do something)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 creates, merges and finalizes shared files."""
        return self.rank == 0


SINGLE = DistContext()


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by the launcher (``torchrun``, ``accelerate launch``), 1 when not launched."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment WORLD_SIZE={value!r} is not an integer") from None


def init_distributed(device: str = "auto", timeout_min: float = DEFAULT_TIMEOUT_MIN) -> DistContext:
    """Join the process group the launcher describes in the environment, or return the 1-rank context.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (set by ``torchrun`` and
    ``accelerate launch``). Backend: ``nccl`` when this rank computes on CUDA, else ``gloo``. An already
    initialised group (e.g. by the caller's training script) is reused. ``WORLD_SIZE`` 1 or unset: no
    torch.distributed at all.
    """
    world = launched_world_size()
    if world <= 1:
        return SINGLE
    import torch
    import torch.distributed as dist

    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and not dist.is_initialized():
        raise InputError(f"WORLD_SIZE={world} but {', '.join(missing)} unset; start with torchrun or accelerate launch")
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())
    use_cuda = wants_cuda(device)
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))
    return DistContext(dist.get_rank(), dist.get_world_size(), local, backend)


def wants_cuda(device: str) -> bool:
    """Whether ``--device`` means CUDA here (``auto`` with a GPU present, or an explicit ``cuda…``)."""
    import torch

    return (device == "auto" and torch.cuda.is_available()) or str(device).startswith("cuda")


def rank_device(ctx: DistContext, device: str) -> str:
    """The device this rank computes on: ``auto``/``cuda`` become ``cuda:LOCAL_RANK`` when ranks share a
    machine's GPUs; an explicit ``cuda:N`` or ``cpu`` is kept."""
    if not ctx.active:
        return device
    if device in ("auto", "cuda") and wants_cuda(device):
        return f"cuda:{ctx.local_rank}"
    return "cpu" if device == "auto" else device


def shutdown() -> None:
    """Leave the process group if one was joined (end of a CLI command launched by torchrun)."""
    if launched_world_size() > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0 of a launched run, or a plain single process (who prints the summary)."""
    return os.environ.get("RANK", "0") == "0"


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        import torch.distributed as dist

        dist.barrier()


def all_gather_objects(ctx: DistContext, value: Any) -> list[Any]:
    """Every rank's ``value``, by rank (plain JSON-like values and numpy arrays; between our own ranks)."""
    if not ctx.active:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def broadcast_object(ctx: DistContext, value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank."""
    if not ctx.active:
        return value
    import torch.distributed as dist

    box = [value if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sums(ctx: DistContext, tensors: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """Element-wise sums over ranks of same-named float64 tensors (keys in sorted order on every rank).

    The reduced values are then broadcast from rank 0, so every rank holds bit-identical results (anything
    derived from them — a PCA projection, its digest — is then the same on every rank).
    """
    if not ctx.active:
        return tensors
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else torch.device("cpu")
    out = {}
    for key in sorted(tensors):
        t = tensors[key].to(device=device, dtype=torch.float64).contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        dist.broadcast(t, src=0)
        out[key] = t.cpu()
    return out


def all_reduce_arrays(ctx: DistContext, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Sums over ranks of float64 numpy arrays (same shapes on every rank), see `all_reduce_sums`."""
    if not ctx.active:
        return list(arrays)
    import torch

    named = {f"{i:06d}": torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)) for i, a in enumerate(arrays)}
    reduced = all_reduce_sums(ctx, named)
    return [reduced[f"{i:06d}"].numpy() for i in range(len(arrays))]


def all_reduce_count(ctx: DistContext, n: int) -> int:
    """Sum of an integer over ranks."""
    return int(sum(all_gather_objects(ctx, int(n))))


def raise_together(ctx: DistContext, error: BaseException | None) -> None:
    """After a step only some ranks may fail (rank 0 merging, say): share the first error so that every
    rank raises the same ``InputError`` instead of waiting forever at the next collective."""
    messages = all_gather_objects(ctx, None if error is None else f"{type(error).__name__}: {error}")
    for rank, message in enumerate(messages):
        if message is not None:
            if error is not None and rank == ctx.rank:
                raise error
            raise InputError(f"rank {rank} failed: {message}")


def check_agreement(ctx: DistContext, what: dict[str, Any], label: str) -> None:
    """Refuse, on every rank, when any rank's ``what`` differs from rank 0's.

    ``InputError("rank 1 disagrees with rank 0 on <label> key 'rank_in': 4 != 5; …")`` — raised by all ranks
    (each sees every rank's values), so no rank is left waiting and nothing has been written yet.
    """
    if not ctx.active:
        return
    gathered = all_gather_objects(ctx, what)
    for rank, other in enumerate(gathered[1:], start=1):
        diff = first_difference(gathered[0], other)
        if diff:
            key, ref, got = diff
            raise InputError(f"rank {rank} disagrees with rank 0 on {label} key {key!r}: {short(repr(got))} != "
                             f"{short(repr(ref))} (rank 0); every rank must run the same command")


def owned_shards(n_shards: int, ctx: DistContext) -> range:
    """Shards rank ``r`` of ``W`` computes: ``i ≡ r (mod W)`` — deterministic, balanced to within one shard."""
    return range(ctx.rank, n_shards, ctx.world_size)


def iter_owned_blocks(store, block_rows: int, ctx: DistContext, *, reuse: bool = False,
                      raw: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """``(first_row, block)`` float32 blocks of the rows this rank owns, in increasing row order.

    A single process streams the whole store (``store.iter_blocks``); rank ``r`` of ``W`` streams the shards
    ``i ≡ r (mod W)``, each cut in blocks of at most ``block_rows`` rows (blocks never cross shards).
    ``reuse``: blocks valid only until the next one (``Store.iter_row_ranges``). ``raw``: blocks as stored
    (``Store.iter_row_ranges``), cut at shard ends in a single process too.
    """
    if not ctx.active and not raw:
        yield from store.iter_blocks(block_rows, reuse=reuse)
        return
    shards = store.manifest["shards"]
    ranges = ((start, min(start + block_rows, shards[i]["first_row"] + shards[i]["rows"]))
              for i in owned_shards(len(shards), ctx)
              for start in range(shards[i]["first_row"], shards[i]["first_row"] + shards[i]["rows"], block_rows))
    yield from store.iter_row_ranges(ranges, reuse=reuse, raw=raw)


def merge_topk(values: Sequence[np.ndarray], rows: Sequence[np.ndarray], k: int,
               descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact global top-k from per-rank top-k lists: ``values[r]``/``rows[r]`` are ``[Q, k_r]``.

    Orders the union by ``(−value, row)`` (``descending``) or ``(value, row)`` and keeps ``k`` per query:
    each rank's list is the best of its rows under that same total order, so the global best ``k`` are all
    in the union — the result equals a one-process top-k with ties broken by lower store row.
    Returns ``(values [Q, k], rows [Q, k])``.
    """
    all_values = np.concatenate([np.asarray(v, dtype=np.float32) for v in values], axis=1)
    all_rows = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows], axis=1)
    key = -all_values if descending else all_values
    order = np.lexsort((all_rows, key), axis=1)[:, :k]
    return np.take_along_axis(all_values, order, axis=1), np.take_along_axis(all_rows, order, axis=1)
