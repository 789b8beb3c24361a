"""Extraction: a dataset and a model in, a gradient store out (LoGra per-example projected gradients).

Rows are written shard by shard in dataset order. Within a shard, batches may be length-sorted to cut
padding; results are scattered back to their dataset positions before the shard is written. Each shard's
KFAC statistics are written beside it, so a killed run resumes after the last complete shard and the
final store is byte-identical to an uninterrupted run.

Distributed (``torchrun`` / ``accelerate launch``, see ``docs/distributed.md``): rank ``r`` of ``W`` computes
the shards ``i ≡ r (mod W)`` with exactly the single-process per-shard computation, writes them with
``dataworth.store.writer.write_shard_files`` and lists them in its fragment ``manifest.rank-r.json``; rank 0 then
adopts every shard in order, sums the per-shard KFAC partials in shard order and finalizes. The store is
the same set of files a single process writes. PCA first-pass covariances are all-reduced sums divided by
the global token / row counts.

GPU path: ``autocast`` runs the model's forward in bf16/fp16 while the projections (and everything the
hooks accumulate) stay float32; device→host copies of each batch go through pinned buffers and overlap the
next batch; shard writing (dtype conversion, hashing, files, manifest) runs on a background thread
(``async_write``), so the accelerator does not wait for the disk.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from dataworth.data.batching import Encoded, collate, example_losses, plan_batches
from dataworth.data.encode import data_fingerprint, encode_rows, text_format
from dataworth.data.rows import load_rows
from dataworth.distributed import (
    SINGLE,
    DistContext,
    all_reduce_sums,
    barrier,
    broadcast_object,
    check_agreement,
    init_distributed,
    owned_shards,
    raise_together,
    rank_device,
)
from dataworth.errors import InputError
from dataworth.gradients.hooks import (
    Capture,
    GradientHooks,
    accumulate,
    float32_projection_guards,
    model_device,
)
from dataworth.gradients.modules import layer_dims, select_modules
from dataworth.gradients.projection import (
    COVARIANCE_KINDS,
    KINDS,
    WHITEN_DAMPING_FRACTION,
    ModuleProjection,
    build_projections,
    dense_projector,
    identity_projection,
    load_pca_covariances,
    projection_digest,
    projection_to,
    row_layout,
)
from dataworth.gradients.task import Task, batch_to, frozen, per_example
from dataworth.gradients.watch import LOGGER_PROJECTIONS, watch
from dataworth.model.load import load_model, model_fingerprint
from dataworth.store.format import (
    FULL_COV_FILE,
    KFAC_FILE,
    PCA_FILE,
    STORE_DTYPES,
    ModuleSpec,
)
from dataworth.store.reader import check_side_file, open_store
from dataworth.store.tensors import save_tensors
from dataworth.store.writer import (
    StoreWriter,
    fragment_paths,
    read_fragment_entries,
    shard_entry_is_whole,
    write_fragment,
    write_shard_files,
)
from dataworth.util import (
    acquire_directory_lock,
    file_record,
    human_bytes,
    pad_token_id,
    peak_resident_bytes,
    release_directory_lock,
    resident_bytes,
    resolve_device,
    say,
)

AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NONFINITE_FILE = "nonfinite.json"


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that determines a store's contents (serialised into the manifest to replay a run).

    ``rank_in`` / ``rank_out``: LoGra k_in / k_out (clamped to the layer's size). ``dense_dim``: output
    size of the ``dense`` projection. ``batch_size`` / ``token_budget``: how rows are grouped (never
    changes the rows). ``shard_rows``: rows per shard (the unit of resumption). ``autocast``: ``bf16`` /
    ``fp16`` run the forward under ``torch.autocast`` (projections stay float32); ``none`` is float32.
    ``async_write``: write shards on a background thread (default: on for CUDA, off on CPU; same files).
    ``whiten_damping``: ``whitened`` projection only — λ of each KFAC factor as a fraction of its mean
    eigenvalue (`dataworth.gradients.projection.whitened_projection`).
    """

    model: str = ""
    data: str = ""
    out: str = ""
    modules: str = "all"
    projection: str = "random"
    rank_in: int = 64
    rank_out: int = 64
    dense_dim: int = 8192
    seed: int = 0
    dtype: str = "float16"
    batch_size: int | None = None
    token_budget: int | None = None
    max_length: int | None = 512
    device: str = "auto"
    shard_rows: int = 1024
    chat: str = "auto"
    skip_nonfinite: bool = False
    transform: str | None = None
    autocast: str = "none"
    async_write: bool | None = None
    whiten_damping: float = WHITEN_DAMPING_FRACTION

    def check(self) -> None:
        if self.projection not in KINDS:
            raise InputError(f"--projection must be one of {', '.join(KINDS)}, got {self.projection!r}")
        if self.dtype not in STORE_DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(STORE_DTYPES)}, got {self.dtype!r}")
        for name in ("rank_in", "rank_out", "dense_dim", "shard_rows"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.token_budget is not None and self.token_budget < 1:
            raise InputError(f"--token-budget must be >= 1, got {self.token_budget}")
        if not self.whiten_damping > 0:
            raise InputError(f"--whiten-damping must be > 0, got {self.whiten_damping}")
        if self.autocast not in AUTOCAST_DTYPES:
            raise InputError(f"--autocast must be one of {', '.join(AUTOCAST_DTYPES)}, got {self.autocast!r}")

    def replay_keys(self) -> dict:
        """The configuration that determines the rows (not where they go or how they are batched)."""
        d = asdict(self)
        for k in ("out", "batch_size", "token_budget", "device", "async_write"):
            d.pop(k)
        if d["autocast"] == "none":  # float32 stores keep the manifest they had before autocast existed
            d.pop("autocast")
        if d["projection"] != "whitened":  # only that projection reads it; other manifests stay as they were
            d.pop("whiten_damping")
        return d


@dataclass
class Extractor:
    """A frozen model with the hook engine attached: `run(batch)` returns the batch's projected per-example
    gradient rows and losses.

    Weights are frozen for the duration (``requires_grad=False``: only activation gradients are needed) and
    restored by `close`. ``kind``: the projection kind (``dense``: the engine captures exact gradients, which
    are then transformed by ``transform`` and projected to ``dense_dim`` with the seeded Gaussian).
    ``loss``: ``sum`` (rows are gradients of each example's summed target loss, the store's rows) or
    ``token_mean`` (divided by the example's target count, LESS's convention; losses likewise).
    ``collect_covariance``: keep the running KFAC sums (`take_covariance`); ``covariance_only``: only those;
    ``keep_tokens``: per-token ``a_t`` / ``s_t`` of the last batch (``last.token_acts`` / ``token_grads``).
    """

    model: nn.Module
    modules: list[tuple[str, nn.Module]]
    projections: dict[str, ModuleProjection]
    device: torch.device
    kind: str = "random"
    dense_dim: int = 8192
    seed: int = 0
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    collect_covariance: bool = False
    covariance_only: bool = False
    autocast: str = "none"
    keep_tokens: bool = False
    loss: str = "sum"
    hooks: GradientHooks = field(init=False)
    last: Capture | None = field(init=False, default=None)
    _sums: dict = field(init=False, default_factory=dict)
    _saved_requires_grad: dict = field(init=False, default_factory=dict)
    _guard_handles: list = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.loss not in ("sum", "token_mean"):
            raise ValueError(f"loss must be sum or token_mean, got {self.loss!r}")
        for n, p in self.model.named_parameters():
            self._saved_requires_grad[n] = p.requires_grad
            p.requires_grad_(False)
        projections = {n: projection_to(p, self.device) for n, p in self.projections.items()}
        self.hooks = GradientHooks(self.model, self.modules, projections,
                                   collect_covariance=self.collect_covariance, covariance_only=self.covariance_only,
                                   keep_tokens=self.keep_tokens, check_finite=False)
        if AUTOCAST_DTYPES[self.autocast] is not None:
            self._guard_handles = float32_projection_guards(self.modules, self.device.type)

    def close(self) -> None:
        self.hooks.close()
        for h in self._guard_handles:
            h.remove()
        self._guard_handles = []
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._saved_requires_grad.get(n, True))

    def __enter__(self) -> "Extractor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, batch) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Forward + backward of the summed per-example loss; returns (rows [B, D] float32, losses [B])."""
        batch = batch.to(self.device)
        dtype = AUTOCAST_DTYPES[self.autocast]
        # positions, not the rows' ids: the engine only needs distinct labels within the batch
        with torch.enable_grad(), self.hooks.capture(range(len(batch)), attention_mask=batch.attention_mask) as cap:
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            # Loss and backward outside autocast (the usual recipe); the loss is float32 whatever the logits.
            losses = example_losses(logits.float(), batch)
            # Sum (not mean) over examples: each example's δ is then exactly its own gradient (w_b = 1).
            losses.sum().backward()
        self.last = cap
        if self.collect_covariance:
            for name, _ in self.modules:
                accumulate(self._sums, f"{name}.A", cap.cov_in[name])
                accumulate(self._sums, f"{name}.S", cap.cov_out[name])
        losses = losses.detach()
        if self.covariance_only:
            return None, losses
        rows = cap.rows
        if self.loss == "token_mean":
            targets = batch.loss_mask[:, 1:].sum(dim=1).clamp(min=1).to(rows.device, torch.float32)
            rows = rows / targets[:, None]
            losses = losses.double() / targets.double()
        if self.kind == "dense":
            if self.transform is not None:
                rows = self.transform(rows)
            rows = dense_projector(rows.shape[1], self.dense_dim, self.seed)(rows)
        return rows.float(), losses

    def take_covariance(self) -> dict[str, torch.Tensor]:
        """The KFAC sums ``Σ a aᵀ`` (``name.A``) and ``Σ s sᵀ`` (``name.S``) since the last call (float64, CPU)."""
        out = {k: v.cpu() for k, v in self._sums.items()}
        self._sums = {}
        return out


def encoded_rows_for(extractor: Extractor, encoded: Sequence[Encoded], pad_id: int, batch_size: int | None,
                     token_budget: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, losses and target-token counts for ``encoded``, in the given order.

    Batches are always length-sorted (rows are written back to their positions, so only the work changes): on
    the real-text benchmark's 1,000 documents in 16-row batches, padded tokens fell from 2.40× to 1.12× the
    real ones."""
    lengths = [len(e.input_ids) for e in encoded]
    plan = plan_batches(lengths, batch_size=batch_size, token_budget=token_budget, sort_by_length=True)
    rows_out: np.ndarray | None = None
    losses = np.zeros(len(encoded), dtype=np.float64)
    copier = HostCopier(pinned=extractor.device.type == "cuda")

    def scatter(ready) -> None:
        nonlocal rows_out
        for idx, rows, loss in ready:
            if rows_out is None and rows is not None:
                rows_out = np.zeros((len(encoded), rows.shape[1]), dtype=np.float32)
            if rows is not None:
                rows_out[idx] = rows
            losses[idx] = loss

    for idx in plan:
        batch = collate([encoded[i] for i in idx], idx, pad_id)
        rows, loss = extractor.run(batch)
        copier.push(idx, rows, loss.double())
        scatter(copier.ready(keep=1))  # the previous batch's copy finished while this batch computed
    scatter(copier.ready(keep=0))
    tokens = np.array([e.n_targets for e in encoded], dtype=np.int64)
    return rows_out, losses, tokens


class HostCopier:
    """Device→host copies of per-batch results that overlap the next batch's compute.

    ``push(idx, rows, loss)`` starts the copies; ``ready(keep)`` yields ``(idx, rows ndarray | None, loss
    ndarray)`` for all but the ``keep`` newest batches, in push order. With ``pinned`` (CUDA) each tensor
    is copied ``non_blocking`` into one of two page-locked staging buffers per result (double buffering,
    grown as needed) and a CUDA event marks completion; the staging slot is reused only after its batch was
    handed out, and the numpy arrays handed out are copies. Without ``pinned`` (CPU) tensors are handed over
    as they are — the same code path, so it is tested on CPU.
    """

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.pending: deque = deque()
        self._slots: list[dict[int, torch.Tensor]] = [{}, {}]
        self._turn = 0

    def _stage(self, slot: dict[int, torch.Tensor], j: int, t: torch.Tensor) -> torch.Tensor:
        buf = slot.get(j)
        if buf is None or buf.dtype != t.dtype or buf.numel() < t.numel():
            buf = torch.empty(max(t.numel(), 1), dtype=t.dtype, pin_memory=True)
            slot[j] = buf
        view = buf[: t.numel()].view(t.shape)
        view.copy_(t.detach(), non_blocking=True)
        return view

    def push(self, idx, *tensors: torch.Tensor | None) -> None:
        if not self.pinned:
            self.pending.append((idx, [None if t is None else t.detach().cpu() for t in tensors], None))
            return
        slot = self._slots[self._turn]
        self._turn = 1 - self._turn
        host = [None if t is None else self._stage(slot, j, t) for j, t in enumerate(tensors)]
        event = torch.cuda.Event()
        event.record()
        self.pending.append((idx, host, event))

    def ready(self, keep: int):
        while len(self.pending) > keep:
            idx, host, event = self.pending.popleft()
            if event is not None:
                event.synchronize()
            yield (idx, *[None if h is None else h.numpy().copy() if self.pinned else h.numpy() for h in host])


def first_pass_covariances(model: nn.Module, modules, encoded, pad_id, device, batch_size, token_budget, *,
                           ctx: DistContext = SINGLE, shard_rows: int | None = None, autocast: str = "none"
                           ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, int]:
    """PCA first pass: full-size KFAC factors ``A = (1/T) Σ_t x xᵀ``, ``S = (1/N) Σ_n Σ_t δ δᵀ``.

    Distributed: each rank sums over the rows of its shards (``shard_rows``), the float64 sums are
    all-reduced, and every rank divides by the global ``T`` (tokens) and ``N`` (rows).
    """
    projs = {n: identity_projection(n, *layer_dims(m)) for n, m in modules}
    mine = list(encoded)
    if ctx.active:
        n_shards = math.ceil(len(encoded) / shard_rows)
        mine = [e for i in owned_shards(n_shards, ctx) for e in encoded[i * shard_rows:(i + 1) * shard_rows]]
    with Extractor(model, list(modules), projs, device, kind="identity", collect_covariance=True,
                   covariance_only=True, autocast=autocast) as ex:
        if mine:
            encoded_rows_for(ex, mine, pad_id, batch_size, token_budget)
        sums = ex.take_covariance()
    for n, m in modules:  # a rank without rows contributes zeros
        d_in, d_out = layer_dims(m)
        sums.setdefault(f"{n}.A", torch.zeros(d_in, d_in, dtype=torch.float64))
        sums.setdefault(f"{n}.S", torch.zeros(d_out, d_out, dtype=torch.float64))
    sums = all_reduce_sums(ctx, sums)
    n_tokens = sum(len(e.input_ids) for e in encoded)
    n_rows = len(encoded)
    return ({n: (sums[f"{n}.A"] / n_tokens, sums[f"{n}.S"] / n_rows) for n, _ in modules}, n_rows, n_tokens)


class ShardWriteQueue:
    """Runs shard writes on one background thread, in submission order, at most ``depth`` waiting.

    ``submit(fn, *args)`` returns at once (after waiting for the oldest write when ``depth`` are pending),
    so the next shard computes while this one is converted, hashed and written. An exception in a write is
    raised by the next ``submit`` or by ``drain``; leaving the ``with`` block waits for every write (they
    are whole shards worth keeping) before an error propagates. Disabled: ``fn(*args)`` runs inline.
    """

    def __init__(self, enabled: bool, depth: int = 1):
        self.enabled = enabled
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") if enabled else None
        self._pending: deque[Future] = deque()

    def submit(self, fn, *args) -> None:
        if self._pool is None:
            fn(*args)
            return
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> "ShardWriteQueue":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.drain()
            else:
                for f in self._pending:
                    f.exception()  # wait; the first error is the one already propagating
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


def _async_default(config: ExtractConfig, device: torch.device) -> bool:
    return config.async_write if config.async_write is not None else device.type == "cuda"


def nonfinite_rows(rows: np.ndarray) -> np.ndarray:
    """Which rows of float32 ``[n, dim]`` hold an inf or NaN. A float64 sum of finite float32 numbers is always
    finite and any inf/NaN makes it non-finite, so this is exact without the ``n × dim`` boolean array of
    ``np.isfinite(rows)`` (a quarter of a shard's rows again, at the extraction's peak)."""
    return ~np.isfinite(rows.sum(axis=1, dtype=np.float64))


def compute_shard(ex: Extractor, encoded: Sequence[Encoded], shard: int, config: ExtractConfig, pad_id: int
                  ) -> tuple[list[Encoded], np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Rows, losses, target-token counts of shard ``shard`` (rows ``[shard·R, (shard+1)·R)``), and the ids of
    rows with non-finite gradients (zeroed with ``skip_nonfinite``, refused otherwise)."""
    lo, hi = shard * config.shard_rows, min(len(encoded), (shard + 1) * config.shard_rows)
    part = list(encoded[lo:hi])
    rows, losses, tokens = encoded_rows_for(ex, part, pad_id, config.batch_size, config.token_budget)
    bad = nonfinite_rows(rows) | ~np.isfinite(losses)
    names: list[str] = []
    if bad.any():
        names = [part[i].id for i in np.flatnonzero(bad)]
        if not config.skip_nonfinite:
            raise InputError(
                f"non-finite gradient in rows {', '.join(names[:10])} (shard {shard}); "
                "rerun with --skip-nonfinite to record them as zero rows"
            )
        rows[bad] = 0.0
    return part, rows, losses, tokens, names


def extract(config: ExtractConfig, *, model: nn.Module | None = None, tokenizer=None,
            encoded: Sequence[Encoded] | None = None, overwrite: bool = False,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None, progress: bool = True,
            stop_after_shards: int | None = None, task=None, batches=None):
    """Build (or resume) a gradient store; returns the opened `dataworth.store.reader.Store`.

    With only ``config``: loads ``config.model`` and ``config.data``. A ready ``model`` / ``tokenizer`` /
    ``encoded`` rows may be passed instead (custom models, tests). ``stop_after_shards`` stops early
    (tests of resumption; distributed: after this many shards of this rank). ``task`` (a
    `dataworth.gradients.task.Task`) with ``batches`` it understands: any model, rows of ``task.compute_train_loss``
    (`dataworth.gradients.extract.extract_with_task`; random/identity projection, single process, not resumable).

    Launched by ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1), every rank runs this same call:
    ranks first check that their configurations (then model and data fingerprints) agree, then each
    computes its shards and rank 0 merges (module docstring). Every rank returns the finished store.
    """
    if task is not None:  # any nn.Module: the task's per-example loss over its own batches (dataworth.gradients.task)

        return extract_with_task(config, model=model, task=task, batches=batches, encoded=encoded,
                                 tokenizer=tokenizer, overwrite=overwrite)
    config.check()
    if not config.out:
        raise InputError("--out is required")
    ctx = init_distributed(config.device)
    agreed = {k: v for k, v in asdict(config).items() if k != "device"}
    check_agreement(ctx, {**agreed, "overwrite": overwrite, "stop_after_shards": stop_after_shards}, "configuration")
    lock = _lock_existing_store(ctx, Path(config.out))
    try:
        return _extract(ctx, config, model=model, tokenizer=tokenizer, encoded=encoded, overwrite=overwrite,
                        transform=transform, progress=progress, stop_after_shards=stop_after_shards)
    finally:
        if lock is not None:
            release_directory_lock(config.out, lock)


def _lock_existing_store(ctx: DistContext, out: Path):
    """Take the writer lock of an existing ``out`` on rank 0 before loading anything, so a second writer is
    refused at once (a new directory is locked by `StoreWriter` when it creates it); every rank raises alike."""
    lock, error = None, None
    if ctx.is_main and out.is_dir():
        try:
            lock = acquire_directory_lock(out, "store")
        except InputError as exc:
            error = exc
    raise_together(ctx, error)
    return lock


def _extract(ctx: DistContext, config: ExtractConfig, *, model, tokenizer, encoded, overwrite: bool, transform,
             progress: bool, stop_after_shards: int | None):
    """`extract` once the ranks agree on the configuration and the store is locked."""
    device = resolve_device(rank_device(ctx, config.device))
    fingerprint = None
    if model is None:
        loaded = load_model(config.model, device=str(device))
        model, tokenizer, fingerprint = loaded.model, loaded.tokenizer, loaded.fingerprint
    else:
        model = model.to(device)
    model.eval()
    if fingerprint is None:
        fingerprint = model_fingerprint(model)
    if encoded is None:
        rows = load_rows(config.data)
        encoded, report = encode_rows(rows, tokenizer, max_length=config.max_length, chat=config.chat)
        if report.truncated and ctx.is_main:
            say(f"truncated {report.truncated} of {report.rows} rows to --max-length {config.max_length}")
        if report.no_targets and ctx.is_main:
            say(f"{report.no_targets} rows have no target tokens (their gradient rows are zero)")
    if not encoded:
        raise InputError(f"{config.data or 'data'}: no rows to extract")

    pad_id = pad_token_id(tokenizer)
    modules = select_modules(model, config.modules)
    pca_cov = None
    pca_path = Path(config.out) / PCA_FILE
    header_projection = {"kind": config.projection, "seed": config.seed, "rank_in": config.rank_in,
                         "rank_out": config.rank_out}
    if config.projection == "dense":
        header_projection.update({"dense_dim": config.dense_dim, "transform": config.transform})
    header = {
        "projection": header_projection,
        "model": {"fingerprint": fingerprint, "path": config.model},
        "data": {"fingerprint": data_fingerprint(list(encoded)), "spec": config.data, "rows": len(encoded)},
        "config": config.replay_keys(),
    }
    if tokenizer is not None:  # which tokens framed text rows (bos/eos, or a chat model's document delimiter)
        header["config"]["text_format"] = text_format(tokenizer)
    check_agreement(ctx, {"model": header["model"]["fingerprint"], "data": header["data"]}, "model/data")
    saved_pca = broadcast_object(ctx, config.projection in COVARIANCE_KINDS and pca_path.exists() and not overwrite)
    if saved_pca:
        check_side_file(config.out, PCA_FILE)
        pca_cov = load_pca_covariances(pca_path, modules)
    elif config.projection in COVARIANCE_KINDS:
        if ctx.is_main:
            say(f"{config.projection}: first pass over the data to collect the KFAC covariances")
        pca_cov, _, _ = first_pass_covariances(model, modules, list(encoded), pad_id, device,
                                               config.batch_size, config.token_budget, ctx=ctx,
                                               shard_rows=config.shard_rows, autocast=config.autocast)
    if config.projection == "whitened":
        header_projection["whiten_damping"] = config.whiten_damping
    projections = build_projections(modules, config.projection, config.rank_in, config.rank_out, config.seed, pca_cov,
                                    config.whiten_damping)
    layout = row_layout(modules, projections, config.projection, config.dense_dim)
    header["projection"]["digest"] = projection_digest(list(projections.values()))
    header["projection"]["modules"] = {m["name"]: [m.get("k_out"), m.get("k_in")] for m in layout}

    specs = [ModuleSpec(m["name"], m["k_out"], m["k_in"], m["offset"], m["size"], m["layout"]) for m in layout]
    header["config"]["module_info"] = layout
    check_agreement(ctx, {"projection": header["projection"]}, "projection")
    plan = ExtractPlan(config, model, modules, projections, specs, header, list(encoded), pad_id, device, transform,
                       pca_cov if config.projection in COVARIANCE_KINDS and not saved_pca else None, pca_cov)
    if ctx.active or fragment_paths(config.out):  # a single process adopts fragments a distributed run left
        return _extract_sharded(ctx, plan, overwrite=overwrite, progress=progress,
                                stop_after_shards=stop_after_shards)
    with StoreWriter(config.out, modules=specs, dtype=config.dtype, shard_rows=config.shard_rows,
                     header=header, overwrite=overwrite) as writer:  # holds the store's writer lock
        return _extract_single(writer, plan, progress=progress, stop_after_shards=stop_after_shards)


def _extract_single(writer: StoreWriter, plan: "ExtractPlan", *, progress: bool, stop_after_shards: int | None):
    """One process writes every unfinished shard in order, then the side files, then finalizes."""
    config, encoded, specs, pca_cov = plan.config, plan.encoded, plan.specs, plan.pca_cov
    device, pad_id, model = plan.device, plan.pad_id, plan.model
    if config.projection in COVARIANCE_KINDS and writer.done_shards == 0:
        writer.save_tensors(PCA_FILE, {f"{n}.A": a for n, (a, s) in pca_cov.items()}
                            | {f"{n}.S": s for n, (a, s) in pca_cov.items()})
    n = len(encoded)
    n_shards = math.ceil(n / config.shard_rows)
    dim = sum(s.size for s in specs)
    _print_plan(encoded, dim, config, n_shards, writer.done_shards, model)
    nonfinite: list[str] = []

    def write(shard: int, ids: list[str], rows, losses, tokens, cov) -> None:
        if cov is not None:
            writer.save_tensors(partial_file(shard), cov)
        writer.write_shard(shard, rows, ids, losses, tokens)

    with plan.extractor() as ex, ShardWriteQueue(_async_default(config, device)) as queue:
        bar = _progress(progress)
        with bar:
            task = bar.add_task("extract", total=sum(len(e.input_ids) for e in encoded))
            done_tokens = sum(len(e.input_ids) for e in encoded[: writer.done_shards * config.shard_rows])
            bar.update(task, completed=done_tokens)
            for shard in range(writer.done_shards, n_shards):
                part, rows, losses, tokens, bad = compute_shard(ex, encoded, shard, config, pad_id)
                nonfinite.extend(bad)
                cov = ex.take_covariance() if config.projection != "dense" else None
                queue.submit(write, shard, [e.id for e in part], rows, losses, tokens, cov)
                del rows  # written (or queued): not alive while the next shard's rows are computed
                bar.update(task, advance=sum(len(e.input_ids) for e in part))
                if stop_after_shards is not None and shard + 1 >= stop_after_shards:
                    queue.drain()
                    return None
    if nonfinite:
        writer.write_json(NONFINITE_FILE, {"ids": nonfinite})
    _finish_store(writer, plan, n_shards)
    writer.finalize()
    return open_store(config.out)


@dataclass(frozen=True)
class ExtractPlan:
    """What every rank prepared before writing: model, modules, projections, row layout, store header, rows.

    ``new_pca``: covariances computed by this run (to be saved); ``pca_cov``: the ones in use (or None).
    """

    config: ExtractConfig
    model: nn.Module
    modules: list
    projections: dict
    specs: list
    header: dict
    encoded: list
    pad_id: int
    device: torch.device
    transform: Callable | None
    new_pca: dict | None
    pca_cov: dict | None

    def extractor(self) -> Extractor:
        c = self.config
        return Extractor(self.model, self.modules, self.projections, self.device, kind=c.projection,
                         dense_dim=c.dense_dim, seed=c.seed, transform=self.transform,
                         collect_covariance=c.projection != "dense", autocast=c.autocast)


def _finish_store(writer, plan: ExtractPlan, n_shards: int) -> None:
    """Side files of a complete set of shards: KFAC factors (summed partials) and the PCA covariances."""
    config, encoded = plan.config, plan.encoded
    if config.projection != "dense":
        writer.save_tensors(KFAC_FILE, merge_covariance_partials(writer.load_tensors, plan.modules, n_shards, encoded),
                            metadata={"n_rows": str(len(encoded)),
                                      "n_tokens": str(sum(len(e.input_ids) for e in encoded))})
    if config.projection in COVARIANCE_KINDS:
        writer.save_tensors(FULL_COV_FILE, {f"{k}.A": a for k, (a, _) in plan.pca_cov.items()}
                            | {f"{k}.S": s for k, (_, s) in plan.pca_cov.items()})


def _extract_sharded(ctx: DistContext, plan: ExtractPlan, *, overwrite: bool, progress: bool,
                     stop_after_shards: int | None):
    """Rank ``r`` computes its unfinished shards ``i ≡ r (mod W)``; rank 0 merges (module docstring).

    1. rank 0 opens the store (``prune=False``: other ranks' shards stay), reads every fragment, keeps the
       entries whose files are whole, and broadcasts the finished set;
    2. each rank computes and writes its unfinished shards, listing each in ``manifest.rank-r.json``;
    3. after a barrier rank 0 adopts all shards in order, writes the KFAC factors and finalizes; the
       fragments are removed last. Any rank's error is raised on every rank.
    """
    config, encoded = plan.config, plan.encoded
    out = Path(config.out)
    n_shards = math.ceil(len(encoded) / config.shard_rows)
    dim = sum(s.size for s in plan.specs)
    writer, error, state = None, None, None
    if ctx.is_main:
        try:
            writer = StoreWriter(out, modules=plan.specs, dtype=config.dtype, shard_rows=config.shard_rows,
                                 header=plan.header, overwrite=overwrite, prune=False)
            identity = writer.identity_digest()
            done = {i: {"writer": None} for i in range(writer.done_shards)}
            for i, entry in read_fragment_entries(out, identity).items():
                if i in done or i >= n_shards:
                    continue
                if shard_entry_is_whole(out, entry, dim, config.dtype):
                    done[i] = entry
                else:
                    say(f"shard {i}: listed in {entry.get('writer')}'s fragment but its files are damaged; recomputing")
            if plan.new_pca is not None:
                writer.save_tensors(PCA_FILE, {f"{n}.A": a for n, (a, s) in plan.new_pca.items()}
                                    | {f"{n}.S": s for n, (a, s) in plan.new_pca.items()})
            state = {"identity": identity, "done": done}
        except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then re-raised
            error = exc
    raise_together(ctx, error)
    state = broadcast_object(ctx, state)
    identity, done = state["identity"], state["done"]
    mine = [i for i in owned_shards(n_shards, ctx) if i not in done]
    entries = [{k: v for k, v in e.items() if k != "writer"} for e in done.values() if e.get("writer") == ctx.rank]
    if ctx.is_main:
        _print_plan(encoded, dim, config, n_shards, len(done), plan.model)
        say(f"distributed: {ctx.world_size} ranks, shard i on rank i mod {ctx.world_size}")
        if n_shards < ctx.world_size:  # the shard is the unit of work: extra ranks would wait without a word
            per_rank = max(1, math.ceil(len(encoded) / ctx.world_size))
            say(f"warning: {n_shards} shard(s) of {config.shard_rows} rows for {ctx.world_size} ranks: ranks "
                f"{n_shards}–{ctx.world_size - 1} have nothing to do "
                f"(--shard-rows {per_rank} gives every rank a shard)")

    def write(shard: int, ids: list[str], rows, losses, tokens, cov, bad: list[str]) -> None:
        side = {}
        if cov is not None:  # hashed here, listed in the manifest by rank 0 when it adopts the shard
            side = {"covariance": file_record(save_tensors(out, partial_file(shard), cov))}
        entry = write_shard_files(out, shard, rows, ids, losses, tokens, dtype=config.dtype, dim=dim,
                                  shard_rows=config.shard_rows)
        entries.append({**entry, **side, "index": shard, "nonfinite": bad})
        write_fragment(out, ctx.rank, identity, entries, extra={"world_size": ctx.world_size})

    error = None
    try:
        with plan.extractor() as ex, ShardWriteQueue(_async_default(config, plan.device)) as queue:
            bar = _progress(progress and ctx.is_main)
            with bar:
                task = bar.add_task(f"extract (rank {ctx.rank})" if ctx.active else "extract",
                                    total=sum(len(e.input_ids) for i in mine for e in _shard_rows(encoded, i, config)))
                for count, shard in enumerate(mine, start=1):
                    part, rows, losses, tokens, bad = compute_shard(ex, encoded, shard, config, plan.pad_id)
                    cov = ex.take_covariance() if config.projection != "dense" else None
                    queue.submit(write, shard, [e.id for e in part], rows, losses, tokens, cov, bad)
                    del rows  # written (or queued): not alive while the next shard's rows are computed
                    bar.update(task, advance=sum(len(e.input_ids) for e in part))
                    if stop_after_shards is not None and count >= stop_after_shards:
                        break
    except Exception as exc:  # noqa: BLE001
        error = exc
    if stop_after_shards is not None and error is None:
        return None
    raise_together(ctx, error)
    barrier(ctx)
    if ctx.is_main:
        try:
            found = read_fragment_entries(out, identity)
            missing = [i for i in range(writer.done_shards, n_shards) if i not in found]
            if missing:
                raise InputError(f"{out}: shards {missing[:5]} were not written by any rank; run the same command again")
            adopted = [found[i] for i in range(writer.done_shards, n_shards)]
            first = writer.done_shards
            writer.adopt_shards(adopted, verify=False)  # hashed while written; sizes and headers checked here
            for i, entry in enumerate(adopted, start=first):
                if entry.get("covariance"):
                    writer.record_file(partial_file(i), entry["covariance"])
            nonfinite = [name for e in adopted for name in e.get("nonfinite", [])]
            if nonfinite:
                writer.write_json(NONFINITE_FILE, {"ids": nonfinite})
            _finish_store(writer, plan, n_shards)
            writer.finalize()
            for f in fragment_paths(out):  # last: a crash before this leaves fragments that agree with the manifest
                f.unlink()
        except Exception as exc:  # noqa: BLE001
            error = exc
        finally:
            writer.close()
    raise_together(ctx, error)
    return open_store(out, verify=False)


def _shard_rows(encoded: Sequence[Encoded], shard: int, config: ExtractConfig) -> Sequence[Encoded]:
    return encoded[shard * config.shard_rows:(shard + 1) * config.shard_rows]


def partial_file(shard: int) -> str:
    """Store-relative name of shard ``shard``'s KFAC partial sums."""
    return f"covariance/partial/{shard:05d}.safetensors"


def merge_covariance_partials(load: Callable[[str], dict], modules, n_shards: int, encoded) -> dict[str, torch.Tensor]:
    """``A = (1/T) Σ_shards Σ a aᵀ`` and ``S = (1/N) Σ_shards Σ s sᵀ`` from the per-shard sums, in shard order.

    ``load``: store-relative path → tensors (`StoreWriter.load_tensors`, which checks each file's record)."""
    total: dict[str, torch.Tensor] = {}
    for shard in range(n_shards):
        part = load(partial_file(shard))
        for k, v in part.items():
            total[k] = v.clone() if k not in total else total[k] + v
    n_tokens = sum(len(e.input_ids) for e in encoded)
    n_rows = len(encoded)
    return {k: (v / n_tokens if k.endswith(".A") else v / n_rows) for k, v in total.items()}


# Per token of the longest batch, extraction holds ≈ 5 float32 copies of the logits (logits, log-softmax, their
# gradients, the per-example loss) and ≈ 17 floats per layer and hidden unit of saved activations and hook
# captures: SmolLM2-135M, batch 8 × 71 tokens, peaked at 2.35 GiB, 1.23 GiB above what the loaded model held
# (measured 2026-12-07). The plan takes 5 logit copies and 32 activation floats (≈ 2× the measured): 2.8 GiB.
LOGIT_COPIES = 5
ACTIVATION_FLOATS = 32
# The first forward+backward grows the process by a fixed amount whatever the model (autograd's and the
# kernels' lazy set-up, allocator arenas): 68 MiB measured on a 2-layer test model.
WARMUP_BYTES = 128 * 2**20


def shard_buffer_bytes(rows: int, dim: int, config: ExtractConfig) -> int:
    """One shard's rows held in float32 until written, plus their converted copy in a smaller store dtype."""
    itemsize = 4 if config.dtype == "float32" else 2
    return min(rows, config.shard_rows) * dim * (4 + (itemsize if itemsize < 4 else 0))


def extraction_peak_bytes(encoded, dim: int, config: ExtractConfig, model: nn.Module) -> int:
    """≈ peak resident bytes of an extraction: what the process holds now (libraries, the model, its mapped
    weight files) + `LOGIT_COPIES` of the longest batch's logits + saved activations (`ACTIVATION_FLOATS` per
    token, layer and hidden unit; without a config: every linear layer's input and output per token) + one
    batch's rows + `WARMUP_BYTES` + one shard's rows in float32 and their converted copy (with exact gradients
    that buffer dominates: 1000 rows × 393k dims = 1.5 GiB) — or the process's peak so far, if higher (a
    model's load)."""
    rows = len(encoded)
    longest = max(len(e.input_ids) for e in encoded)
    batch_rows = config.batch_size or 8
    tokens = config.token_budget or batch_rows * longest
    cfg = getattr(model, "config", None)
    vocab = getattr(cfg, "vocab_size", 0) or 0
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if layers and hidden:
        per_token = ACTIVATION_FLOATS * layers * hidden
    else:
        per_token = sum(m.in_features + m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    shard_buffer = shard_buffer_bytes(rows, dim, config)
    ahead = (resident_bytes() + WARMUP_BYTES + tokens * vocab * 4 * LOGIT_COPIES + tokens * per_token * 4
             + batch_rows * dim * 4)
    return int(max(peak_resident_bytes(), ahead + shard_buffer))  # loading a model can peak higher than this


def _print_plan(encoded, dim: int, config: ExtractConfig, n_shards: int, done: int, model: nn.Module) -> None:
    """Before a long run: rows, tokens, store size on disk, a peak-memory estimate (`extraction_peak_bytes`)."""
    rows = len(encoded)
    tokens = sum(len(e.input_ids) for e in encoded)
    itemsize = 4 if config.dtype == "float32" else 2
    size = rows * dim * itemsize
    shard_buffer = shard_buffer_bytes(rows, dim, config)
    peak = extraction_peak_bytes(encoded, dim, config, model)
    say(f"plan: {rows} rows, {tokens} tokens, {dim} dims/row ({config.dtype}), store {human_bytes(size)} in "
         f"{n_shards} shards ({done} already done), est. peak memory {human_bytes(peak)} "
         f"(of which {human_bytes(shard_buffer)} is one shard's rows: --shard-rows lowers it)")


def _progress(enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    class TokensPerSecond(TextColumn):
        def __init__(self):
            super().__init__("")

        def render(self, task):
            speed = task.finished_speed or task.speed
            from rich.text import Text

            return Text(f"{speed:,.0f} tok/s" if speed else "", style="cyan")

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} tok"),
                    TokensPerSecond(), TimeRemainingColumn(), disable=not enabled, transient=False,
                    console=_stderr_console())


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def extract_with_task(config, *, model: nn.Module | None = None, task: Task, batches: Iterable[Any] | None = None,
                      encoded=None, tokenizer=None, overwrite: bool = False):
    """A gradient store for any model: rows ``∇_W task.compute_train_loss(batch)[b]`` (projected), one per id.

    ``config``: an `ExtractConfig` (``out``, ``projection`` — random or identity —, ranks, seed, dtype,
    ``shard_rows``; ``modules`` other than ``all`` overrides ``task.tracked_modules``). ``batches``: batches
    the task understands (the batch protocol in the module docstring); without them, a language-model task
    gets `dataworth.data.batching.Batch` es of ``encoded`` rows (or of ``config.data``, tokenized with the model's
    tokenizer). Weights are frozen and the model is in eval mode during the pass (both restored). The store
    equals what `dataworth.gradients.watch.watch` would capture in the same batches, and, for a `LanguageModelTask`,
    what `dw.extract` writes without a task (same rows, same KFAC factors).
    """
    config.check()
    if not config.out:
        raise InputError("--out is required")
    if config.projection not in LOGGER_PROJECTIONS:
        raise InputError(f"--projection {config.projection}: with a task, extraction supports "
                         f"{' and '.join(LOGGER_PROJECTIONS)}")
    if model is None:
        loaded = load_model(config.model, device="cpu" if config.device == "auto" else config.device)
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    if batches is None:
        batches = _lm_batches(config, encoded, tokenizer)
    modules = config.modules if config.modules != "all" else task.tracked_modules(model)
    logger = watch(model, modules, config.projection, rank_in=config.rank_in, rank_out=config.rank_out,
                   seed=config.seed, out=config.out, dtype=config.dtype, shard_rows=config.shard_rows,
                   replace=overwrite)
    device = model_device(model)
    try:
        with frozen(model):
            for batch in batches:
                batch = batch_to(batch, device)
                ids = task.batch_ids(batch)
                with logger.capture(ids, attention_mask=task.token_mask(batch)) as cap:
                    losses = per_example(task.compute_train_loss(batch, model), len(ids), "task.compute_train_loss")
                    cap.record(losses).sum().backward()
    except BaseException:
        logger.close()
        raise
    return logger.finalize()


def _lm_batches(config, encoded, tokenizer) -> list:
    """Batches of ``encoded`` rows (or ``config.data`` tokenized) for a language-model task, in data order."""
    if encoded is None:
        if not config.data:
            raise InputError("a task needs batches=..., encoded=... or --data")

        encoded, _ = encode_rows(load_rows(config.data), tokenizer, max_length=config.max_length, chat=config.chat)
    encoded = list(encoded)
    if not encoded:
        raise InputError(f"{config.data or 'data'}: no rows to extract")
    plan = plan_batches([len(e.input_ids) for e in encoded], batch_size=config.batch_size)
    return [collate([encoded[i] for i in idx], idx, pad_token_id(tokenizer)) for idx in plan]
