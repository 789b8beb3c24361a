"""Forward/backward hooks that capture LoGra-projected per-example gradients of linear layers.

For a watched layer ``y_t = W x_t`` (``nn.Linear``, or Hugging Face ``Conv1D`` with ``y = x W``), the
forward hook keeps ``a_t = P_in x_t`` and a tensor hook on the output keeps ``s_t = P_out δ_t`` with
``δ_t = ∂L/∂y_t``; the per-example projected gradient is the batched product

    Ĝ_b = Σ_t s_{b,t} a_{b,t}ᵀ          (k_out × k_in, one per example b)

(LoGra, Choe et al. 2024, eq. 3). With a loss that is a *sum* of per-example losses, ``δ_{b,t}`` only
depends on example b, so Ĝ_b is that example's own gradient whatever else is in the batch. Padding tokens
have δ = 0 exactly (right padding, causal attention, zero loss mask); their activations are zeroed too.

Model weights never need ``.grad``: `watch` makes the input embeddings' output require grad so the
backward pass computes activation gradients only, which is why extraction can be cheaper than a training
step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from dataworth.errors import InputError
from dataworth.projection import ModuleProjection

try:  # transformers' GPT-2 style layer: weight is (d_in, d_out), y = x @ W + b
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a hard dependency, this is belt and braces
    Conv1D = ()  # type: ignore[assignment]

MODULE_GROUPS = {
    "mlp": re.compile(r"(mlp|feed_forward|ffn|dense_h_to_4h|dense_4h_to_h|fc_in|fc_out|c_fc)"),
    "attn": re.compile(r"(attn|attention|self_attn|q_proj|k_proj|v_proj|o_proj|query_key_value)"),
}


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a supported layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape  # Conv1D stores weight as (in, out)
    return int(d_in), int(d_out)


def weight_layout(module: nn.Module) -> str:
    """How ``weight.grad`` relates to a store row: rows are always Ĝ as (k_out × k_in); Conv1D's weight is (in × out)."""
    return "out_in" if isinstance(module, nn.Linear) else "in_out"


def select_modules(model: nn.Module, spec: str = "all", include_lm_head: bool = False) -> list[tuple[str, nn.Module]]:
    """Supported layers chosen by ``spec``: ``all``, ``mlp``, ``attn`` or a regex searched in module names.

    The output head is left out of ``all`` (it is as large as the vocabulary and LoGra/LogIX skip it too);
    name it in a regex to watch it. No match is an error that lists what is available.
    """
    candidates = [(n, m) for n, m in model.named_modules() if n and is_supported(m)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if spec == "all":
        chosen = [(n, m) for n, m in candidates if include_lm_head or m is not head]
    elif spec in MODULE_GROUPS:
        rx = MODULE_GROUPS[spec]
        chosen = [(n, m) for n, m in candidates if rx.search(n) and m is not head]
    else:
        try:
            rx = re.compile(spec)
        except re.error as exc:
            raise InputError(f"--modules: invalid regular expression {spec!r}: {exc}") from None
        chosen = [(n, m) for n, m in candidates if rx.search(n)]
    if not chosen:
        available = ", ".join(n for n, _ in candidates[:40]) + (" ..." if len(candidates) > 40 else "")
        raise InputError(
            f"--modules {spec!r} matches no supported layer (nn.Linear / Conv1D); available: {available or 'none'}"
        )
    return chosen


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


def project(x: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """``x @ Pᵀ`` in float32 (identity when ``p`` is None)."""
    x = x.float()
    return x if p is None else x @ p.T


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
