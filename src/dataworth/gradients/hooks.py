"""The one hook engine: a forward and backward pass in, LoGra-projected per-example gradient rows out.

Every way dataworth captures gradients goes through `GradientHooks`: extraction over a dataset
(`dataworth.gradients.extract`), query rows (`dataworth.gradients.queries`), custom training loops
(`dataworth.gradients.watch`), the `Task` path for any model, and LESS's LoRA features. So the per-example
maths below is written, and tested against ``torch.func`` per-sample gradients, once.

What is captured (LoGra, Choe et al. 2024, "What is Your Data Worth to GPT?", eq. 3). For a watched linear
layer ``y_t = W x_t`` (``nn.Linear``, or Hugging Face ``Conv1D`` with ``y = x W``) the forward hook keeps
``a_t = P_in x_t`` and a tensor hook on ``y`` keeps ``s_t = P_out δ_t`` with ``δ_t = ∂L/∂y_t`` for the loss
``L`` that is backpropagated; the row of example ``b`` is

    Ĝ_b = Σ_t s_{b,t} a_{b,t}ᵀ          (k_out × k_in per module, concatenated row-major in module order)

the store contract (docs/design.md). Hooks only *read* tensors and return nothing, so the parameter
``.grad`` an optimizer sees is bit-identical with and without them. A module called several times per
forward (weight sharing) contributes the sum over its calls, which is its gradient.

Loss weights (the classic per-example-gradient bug). If ``L = Σ_b w_b ℓ_b`` then ``δ_b = w_b ∂ℓ_b/∂y_b``: a
batch mean scales every row by ``w_b = 1/B``, gradient accumulation by a further ``1/k``, an AMP loss scaler
by its scale. The rows must be ``∇ℓ_b`` (``w_b = 1``), so ``s_{b,t}`` is divided by ``w_b``, found either

- *measured* (exact): ``capture.record(losses)`` hooks the per-example losses ``[B]``; the gradient the
  backward pass delivers there is exactly ``w_b = ∂L/∂ℓ_b`` and arrives before any module's (every watched
  output is upstream of the losses). A recorded loss that gets no gradient, or ``w_b = 0``, is an error;
- *declared*: ``loss_reduction="sum"`` (``w_b = 1``, what extraction backpropagates) or ``"mean"``
  (``w_b = 1/B``), times ``loss_scale``.

Example ``b``'s loss must depend on example ``b``'s layer outputs only (no batch norm across examples).

Frozen weights. When neither a watched layer's input nor its weight requires grad (extraction freezes the
model: only activation gradients are needed), a forward pre-hook makes that input a fresh leaf that
requires grad, so ``δ`` reaches the layer and the backward pass stops there instead of running into the
embeddings; this is why extraction can cost less than a training step.

Inputs of a watched layer: ``[B, d]`` (one vector per example) or ``[B, T, d]`` / ``[B, ..., d]`` (tokens; the
leading dimension is the batch). ``attention_mask`` ``[B, T]`` zeroes padding activations and output gradients
(with right padding and a causal model, padding ``δ`` is exactly 0 anyway).

Options of the engine (`GradientHooks`): ``collect_covariance`` sums the KFAC statistics ``Σ a aᵀ`` and
``Σ s sᵀ`` (float64) and the real-token counts per capture; ``covariance_only`` skips the per-example
products (PCA's first pass at full size); ``keep_tokens`` keeps ``a_t`` and ``s_t`` per module (exact per-token
attribution); ``check_finite`` refuses non-finite rows (extraction instead records and optionally zeroes
them). Rows stay on the model's device, so a GPU caller can overlap the copy to the host with the next batch.
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
    if reduction not in LOSS_REDUCTIONS:
        raise InputError(f"loss_reduction: must be one of {', '.join(LOSS_REDUCTIONS)}, got {reduction!r}")
    return reduction


def project(x: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """``x @ Pᵀ`` in float32 (identity when ``p`` is None)."""
    x = x.float()
    return x if p is None else x @ p.T


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def accumulate(acc: dict, key: str, value: torch.Tensor) -> None:
    """``acc[key] += value`` (set on first use); the order of additions is the order of the calls."""
    acc[key] = value if key not in acc else acc[key] + value


# --------------------------------------------------------------------------------------------------------
# One capture: one (micro-)batch in flight


@dataclass(eq=False)
class Capture:
    """One batch in flight: entered around a forward + backward; holds its results after a clean exit.

    After exit: ``rows`` ``[B, D]`` float32 on the model's device (None with ``covariance_only``),
    ``losses`` ``[B]`` float64 (NaN when not recorded), ``weights`` ``[B]`` (the ``w_b`` divided out);
    with ``collect_covariance`` ``cov_in`` / ``cov_out`` (module → ``Σ a aᵀ`` / ``Σ s sᵀ``, float64) and
    ``n_tokens`` (module → real tokens seen, a tensor); with ``keep_tokens`` ``token_acts`` / ``token_grads``
    (module → ``[B, T, k_in]`` / ``[B, T, k_out]``). `tokens` gives per-example token counts.
    """

    owner: "GradientHooks"
    ids: list[str]
    attention_mask: torch.Tensor | None
    declared_weight: float
    on_exit: Any = None
    rows: torch.Tensor | None = None
    losses: np.ndarray | None = None
    weights: torch.Tensor | None = None
    recorded: bool = False
    open: bool = True
    cov_in: dict = field(default_factory=dict)
    cov_out: dict = field(default_factory=dict)
    n_tokens: dict = field(default_factory=dict)
    token_acts: dict = field(default_factory=dict)
    token_grads: dict = field(default_factory=dict)
    _parts: dict = field(default_factory=dict)  # module -> [B, k_out, k_in] float32
    _seen: set = field(default_factory=set)  # modules whose output gradient arrived
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

        The backward pass then delivers ``w_b = ∂L/∂ℓ_b`` to them, which is divided out of example ``b``'s
        rows: any reduction (sum, mean, ``/accumulation_steps``, a loss scaler) gives ``∇ℓ_b``. A scalar
        (already reduced) loss is refused. ``tokens``: per-example token counts stored beside the rows
        (default: the attention mask's row sums, else 1).
        """
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or losses.shape[0] != len(self.ids):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise InputError(
                f"capture.record: losses have shape {shape}, expected [{len(self.ids)}] per-example losses "
                "(each summed over its own tokens) — pass them *before* reducing over the batch"
            )
        if not losses.requires_grad:
            raise InputError("capture.record: the losses do not require grad (computed under torch.no_grad?)")
        if self.recorded:
            raise InputError("capture.record: called twice in one capture; record the batch's losses once")
        self.recorded = True
        losses.register_hook(self._weights_hook)
        self.losses = losses.detach().double().cpu().numpy()
        if tokens is not None:
            self._token_counts = torch.as_tensor(tokens).reshape(-1).cpu()
            if self._token_counts.shape[0] != len(self.ids):
                raise InputError(f"capture.record: {self._token_counts.shape[0]} token counts for {len(self.ids)} ids")
        return losses

    def tokens(self) -> np.ndarray:
        """Per-example token counts ``[B]`` int64: as recorded, else the attention mask's row sums, else 1."""
        if self._token_counts is not None:
            return self._token_counts.numpy().astype(np.int64)
        if self.attention_mask is not None:
            return self.attention_mask.sum(dim=1).cpu().numpy().astype(np.int64)
        return np.ones(len(self.ids), dtype=np.int64)

    def _weights_hook(self, grad: torch.Tensor) -> None:
        if not self.open:
            return
        if self._measured is not None:
            self._problem = "backward ran twice through the recorded losses inside one capture"
        self._measured = grad.detach().double()

    def current_weights(self, device: torch.device) -> torch.Tensor | None:
        """``w_b`` ``[B]`` float64 if known now (declared, or measured by the losses hook), else None."""
        if self.recorded:
            return None if self._measured is None else self._measured.to(device)
        return torch.full((len(self.ids),), float(self.declared_weight), dtype=torch.float64, device=device)


# --------------------------------------------------------------------------------------------------------
# The engine


class GradientHooks:
    """Hooks on ``modules`` of ``model`` that turn one forward + backward inside `capture` into projected rows.

    ``projections``: module name → `ModuleProjection` (``None`` matrices mean identity: exact gradients).
    Options (module docstring): ``collect_covariance``, ``covariance_only``, ``keep_tokens``, ``check_finite``.
    Outside a capture the hooks do nothing. `close` removes them.
    """

    def __init__(self, model: nn.Module, modules: Sequence[tuple[str, nn.Module]],
                 projections: dict[str, ModuleProjection], *, collect_covariance: bool = True,
                 covariance_only: bool = False, keep_tokens: bool = False, check_finite: bool = True):
        self.model = model
        self.modules = list(modules)
        device = model_device(model)
        self.projections = {n: projection_to(projections[n], device) for n, _ in self.modules}
        self.collect_covariance = collect_covariance or covariance_only
        self.covariance_only = covariance_only
        self.keep_tokens = keep_tokens
        self.check_finite = check_finite
        self.active: Capture | None = None
        self.handles: list = []
        for name, module in self.modules:
            self.handles.append(module.register_forward_pre_hook(self._input_grad_hook))
            self.handles.append(module.register_forward_hook(self._forward_hook(name)))

    @property
    def dim(self) -> int:
        return sum(self.projections[n].k_out * self.projections[n].k_in for n, _ in self.modules)

    @property
    def closed(self) -> bool:
        return not self.handles

    def _projection(self, name: str, device: torch.device) -> ModuleProjection:
        """The module's projection on ``device`` (moved once: a Trainer may move the model after `watch`)."""
        proj = self.projections[name]
        matrix = proj.p_in if proj.p_in is not None else proj.p_out
        if matrix is not None and matrix.device != device:
            proj = self.projections[name] = projection_to(proj, device)
        return proj

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

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
    def _input_grad_hook(self, module: nn.Module, inputs: tuple):
        if self.active is None or not torch.is_grad_enabled() or not inputs:
            return None
        x = inputs[0]
        if not isinstance(x, torch.Tensor) or x.requires_grad or not x.is_floating_point():
            return None
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            return None
        return (x.detach().requires_grad_(True), *inputs[1:])

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            cap = self.active
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
                accumulate(cap.cov_in, name, flat.T @ flat)
                # a tensor, not a float: no host sync per layer call (it matters on a GPU)
                real = mask.sum(dtype=torch.float64) if mask is not None else float(a.shape[0] * a.shape[1])
                cap.n_tokens[name] = cap.n_tokens.get(name, 0.0) + real
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
                cap._seen.add(name)
                if self.collect_covariance:
                    flat_s = s.reshape(-1, s.shape[-1]).double()
                    accumulate(cap.cov_out, name, flat_s.T @ flat_s)
                if self.keep_tokens:
                    cap.token_acts[name], cap.token_grads[name] = a, s
                if not self.covariance_only:
                    accumulate(cap._parts, name, torch.bmm(s.transpose(1, 2), a))

            output.register_hook(grad_hook)

        return hook

    # -- capture lifecycle ---------------------------------------------------------------------------------
    def _begin(self, cap: Capture) -> None:
        if self.active is not None:
            raise InputError("capture: another capture is still open; captures cannot be nested")
        if self.closed:
            raise InputError("capture: the logger is closed (finalize() or close() was called)")
        if cap.attention_mask is not None:
            cap.attention_mask = cap.attention_mask.to(model_device(self.model))
        self.active = cap

    def _end(self, cap: Capture, failed: bool) -> None:
        self.active = None
        if failed:
            return
        if cap._problem is not None:
            raise InputError(f"capture: {cap._problem}")
        missing = [n for n, _ in self.modules if n not in cap._seen]
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
        cap.weights = w
        if cap.losses is None:
            cap.losses = np.full(len(cap.ids), np.nan)
        if self.covariance_only:
            return
        cap.rows = torch.cat([cap._parts[n].reshape(len(cap.ids), -1) for n, _ in self.modules], dim=1).float()
        cap._parts.clear()
        if self.check_finite:
            bad = torch.nonzero(~torch.isfinite(cap.rows).all(dim=1)).flatten().tolist()
            if bad:
                raise InputError(f"capture: non-finite gradient for ids {', '.join(cap.ids[i] for i in bad[:5])}")


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


def float32_projection_guards(modules: Sequence[tuple[str, nn.Module]], device_type: str) -> list:
    """Forward hooks that switch autocast off around the capture hooks of each watched module.

    Under ``torch.autocast`` a matmul runs in bf16/fp16 even on float32 inputs; the LoGra projection
    ``P_in x`` (and the covariance sums built from it) must stay float32, so a hook registered *before*
    the capture hook turns autocast off and one registered after it restores the previous state. The
    module's own forward still ran under autocast. (Backward runs outside autocast, see `Extractor.run`.)
    Register them after `GradientHooks` so they wrap its hooks.
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
