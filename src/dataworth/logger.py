"""Logging API for custom training loops: watch a model, capture batches with their ids, finalize a store.

Why a module of its own: `dataworth.extract` runs its *own* forward/backward over a dataset with frozen
weights. A user with their own training loop (gradient accumulation, mixed precision, any optimizer) wants
the per-example projected gradients of the batches they already run, taken from *their* backward of *their*
loss, without disturbing training. ::

    logger = dw.watch(model, modules="mlp", projection="random", rank=16, seed=0, out="store", dtype="float32")
    for batch in loader:
        with logger.capture(batch.ids, attention_mask=batch.attention_mask) as cap:
            losses = per_example_losses(model(batch), batch)   # [B], each summed over its tokens
            loss = cap.record(losses).mean()                    # any reduction: measured, see below
            loss.backward()
        optimizer.step(); optimizer.zero_grad()
    store = logger.finalize()                                   # a normal store: dw.fit / dw.score / score_rows

What is captured (LoGra, Choe et al. 2024, eq. 3). For a watched linear layer ``y = W x`` the forward hook
keeps ``a_t = P_in x_t`` and a tensor hook on ``y`` keeps ``s_t = P_out δ_t`` with ``δ_t = ∂L/∂y_t`` for the
``L`` the user backpropagates; the row of example ``b`` is ``Ĝ_b = Σ_t s_{b,t} a_{b,t}ᵀ`` (``k_out × k_in``
per module, concatenated row-major in module order — the store contract). Hooks only *read* tensors and
return nothing, so the parameter ``.grad`` the optimizer sees is bit-identical with and without the logger.

Loss reduction (the classic per-example-gradient bug). If ``L = Σ_b w_b ℓ_b`` then ``δ_b = w_b ∂ℓ_b/∂y_b``:
a batch mean scales every row by ``w_b = 1/B``, gradient accumulation by a further ``1/k``, an AMP loss scaler
by its scale. The rows the store needs are ``∇ℓ_b`` (``w_b = 1``), so the logger divides ``s_{b,t}`` by
``w_b``. ``w_b`` is found in one of two ways:

- *measured* (exact, preferred): ``cap.record(losses)`` registers a tensor hook on the per-example losses
  ``[B]``; the gradient the backward pass delivers there is exactly ``w_b = ∂L/∂ℓ_b``, whatever the
  reduction, scaling or per-example weighting. It fires before any module's hook (every watched output is
  upstream of the losses). A recorded loss that receives no gradient, or an example with ``w_b = 0`` (its
  gradient cannot be recovered), is an error.
- *declared*: without ``record``, ``loss_reduction="sum"`` (default, ``w_b = 1``) or ``"mean"``
  (``w_b = 1/B``), times ``loss_scale`` (e.g. ``1/accumulation_steps``). A wrong declaration cannot be
  detected without the per-example losses, which is why ``record`` is recommended.

Assumption (stated, not checkable): example ``b``'s loss depends on the layer outputs of example ``b`` only
(no batch norm across examples) and ``L`` depends on the outputs only through the recorded losses.

Inputs of a watched layer: ``[B, d]`` (one vector per example, e.g. an MLP) or ``[B, T, d]`` / ``[B, ..., d]``
(tokens; the leading dimension must be the batch). ``attention_mask`` ``[B, T]`` zeroes padding activations
and output gradients. A module called several times per forward (weight sharing) contributes the sum over
its calls, which is its gradient.

Gradient accumulation: each micro-batch is its own ``capture``; its rows are per-example gradients at the
weights of that micro-batch's forward. An id captured twice is refused unless ``capture(..., overwrite=True)``,
which keeps the latest rows at the position of the id's first capture.

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
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from dataworth.errors import InputError
from dataworth.logging import is_supported, project, select_modules
from dataworth.projection import ModuleProjection, projection_digest

LOGGER_PROJECTIONS = ("random", "identity")
LOSS_REDUCTIONS = ("sum", "mean")
STORE_DTYPES = ("float16", "bfloat16", "float32")
STAGING_MARKER = "dataworth-staging.json"
KFAC_FILE = "curvature/kfac_factors.safetensors"  # the same file `dw.extract` writes


# --------------------------------------------------------------------------------------------------------
# Configuration and module selection


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


def check_reduction(reduction: str) -> str:
    """``sum`` or ``mean``, else an `InputError` naming the allowed values."""
    if reduction not in LOSS_REDUCTIONS:
        raise InputError(f"loss_reduction: must be one of {', '.join(LOSS_REDUCTIONS)}, got {reduction!r}")
    return reduction


def resolve_modules(model: nn.Module, modules: str | Sequence[str] = "all") -> list[tuple[str, nn.Module]]:
    """``[(name, module)]`` in model order for a spec (``all|mlp|attn|regex``) or an explicit list of names.

    Only ``nn.Linear`` and Hugging Face ``Conv1D`` are supported (their per-example gradient factorises as
    ``Σ_t δ_t x_tᵀ``); naming anything else is an `InputError` that lists the linear layers there are.
    """
    if isinstance(modules, str):
        return select_modules(model, modules)
    names = [str(n) for n in modules]
    by_name = dict(model.named_modules())
    linear = [n for n, m in by_name.items() if n and is_supported(m)]
    if not names:
        raise InputError(f"modules: empty list; name at least one linear layer ({_listing(linear)})")
    for n in names:
        if n not in by_name or not n:
            raise InputError(f"modules: no module named {n!r} in the model; linear layers: {_listing(linear)}")
        if not is_supported(by_name[n]):
            raise InputError(
                f"modules: {n!r} is a {type(by_name[n]).__name__}; supported layers are nn.Linear and "
                f"transformers Conv1D (linear layers in this model: {_listing(linear)})"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"modules: {repeated[0]!r} is named more than once")
    order = {n: i for i, n in enumerate(by_name)}
    return [(n, by_name[n]) for n in sorted(names, key=order.__getitem__)]


def modules_spec(modules: str | Sequence[str], chosen: Sequence[tuple[str, nn.Module]]) -> str:
    """The spec recorded in the manifest: the string as given, or an anchored regex of exactly ``chosen``
    (so `dataworth.extract.store_extractor` reselects the same layers for query gradients)."""
    if isinstance(modules, str):
        return modules
    return "^(?:" + "|".join(re.escape(n) for n, _ in chosen) + ")$"


def _listing(names: Sequence[str], limit: int = 30) -> str:
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


# --------------------------------------------------------------------------------------------------------
# Hooks: one capture of projected per-example gradients


@dataclass(eq=False)
class Capture:
    """One batch in flight: entered around the user's forward + backward; holds its rows after exit.

    After a successful exit: ``rows`` ``[B, D]`` float32 (CPU), ``losses`` ``[B]`` float64 (NaN when not
    recorded), ``tokens`` ``[B]`` int64, ``weights`` ``[B]`` (the ``w_b`` that were divided out).
    """

    owner: "ProjectedGradients"
    ids: list[str]
    attention_mask: torch.Tensor | None
    declared_weight: float | None  # w_b when the losses are not recorded
    on_exit: Any = None
    rows: torch.Tensor | None = None
    losses: np.ndarray | None = None
    tokens: np.ndarray | None = None
    weights: torch.Tensor | None = None
    open: bool = True
    _parts: dict = field(default_factory=dict)  # module -> [B, k_out, k_in] float32
    _cov_in: dict = field(default_factory=dict)  # module -> Σ a aᵀ float64
    _cov_out: dict = field(default_factory=dict)  # module -> Σ s sᵀ float64 (after dividing by w_b)
    _n_tokens: dict = field(default_factory=dict)  # module -> real tokens seen
    _recorded: bool = False
    _measured: torch.Tensor | None = None
    _token_counts: torch.Tensor | None = None
    _problem: str | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __enter__(self) -> "Capture":
        self.owner._begin(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self.owner._end(self, failed=exc_type is not None)
            if exc_type is None and self.on_exit is not None:
                self.on_exit(self)
        finally:
            self.open = False
        return False

    def record(self, losses: torch.Tensor, tokens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Register the per-example losses ``[B]`` that the backpropagated loss is computed from; return them.

        The backward pass then delivers ``w_b = ∂L/∂ℓ_b`` to them, which the logger divides out of example
        ``b``'s rows: any reduction (sum, mean, ``/accumulation_steps``, a loss scaler) gives ``∇ℓ_b``. A
        scalar (already reduced) loss is refused. ``tokens``: per-example token counts stored beside the
        rows (default: the attention mask's row sums, else 1).
        """
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.shape[0] != len(self.ids):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise InputError(
                f"capture.record: losses have shape {shape}, expected [{len(self.ids)}] per-example losses "
                "(each summed over its own tokens) — pass them *before* reducing over the batch"
            )
        if not losses.requires_grad:
            raise InputError("capture.record: the losses do not require grad (computed under torch.no_grad?)")
        if self._recorded:
            raise InputError("capture.record: called twice in one capture; record the batch's losses once")
        self._recorded = True
        losses.register_hook(self._weights_hook)
        self.losses = losses.detach().double().cpu().numpy()
        if tokens is not None:
            self._token_counts = torch.as_tensor(tokens).reshape(-1).cpu()
            if self._token_counts.shape[0] != len(self.ids):
                raise InputError(f"capture.record: {self._token_counts.shape[0]} token counts for {len(self.ids)} ids")
        return losses

    def _weights_hook(self, grad: torch.Tensor) -> None:
        if not self.open:
            return
        if self._measured is not None:
            self._problem = "backward ran twice through the recorded losses inside one capture"
        self._measured = grad.detach().double()

    def current_weights(self, device: torch.device) -> torch.Tensor | None:
        """``w_b`` ``[B]`` float64 if known now (declared, or measured by the losses hook), else None."""
        if self._recorded:
            return None if self._measured is None else self._measured.to(device)
        return torch.full((len(self.ids),), float(self.declared_weight), dtype=torch.float64, device=device)


class ProjectedGradients:
    """Hooks on ``modules`` that turn one forward + backward (inside `capture`) into projected rows.

    Never writes ``.grad`` and never changes a forward output. A forward pre-hook makes a watched layer's
    input require grad when neither it nor the layer's weight does (frozen weights, extraction), so that
    ``δ`` still reaches the layer; with trainable weights it does nothing.
    """

    def __init__(self, model: nn.Module, modules: Sequence[tuple[str, nn.Module]],
                 projections: dict[str, ModuleProjection], collect_covariance: bool = True):
        self.model = model
        self.modules = list(modules)
        device = _device_of(model)
        self.projections = {n: _to_device(projections[n], device) for n, _ in self.modules}
        self.collect_covariance = collect_covariance
        self._active: Capture | None = None
        self._handles: list = []
        for name, module in self.modules:
            self._handles.append(module.register_forward_pre_hook(self._input_grad_hook(module)))
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))

    @property
    def dim(self) -> int:
        return sum(self.projections[n].k_out * self.projections[n].k_in for n, _ in self.modules)

    def _projection(self, name: str, device: torch.device) -> ModuleProjection:
        """The module's projection on ``device`` (moved once: a Trainer may move the model after `watch`)."""
        proj = self.projections[name]
        matrix = proj.p_in if proj.p_in is not None else proj.p_out
        if matrix is not None and matrix.device != device:
            proj = self.projections[name] = _to_device(proj, device)
        return proj

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def capture(self, ids: Sequence[Any], *, attention_mask: torch.Tensor | None = None,
                loss_reduction: str = "sum", loss_scale: float = 1.0) -> Capture:
        """A context for one batch: ``ids`` (one per example), optional ``attention_mask`` ``[B, T]``."""
        ids = check_ids(ids)
        check_reduction(loss_reduction)
        if not np.isfinite(loss_scale) or loss_scale == 0:
            raise InputError(f"loss_scale: must be finite and non-zero, got {loss_scale!r}")
        weight = float(loss_scale) / (len(ids) if loss_reduction == "mean" else 1)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != len(ids):
                raise InputError(f"attention_mask: shape {tuple(attention_mask.shape)}, expected [{len(ids)}, T]")
            attention_mask = attention_mask.detach().float()
        return Capture(self, ids, attention_mask, weight)

    # -- hooks ---------------------------------------------------------------------------------------------
    def _input_grad_hook(self, module: nn.Module):
        def hook(mod: nn.Module, inputs: tuple):
            if self._active is None or not torch.is_grad_enabled() or not inputs:
                return None
            x = inputs[0]
            if not isinstance(x, torch.Tensor) or x.requires_grad or not x.is_floating_point():
                return None
            if any(p.requires_grad for p in mod.parameters(recurse=False)):
                return None
            return (x.detach().requires_grad_(True), *inputs[1:])

        return hook

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            cap = self._active
            if cap is None or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
                return
            if not output.requires_grad:
                return
            proj = self._projection(name, output.device)
            mask = _mask_for(cap, name, output)
            a = _tokens_view(project(inputs[0].detach(), proj.p_in), len(cap.ids), name)
            if mask is not None:
                a = a * mask[..., None]
            if self.collect_covariance:
                flat = a.reshape(-1, a.shape[-1]).double()
                _add(cap._cov_in, name, flat.T @ flat)
                # a tensor, not a float: no host sync per layer call (it matters on a GPU)
                real = mask.sum(dtype=torch.float64) if mask is not None else float(a.shape[0] * a.shape[1])
                cap._n_tokens[name] = cap._n_tokens.get(name, 0.0) + real
            fired = []

            def grad_hook(grad: torch.Tensor) -> None:
                if not cap.open:
                    return
                if fired:
                    cap._problem = f"backward ran twice through module {name} inside one capture"
                    return
                fired.append(True)
                w = cap.current_weights(grad.device)
                if w is None:
                    cap._problem = ("the recorded losses received no gradient before the layers did: "
                                    "backpropagate a loss computed from the recorded losses")
                    return
                inv = torch.where(w == 0, torch.zeros_like(w), 1.0 / w).float()
                s = _tokens_view(project(grad, proj.p_out), len(cap.ids), name) * inv[:, None, None]
                if mask is not None:
                    s = s * mask[..., None]
                _add(cap._parts, name, torch.bmm(s.transpose(1, 2), a))
                if self.collect_covariance:
                    flat_s = s.reshape(-1, s.shape[-1]).double()
                    _add(cap._cov_out, name, flat_s.T @ flat_s)

            output.register_hook(grad_hook)

        return hook

    # -- capture lifecycle ---------------------------------------------------------------------------------
    def _begin(self, cap: Capture) -> None:
        if self._active is not None:
            raise InputError("capture: another capture is still open; captures cannot be nested")
        if not self._handles:
            raise InputError("capture: the logger is closed (finalize() or close() was called)")
        if cap.attention_mask is not None:
            cap.attention_mask = cap.attention_mask.to(_device_of(self.model))
        self._active = cap

    def _end(self, cap: Capture, failed: bool) -> None:
        self._active = None
        if failed:
            return
        if cap._problem is not None:
            raise InputError(f"capture: {cap._problem}")
        missing = [n for n, _ in self.modules if n not in cap._parts]
        if missing:
            raise InputError(
                f"capture: module {missing[0]} received no gradient — call loss.backward() inside the "
                "`with capture(...)` block, and watch only layers that influence the loss"
            )
        w = cap.current_weights(torch.device("cpu"))
        zero = torch.nonzero(w == 0).flatten().tolist()
        if zero:
            raise InputError(
                f"capture: example {cap.ids[zero[0]]!r} has weight 0 in the backpropagated loss, so its "
                "gradient cannot be recovered; leave it out of the capture's ids"
            )
        rows = torch.cat([cap._parts[n].reshape(len(cap.ids), -1) for n, _ in self.modules], dim=1)
        cap.rows = rows.float().cpu()
        cap.weights = w
        bad = torch.nonzero(~torch.isfinite(cap.rows).all(dim=1)).flatten().tolist()
        if bad:
            raise InputError(f"capture: non-finite gradient for ids {', '.join(cap.ids[i] for i in bad[:5])}")
        if cap.losses is None:
            cap.losses = np.full(len(cap.ids), np.nan)
        if cap._token_counts is not None:
            cap.tokens = cap._token_counts.numpy().astype(np.int64)
        elif cap.attention_mask is not None:
            cap.tokens = cap.attention_mask.sum(dim=1).cpu().numpy().astype(np.int64)
        else:
            cap.tokens = np.ones(len(cap.ids), dtype=np.int64)
        cap._parts.clear()


def check_ids(ids: Sequence[Any]) -> list[str]:
    """Ids as strings (ints are converted); an empty batch or an id repeated within the batch is refused."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
        raise InputError(f"capture: ids must be a list with one id per example, got {type(ids).__name__}")
    out = [str(i.item() if hasattr(i, "item") else i) for i in ids]
    if not out:
        raise InputError("capture: empty batch (no ids)")
    seen: set[str] = set()
    for i in out:
        if i in seen:
            raise InputError(f"capture: id {i!r} appears twice in one batch")
        seen.add(i)
    return out


def _tokens_view(t: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """``[B, d] → [B, 1, d]``, ``[B, T, d]`` as is, ``[B, ..., d] → [B, T', d]``; the leading dim must be B."""
    if t.dim() < 2 or t.shape[0] != batch:
        raise InputError(
            f"capture: module {name} saw input of shape {tuple(t.shape)} for a batch of {batch} ids "
            "(the leading dimension of a watched layer's input must be the batch)"
        )
    if t.dim() == 2:
        return t[:, None, :]
    return t.reshape(batch, -1, t.shape[-1])


def _mask_for(cap: Capture, name: str, output: torch.Tensor) -> torch.Tensor | None:
    mask = cap.attention_mask
    if mask is None:
        return None
    if output.dim() != 3 or tuple(output.shape[:2]) != tuple(mask.shape):
        raise InputError(
            f"capture: attention_mask has shape {tuple(mask.shape)} but module {name} outputs "
            f"{tuple(output.shape)}; the mask must be [B, T] of the watched layers' token axis"
        )
    return mask if mask.device == output.device else mask.to(output.device)


def _add(acc: dict, key: str, value: torch.Tensor) -> None:
    acc[key] = value if key not in acc else acc[key] + value


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _to_device(p: ModuleProjection, device: torch.device) -> ModuleProjection:
    move = (lambda m: None if m is None else m.to(device))
    return ModuleProjection(p.name, p.d_in, p.d_out, move(p.p_in), move(p.p_out))


# --------------------------------------------------------------------------------------------------------
# Staging: rows written as they fill, assembled into a store by finalize


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
        path = self.directory / f"{self._parts:05d}.npy"
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            np.save(fh, np.concatenate(self._buffer))
        os.replace(tmp, path)
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


# --------------------------------------------------------------------------------------------------------
# The logger


class GradientLogger:
    """`ProjectedGradients` + `RowStaging` + KFAC statistics; made by `watch`, finished by `finalize`."""

    def __init__(self, model: nn.Module, config: WatchConfig, modules: Sequence[tuple[str, nn.Module]],
                 out: Path, replace: bool):
        from dataworth.extract import build_projections, row_layout

        self.model = model
        self.config = config
        self.out = out
        self.replace = replace
        projections = build_projections(modules, config.projection, config.rank_in, config.rank_out, config.seed)
        self.layout = row_layout(modules, projections, config.projection, 0)
        self.digest = projection_digest([projections[n] for n, _ in modules])
        self.hooks = ProjectedGradients(model, modules, projections, collect_covariance=True)
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
        self.staging.append(cap.ids, cap.rows.numpy(), cap.losses, cap.tokens)
        for name in self.modules:
            _add(self.cov_in, name, cap._cov_in[name])
            _add(self.cov_out, name, cap._cov_out[name])
            self.n_tokens[name] = self.n_tokens.get(name, 0.0) + cap._n_tokens[name]
        self.captured += len(cap.ids)
        if cap._recorded:
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
        from dataworth.store import ModuleSpec, StoreWriter

        if not self.hooks._handles:
            raise InputError("finalize: the logger is already finalized or closed")
        if self.hooks._active is not None:
            raise InputError("finalize: a capture is still open")
        if not self.staging.order:
            raise InputError("finalize: nothing was captured; wrap a forward/backward in logger.capture(ids)")
        self.hooks.close()
        specs = [ModuleSpec(m["name"], m["k_out"], m["k_in"], m["offset"], m["size"], m["layout"])
                 for m in self.layout]
        writer = StoreWriter(self.out, modules=specs, dtype=self.config.dtype, shard_rows=self.config.shard_rows,
                             header=self._header(fingerprint), overwrite=self.replace)
        if writer.done_shards:
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
        from dataworth.models import model_fingerprint

        cfg = self.config
        ids_digest = hashlib.sha256("\n".join(self.staging.order).encode()).hexdigest()
        return {
            "projection": {"kind": cfg.projection, "seed": cfg.seed, "rank_in": cfg.rank_in, "rank_out": cfg.rank_out,
                           "digest": self.digest,
                           "modules": {m["name"]: [m["k_out"], m["k_in"]] for m in self.layout}},
            "model": {"fingerprint": model_fingerprint(self.model) if fingerprint else None, "path": "",
                      "captured": "during training (rows come from the weights at each capture)"},
            "data": {"fingerprint": ids_digest, "spec": "captured", "rows": len(self.staging.order)},
            "config": {**asdict(cfg), "source": "dataworth.logger", "module_info": self.layout, "max_length": None,
                       "captured_examples": self.captured, "measured_captures": self.measured_captures,
                       "declared_captures": self.declared_captures},
        }


def watch(model: nn.Module, modules: str | Sequence[str] | None = None, projection: str = "random",
          rank: int = 64, *, out: str | os.PathLike, rank_in: int | None = None, rank_out: int | None = None,
          seed: int = 0, dtype: str = "float16", shard_rows: int = 1024, loss_reduction: str = "sum",
          task=None, replace: bool = False) -> GradientLogger:
    """``dw.watch``: attach a gradient logger to ``model`` for a custom training loop; see the module docstring.

    ``modules``: ``all|mlp|attn|regex`` or a list of layer names (default: ``task.tracked_modules(model)``
    when a `dataworth.task.Task` is given, else ``all``). ``rank`` sets both LoGra ranks unless
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
