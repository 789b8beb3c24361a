"""`dw.watch`: per-example projected gradients from a user's own training loop, written as a normal store.

Why a module of its own: `dataworth.gradients.extract` runs its *own* forward/backward over a dataset with
frozen weights. A user with their own training loop (gradient accumulation, mixed precision, any optimizer)
wants the rows of the batches they already run, taken from *their* backward of *their* loss, without
disturbing training. ::

    logger = dw.watch(model, modules="mlp", projection="random", rank=16, seed=0, out="store", dtype="float32")
    for batch in loader:
        with logger.capture(batch.ids, attention_mask=batch.attention_mask) as cap:
            losses = per_example_losses(model(batch), batch)   # [B], each summed over its tokens
            loss = cap.record(losses).mean()                    # any reduction: measured, see hooks
            loss.backward()
        optimizer.step(); optimizer.zero_grad()
    store = logger.finalize()                                   # a normal store: dw.fit / dw.score / score_rows

The capture itself (what a row is, how the loss weights ``w_b`` are measured or declared) is the hook
engine's, `dataworth.gradients.hooks`. Gradient accumulation: each micro-batch is its own ``capture``; its
rows are per-example gradients at the weights of that micro-batch's forward. An id captured twice is refused
unless ``capture(..., overwrite=True)``, which keeps the latest rows at the position of the id's first capture.

Storage: rows are staged as float32 ``.npy`` parts in ``OUT.staging/`` as they fill (``shard_rows`` rows each,
tmp file + ``os.replace``); ``finalize`` writes them into the store at ``OUT`` through `StoreWriter` (shards in
first-capture order, the store dtype, SHA-256 checksums), writes the KFAC factors
``A = (1/T) Σ_tokens a aᵀ`` and ``S = (1/N) Σ_n Σ_t s sᵀ`` over everything captured (superseded captures
included) exactly as `dw.extract` defines them, records the *final* model's fingerprint (so ``dw.score`` with
that model passes its check), and removes the staging directory. A logger store is not resumable: a
crashed loop re-runs (``replace=True`` replaces a previous store).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from dataworth.errors import InputError
from dataworth.gradients.hooks import (
    Capture,
    GradientHooks,
    accumulate,
    check_reduction,
)
from dataworth.gradients.modules import modules_spec, resolve_modules
from dataworth.gradients.projection import (
    build_projections,
    projection_digest,
    row_layout,
)
from dataworth.model.load import model_fingerprint
from dataworth.store.format import KFAC_FILE, STORE_DTYPES, ModuleSpec
from dataworth.store.writer import StoreWriter
from dataworth.util import atomic_write

LOGGER_PROJECTIONS = ("random", "identity")
STAGING_MARKER = "dataworth-staging.json"


@dataclass(frozen=True)
class WatchConfig:
    """What determines a logger store's rows (serialised into the manifest ``config``).

    ``modules``: ``all`` | ``mlp`` | ``attn`` | a regex (as in `dw.extract`; an explicit list of names is
    recorded as an anchored regex). ``projection``: ``random`` (seeded LoGra, regenerated, never stored) or
    ``identity`` (exact per-example gradients); ``pca`` and ``dense`` need a pass over the data before
    training, use `dw.extract`. ``rank_in`` / ``rank_out``: LoGra ``k_in`` / ``k_out`` (clamped to the layer).
    ``loss_reduction``: the declared default when a capture does not ``record`` its losses.
    """

    modules: str = "all"
    projection: str = "random"
    rank_in: int = 64
    rank_out: int = 64
    seed: int = 0
    dtype: str = "float16"
    shard_rows: int = 1024
    loss_reduction: str = "sum"

    def check(self) -> None:
        if self.projection not in LOGGER_PROJECTIONS:
            raise InputError(
                f"projection: {self.projection!r} is not available while training (the logger supports "
                f"{', '.join(LOGGER_PROJECTIONS)}; pca/dense need a pass over the data first: use dw.extract)"
            )
        if self.dtype not in STORE_DTYPES:
            raise InputError(f"dtype: must be one of {', '.join(STORE_DTYPES)}, got {self.dtype!r}")
        for name in ("rank_in", "rank_out", "shard_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name}: must be an integer >= 1, got {value!r}")
        check_reduction(self.loss_reduction)


class RowStaging:
    """Append-only float32 ``.npy`` parts of ``part_rows`` rows in ``directory`` (each written atomically).

    Keeps, per id, the position of its *latest* row and the order of first appearance; `assemble` yields
    the final rows in that order, ``part_rows`` at a time, so memory stays ``O(part_rows · D)``.
    """

    def __init__(self, directory: Path, dim: int, part_rows: int):
        self.directory = directory
        self.dim = dim
        self.part_rows = part_rows
        self.latest: dict[str, int] = {}  # id -> global staged position of its latest row
        self.order: list[str] = []  # ids in first-capture order
        self.losses: list[float] = []
        self.tokens: list[int] = []
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._parts = 0
        if directory.exists():
            if not (directory / STAGING_MARKER).exists():
                raise InputError(f"{directory}: exists and is not a dataworth staging directory; move it away")
            shutil.rmtree(directory)  # left by a crashed run: ours, and useless without its process
        directory.mkdir(parents=True)
        (directory / STAGING_MARKER).write_text(json.dumps({"format": "dataworth-staging", "dim": dim}))

    @property
    def staged(self) -> int:
        return len(self.losses)

    def append(self, ids: Sequence[str], rows: np.ndarray, losses: np.ndarray, tokens: np.ndarray) -> None:
        for position, i in enumerate(ids, start=self.staged):
            if i not in self.latest:
                self.order.append(i)
            self.latest[i] = position
        self.losses.extend(float(v) for v in losses)
        self.tokens.extend(int(t) for t in tokens)
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        while rows.shape[0]:
            take = min(self.part_rows - self._buffered, rows.shape[0])
            self._buffer.append(rows[:take])
            self._buffered += take
            rows = rows[take:]
            if self._buffered == self.part_rows:
                self.flush()

    def flush(self) -> None:
        if not self._buffered:
            return
        part = np.concatenate(self._buffer)

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a handle: np.save would append ".npy" to the temporary name
                np.save(fh, part)

        atomic_write(self.directory / f"{self._parts:05d}.npy", save)
        self._parts += 1
        self._buffer, self._buffered = [], 0

    def assemble(self, block_rows: int):
        """Yield ``(ids, rows [n, D] float32, losses, tokens)`` blocks in first-capture order, latest rows."""
        self.flush()
        parts = [np.load(self.directory / f"{p:05d}.npy", mmap_mode="r") for p in range(self._parts)]
        for start in range(0, len(self.order), block_rows):
            ids = self.order[start:start + block_rows]
            where = np.array([self.latest[i] for i in ids], dtype=np.int64)
            rows = np.empty((len(ids), self.dim), dtype=np.float32)
            part_of, row_in = where // self.part_rows, where % self.part_rows
            for p in np.unique(part_of):
                sel = part_of == p
                rows[sel] = parts[p][row_in[sel]]
            yield ids, rows, np.asarray(self.losses)[where], np.asarray(self.tokens)[where]

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class GradientLogger:
    """`GradientHooks` + `RowStaging` + KFAC statistics; made by `watch`, finished by `finalize`."""

    def __init__(self, model: nn.Module, config: WatchConfig, modules: Sequence[tuple[str, nn.Module]],
                 out: Path, replace: bool):

        self.model = model
        self.config = config
        self.out = out
        self.replace = replace
        projections = build_projections(modules, config.projection, config.rank_in, config.rank_out, config.seed)
        self.layout = row_layout(modules, projections, config.projection, 0)
        self.digest = projection_digest([projections[n] for n, _ in modules])
        self.hooks = GradientHooks(model, modules, projections, collect_covariance=True)
        self.staging = RowStaging(Path(f"{out}.staging"), self.hooks.dim, config.shard_rows)
        self.cov_in: dict[str, torch.Tensor] = {}
        self.cov_out: dict[str, torch.Tensor] = {}
        self.n_tokens: dict[str, float] = {}
        self.captured = 0  # examples captured, superseded ones included
        self.measured_captures = 0
        self.declared_captures = 0

    @property
    def modules(self) -> list[str]:
        return [n for n, _ in self.hooks.modules]

    @property
    def dim(self) -> int:
        return self.hooks.dim

    def capture(self, ids: Sequence[Any], *, attention_mask: torch.Tensor | None = None, overwrite: bool = False,
                loss_reduction: str | None = None, loss_scale: float = 1.0) -> Capture:
        """Context manager around the user's forward + backward of one (micro-)batch.

        ``ids``: one stable id per example (strings; ints are converted). An id captured before is refused
        unless ``overwrite=True`` (the new rows replace the old ones). ``loss_reduction`` / ``loss_scale``
        declare how the backpropagated loss weights each example when the capture does not ``record`` its
        per-example losses (default: the logger's ``loss_reduction``). On a clean exit the rows are staged;
        if the block raises, nothing is kept.
        """
        cap = self.hooks.capture(ids, attention_mask=attention_mask,
                                 loss_reduction=loss_reduction or self.config.loss_reduction,
                                 loss_scale=loss_scale)
        if not overwrite:
            again = [i for i in cap.ids if i in self.staging.latest]
            if again:
                raise InputError(
                    f"capture: id {again[0]!r} was captured before; pass overwrite=True to replace its rows "
                    "(e.g. a later epoch), or give each capture fresh ids"
                )
        cap.on_exit = self._keep
        return cap

    def _keep(self, cap: Capture) -> None:
        self.staging.append(cap.ids, cap.rows.cpu().numpy(), cap.losses, cap.tokens())
        for name in self.modules:
            accumulate(self.cov_in, name, cap.cov_in[name])
            accumulate(self.cov_out, name, cap.cov_out[name])
            self.n_tokens[name] = self.n_tokens.get(name, 0.0) + cap.n_tokens[name]
        self.captured += len(cap.ids)
        if cap.recorded:
            self.measured_captures += 1
        else:
            self.declared_captures += 1

    def close(self) -> None:
        """Detach the hooks and delete the staged rows without writing a store."""
        self.hooks.close()
        self.staging.remove()

    def finalize(self, *, fingerprint: bool = True):
        """Write the store at ``out`` (shards in first-capture order, KFAC factors, ids); return it opened.

        ``fingerprint``: record `model_fingerprint` of the model *now* (so ``dw.score`` with the final
        model passes its fingerprint check); False skips hashing the weights (huge models).
        """
        if self.hooks.closed:
            raise InputError("finalize: the logger is already finalized or closed")
        if self.hooks.active is not None:
            raise InputError("finalize: a capture is still open")
        if not self.staging.order:
            raise InputError("finalize: nothing was captured; wrap a forward/backward in logger.capture(ids)")
        self.hooks.close()
        specs = [ModuleSpec(m["name"], m["k_out"], m["k_in"], m["offset"], m["size"], m["layout"])
                 for m in self.layout]
        writer = StoreWriter(self.out, modules=specs, dtype=self.config.dtype, shard_rows=self.config.shard_rows,
                             header=self._header(fingerprint), overwrite=self.replace)
        if writer.done_shards:
            writer.close()
            raise InputError(f"{self.out}: already holds a store; pass replace=True to watch() to replace it")
        for index, (ids, rows, losses, tokens) in enumerate(self.staging.assemble(self.config.shard_rows)):
            writer.write_shard(index, rows, ids, losses, tokens)
        n_rows = self.captured
        self.n_tokens = {name: float(count) for name, count in self.n_tokens.items()}
        n_tokens = self.n_tokens[self.modules[0]]
        factors = {}
        for name in self.modules:
            factors[f"{name}.A"] = self.cov_in[name] / self.n_tokens[name]
            factors[f"{name}.S"] = self.cov_out[name] / n_rows
        writer.save_tensors(KFAC_FILE, {k: v.cpu() for k, v in factors.items()},
                            metadata={"n_rows": str(n_rows), "n_tokens": str(int(round(n_tokens)))})
        store = writer.finalize()
        self.staging.remove()
        return store

    def _header(self, fingerprint: bool) -> dict:
        cfg = self.config
        ids_digest = hashlib.sha256("\n".join(self.staging.order).encode()).hexdigest()
        return {
            "projection": {"kind": cfg.projection, "seed": cfg.seed, "rank_in": cfg.rank_in, "rank_out": cfg.rank_out,
                           "digest": self.digest,
                           "modules": {m["name"]: [m["k_out"], m["k_in"]] for m in self.layout}},
            "model": {"fingerprint": model_fingerprint(self.model) if fingerprint else None, "path": "",
                      "captured": "during training (rows come from the weights at each capture)"},
            "data": {"fingerprint": ids_digest, "spec": "captured", "rows": len(self.staging.order)},
            "config": {**asdict(cfg), "source": "dataworth.gradients.watch", "module_info": self.layout, "max_length": None,
                       "captured_examples": self.captured, "measured_captures": self.measured_captures,
                       "declared_captures": self.declared_captures},
        }


def watch(model: nn.Module, modules: str | Sequence[str] | None = None, projection: str = "random",
          rank: int = 64, *, out: str | os.PathLike, rank_in: int | None = None, rank_out: int | None = None,
          seed: int = 0, dtype: str = "float16", shard_rows: int = 1024, loss_reduction: str = "sum",
          task=None, replace: bool = False) -> GradientLogger:
    """``dw.watch``: attach a gradient logger to ``model`` for a custom training loop; see the module docstring.

    ``modules``: ``all|mlp|attn|regex`` or a list of layer names (default: ``task.tracked_modules(model)``
    when a `dataworth.gradients.task.Task` is given, else ``all``). ``rank`` sets both LoGra ranks unless
    ``rank_in`` / ``rank_out`` are given. ``out``: where `GradientLogger.finalize` writes the store (an
    existing store there is refused unless ``replace=True``; a non-empty non-store directory always is).

    Example::

        logger = dw.watch(model, modules="mlp", rank=16, out="store", dtype="float32")
    """
    if modules is None:
        modules = list(task.tracked_modules(model)) if task is not None else "all"
    config = WatchConfig(modules="", projection=projection, rank_in=rank if rank_in is None else rank_in,
                         rank_out=rank if rank_out is None else rank_out, seed=seed, dtype=dtype,
                         shard_rows=shard_rows, loss_reduction=loss_reduction)
    config.check()
    chosen = resolve_modules(model, modules)
    config = WatchConfig(**{**asdict(config), "modules": modules_spec(modules, chosen)})
    out = Path(out)
    _check_out(out, replace)
    return GradientLogger(model, config, chosen, out, replace)


def _check_out(out: Path, replace: bool) -> None:
    """Refuse early (before training starts) what `StoreWriter` would refuse at finalize."""
    if out.exists() and not out.is_dir():
        raise InputError(f"out: {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "manifest.json").exists():
            raise InputError(f"out: {out} is not empty and not a gradient store; choose an empty or new directory")
        if not replace:
            raise InputError(f"out: {out} already holds a store; pass replace=True to replace it")
