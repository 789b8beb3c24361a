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

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from dataworth.errors import InputError
from dataworth.gradients.projection import ModuleProjection, projection_to
from dataworth.gradients.task import check_ids

LOSS_REDUCTIONS = ("sum", "mean")


def check_reduction(reduction: str) -> str:
    """``sum`` or ``mean``, else an `InputError` naming the allowed values."""
    if reduction not in LOSS_REDUCTIONS:
        raise InputError(f"loss_reduction: must be one of {', '.join(LOSS_REDUCTIONS)}, got {reduction!r}")
    return reduction


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
        device = model_device(model)
        self.projections = {n: projection_to(projections[n], device) for n, _ in self.modules}
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
            proj = self.projections[name] = projection_to(proj, device)
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
                accumulate(cap._cov_in, name, flat.T @ flat)
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
                accumulate(cap._parts, name, torch.bmm(s.transpose(1, 2), a))
                if self.collect_covariance:
                    flat_s = s.reshape(-1, s.shape[-1]).double()
                    accumulate(cap._cov_out, name, flat_s.T @ flat_s)

            output.register_hook(grad_hook)

        return hook

    # -- capture lifecycle ---------------------------------------------------------------------------------
    def _begin(self, cap: Capture) -> None:
        if self._active is not None:
            raise InputError("capture: another capture is still open; captures cannot be nested")
        if not self._handles:
            raise InputError("capture: the logger is closed (finalize() or close() was called)")
        if cap.attention_mask is not None:
            cap.attention_mask = cap.attention_mask.to(model_device(self.model))
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


def accumulate(acc: dict, key: str, value: torch.Tensor) -> None:
    acc[key] = value if key not in acc else acc[key] + value


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def project(x: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """``x @ Pᵀ`` in float32 (identity when ``p`` is None)."""
    x = x.float()
    return x if p is None else x @ p.T


@dataclass
class ModuleCapture:
    """Per-module state of one captured batch."""

    proj: ModuleProjection
    acts: torch.Tensor | None = None  # [B, T, k_in]
    grads: torch.Tensor | None = None  # [B, k_out, k_in]
    cov_in: torch.Tensor | None = None  # Σ_t a aᵀ over real tokens (float64), when collecting
    cov_out: torch.Tensor | None = None  # Σ_b Σ_t s sᵀ (float64), when collecting
    token_acts: torch.Tensor | None = None  # [B, T, k_in], kept only when per-token attribution asks
    token_grads: torch.Tensor | None = None  # [B, T, k_out]


@dataclass
class GradientHooks:
    """Hooks on a set of layers; call `capture` around a forward/backward of one batch.

    ``collect_covariance``: accumulate the (projected) KFAC factors ``Σ a aᵀ`` and ``Σ s sᵀ`` over real
    tokens; ``covariance_only``: skip the per-example products (PCA first pass).
    """

    modules: list[tuple[str, nn.Module]]
    projections: dict[str, ModuleProjection]
    collect_covariance: bool = False
    covariance_only: bool = False
    keep_tokens: bool = False
    captures: dict[str, ModuleCapture] = field(default_factory=dict)
    _handles: list = field(default_factory=list)
    _mask: torch.Tensor | None = None

    def attach(self) -> "GradientHooks":
        for name, module in self.modules:
            cap = ModuleCapture(self.projections[name])
            self.captures[name] = cap
            self._handles.append(module.register_forward_hook(self._forward_hook(cap)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def set_mask(self, attention_mask: torch.Tensor) -> None:
        """Real-token mask ``[B, T]`` of the batch about to run; padding activations are zeroed."""
        self._mask = attention_mask.float()

    def _forward_hook(self, cap: ModuleCapture):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not torch.is_grad_enabled() or not output.requires_grad:
                return
            x = inputs[0]
            mask = self._mask
            if mask is not None and x.dim() == 3:
                a = project(x.detach(), cap.proj.p_in) * mask[..., None].to(x.device)
            else:
                a = project(x.detach(), cap.proj.p_in)
            cap.acts = a
            if self.collect_covariance:
                flat = a.reshape(-1, a.shape[-1]).double()
                add = flat.T @ flat
                cap.cov_in = add if cap.cov_in is None else cap.cov_in + add

            def grad_hook(grad: torch.Tensor) -> None:
                s = project(grad, cap.proj.p_out)
                if self.collect_covariance:
                    flat_s = s.reshape(-1, s.shape[-1]).double()
                    add_s = flat_s.T @ flat_s
                    cap.cov_out = add_s if cap.cov_out is None else cap.cov_out + add_s
                if self.keep_tokens:
                    cap.token_acts, cap.token_grads = cap.acts, s
                if not self.covariance_only:
                    act = cap.acts
                    if s.dim() == 2:  # unbatched use: [T, k]
                        s, act = s[None], act[None]
                    cap.grads = torch.bmm(s.transpose(1, 2), act)  # [B, k_out, k_in]
                cap.acts = None

            output.register_hook(grad_hook)

        return hook

    def reset_covariance(self) -> None:
        for cap in self.captures.values():
            cap.cov_in = cap.cov_out = None

    def take_rows(self) -> torch.Tensor:
        """Concatenate each module's Ĝ (row-major, module order) into rows ``[B, D]`` and clear them."""
        parts = []
        for name, _ in self.modules:
            cap = self.captures[name]
            if cap.grads is None:
                raise RuntimeError(
                    f"module {name} received no gradient: it does not influence the loss (remove it from --modules)"
                )
            parts.append(cap.grads.reshape(cap.grads.shape[0], -1))
            cap.grads = None
        return torch.cat(parts, dim=1)


def enable_input_grads(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make the embedding output require grad so activation gradients flow with frozen weights."""
    emb = model.get_input_embeddings()

    def hook(module, inputs, output):
        return output.requires_grad_(True)

    return emb.register_forward_hook(hook)


def float32_projection_guards(modules: Sequence[tuple[str, nn.Module]], device_type: str) -> list:
    """Forward hooks that switch autocast off around the capture hooks of each watched module.

    Under ``torch.autocast`` a matmul runs in bf16/fp16 even on float32 inputs; the LoGra projection
    ``P_in x`` (and the covariance sums built from it) must stay float32, so a hook registered *before*
    the capture hook turns autocast off and one registered after it restores the previous state. The
    module's own forward still ran under autocast. (Backward runs outside autocast, see `Extractor.run`.)
    """
    handles, saved = [], {}

    def off(module, inputs, output):
        saved[id(module)] = torch.is_autocast_enabled(device_type)
        torch.set_autocast_enabled(device_type, False)

    def restore(module, inputs, output):
        torch.set_autocast_enabled(device_type, saved.pop(id(module), False))

    for _name, module in modules:
        handles.append(module.register_forward_hook(off, prepend=True))
        handles.append(module.register_forward_hook(restore))
    return handles
