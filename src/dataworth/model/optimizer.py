"""The AdamW state a training checkpoint keeps, and what dataworth computes from it.

Why a module of its own: three methods read the same saved moments — LESS's Adam update direction
``Γ = m̂ / (√v̂ + ε)`` for pool gradients (`adam_update`), one more AdamW step on one row for the tail-patch
ground truth (`dataworth.evaluation.effects`, from `final_optimizer_dir`), and TrackStar's ``√v̂``
normalisation (`second_moment_estimates`). The state is written as safetensors + JSON (never pickle):
``optimizer.safetensors`` (``<name>.exp_avg``, ``<name>.exp_avg_sq``), ``optimizer.json`` (betas, eps, lr,
step per parameter, weight decay) and ``trainer_state.json`` (the epoch's learning rates, ``avg_lr`` = η̄).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dataworth.errors import InputError
from dataworth.util import atomic_write, write_json_atomic

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
TRAINER_STATE = "trainer_state.json"
STATE_KEYS = ("exp_avg", "exp_avg_sq")


def save_optimizer_state(optimizer: torch.optim.AdamW, model: torch.nn.Module, ckpt_dir: Path) -> None:
    """Write AdamW moments as safetensors (``"<name>.exp_avg"``, ``"<name>.exp_avg_sq"``) + JSON metadata.

    JSON: ``kind``, ``betas``, ``eps``, ``weight_decay`` (per name), current ``lr``, ``step`` per name, and
    ``params`` (names in optimizer order). Parameters the optimizer has not stepped yet are omitted.
    """
    from safetensors.torch import save_file

    by_param = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, int] = {}
    decay: dict[str, float] = {}
    group0 = optimizer.param_groups[0]
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                continue
            name = by_param[id(param)]
            for key in STATE_KEYS:
                tensors[f"{name}.{key}"] = state[key].detach().to("cpu", torch.float32).contiguous()
            steps[name] = int(state["step"])
            decay[name] = float(group["weight_decay"])
    meta = {
        "kind": "adamw",
        "betas": list(group0["betas"]),
        "eps": group0["eps"],
        "lr": group0["lr"],
        "weight_decay": decay,
        "step": steps,
        "params": list(steps),
    }
    atomic_write(ckpt_dir / OPTIMIZER_TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    write_json_atomic(ckpt_dir / OPTIMIZER_JSON, meta)


def load_optimizer_state(ckpt_dir: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read a checkpoint's AdamW state → ``({name: {"exp_avg": T, "exp_avg_sq": T}}, meta)``.

    ``meta`` is ``optimizer.json`` (betas, eps, step per name, …) with ``trainer_state.json`` under
    ``"trainer_state"`` when present. LESS's Adam direction: ``m̂/(√v̂+ε)`` with ``m̂ = m/(1-β₁ᵗ)``,
    ``v̂ = v/(1-β₂ᵗ)``, ``t = meta["step"][name]``.
    """
    from safetensors.torch import load_file

    ckpt = Path(ckpt_dir)
    tensors_path, meta_path = ckpt / OPTIMIZER_TENSORS, ckpt / OPTIMIZER_JSON
    for path in (tensors_path, meta_path):
        if not path.is_file():
            raise InputError(f"{path}: missing (not a dataworth training checkpoint)")
    meta = json.loads(meta_path.read_text())
    flat = load_file(str(tensors_path))
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        name, _, kind = key.rpartition(".")
        if kind not in STATE_KEYS:
            raise InputError(f"{tensors_path}: unexpected tensor '{key}' (expected '<name>.exp_avg[_sq]')")
        states.setdefault(name, {})[kind] = tensor
    if (ckpt / TRAINER_STATE).is_file():
        meta["trainer_state"] = json.loads((ckpt / TRAINER_STATE).read_text())
    return states, meta


def final_optimizer_dir(model_dir: str | os.PathLike) -> Path | None:
    """The directory holding the final AdamW state of a ``dataworth.model.train`` run, or None.

    ``train`` writes it to ``model_dir/checkpoints/epoch-<last>/`` (``model.optimizer.OPTIMIZER_TENSORS`` and
    ``OPTIMIZER_JSON``), not to ``model_dir`` itself; a directory holding both files (a checkpoint) is returned
    as is.
    """

    def holds_state(d: Path) -> bool:
        return (d / OPTIMIZER_TENSORS).is_file() and (d / OPTIMIZER_JSON).is_file()

    root = Path(model_dir)
    if holds_state(root):
        return root
    ckpts = sorted((root / "checkpoints").glob("epoch-*"), key=lambda p: int(p.name.split("-")[1])) \
        if (root / "checkpoints").is_dir() else []
    ckpts = [c for c in ckpts if holds_state(c)]
    return ckpts[-1] if ckpts else None


def saved_parameters(optimizer_dir: str | os.PathLike) -> list[str]:
    """Names of the parameters a checkpoint's optimizer state holds (``optimizer.json`` ``params``, optimizer
    order): the parameters its training run stepped."""
    return list(json.loads((Path(optimizer_dir) / OPTIMIZER_JSON).read_text()).get("params", []))


def state_covers(model: torch.nn.Module, optimizer_dir: Path) -> bool:
    """Whether the saved optimizer state (``optimizer.json`` ``params``) names every trainable parameter."""
    saved = set(saved_parameters(optimizer_dir))
    return all(name in saved for name, p in model.named_parameters() if p.requires_grad)


ADAM_CONVENTIONS = ("paper", "less_code")


@dataclass(frozen=True)
class AdamState:
    """A checkpoint's AdamW moments flattened in feature order (module by module, each row-major).

    ``exp_avg`` / ``exp_avg_sq`` / ``step`` are ``[D]`` (``step`` is the number of optimizer steps taken
    per element's parameter, float64); ``betas`` / ``eps`` are the optimizer's.
    """

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor
    betas: tuple[float, float]
    eps: float


def adam_update(grads: torch.Tensor, state: AdamState, convention: str = "paper") -> torch.Tensor:
    """Per-example Adam update direction Γ ``[B, D]`` for per-example gradients ``grads [B, D]``.

    ``m' = β₁ m + (1-β₁) g``, ``v' = β₂ v + (1-β₂) g²`` (the moments after one more step on ``g`` alone),

    - ``"paper"`` (LESS eq. in §2): ``Γ = (m'/(1-β₁ᵗ)) / (√(v'/(1-β₂ᵗ)) + ε)`` with ``t = step + 1``, the
      index of the step ``g`` would be (torch's AdamW convention: the bias correction of the update it
      is about to make);
    - ``"less_code"`` (LESS repository, ``obtain_gradients_with_adam``): ``Γ = m' / √(v' + ε)``, no bias
      correction, ε under the root.

    The sign of the learning-rate factor ``-η`` is dropped (LESS does too; it is common to all rows).
    Computed in float32.
    """
    if convention not in ADAM_CONVENTIONS:
        raise InputError(f"--adam-convention: must be one of {', '.join(ADAM_CONVENTIONS)}, got {convention!r}")
    g = grads.float()
    b1, b2 = state.betas
    m = b1 * state.exp_avg.to(g.device) + (1 - b1) * g
    v = b2 * state.exp_avg_sq.to(g.device) + (1 - b2) * g * g
    if convention == "less_code":
        return m / torch.sqrt(v + state.eps)
    t = state.step.to(g.device, torch.float64) + 1
    correction1 = (1 - b1 ** t).float()
    correction2 = (1 - b2 ** t).float()
    return (m / correction1) / (torch.sqrt(v / correction2) + state.eps)


def checkpoint_lr(ckpt: Path) -> float:
    """η̄ of a checkpoint: ``avg_lr`` of its ``trainer_state.json`` (the epoch's average learning rate)."""
    path = ckpt / TRAINER_STATE
    if not path.is_file():
        raise InputError(f"{path}: missing; LESS weights each checkpoint by its average learning rate")
    state = json.loads(path.read_text())
    lr = state.get("avg_lr")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise InputError(f"{path}: field 'avg_lr' must be a positive number, got {lr!r}")
    return float(lr)


def load_adam_state(ckpt: Path, modules: Sequence[tuple[str, torch.nn.Module]]) -> AdamState:
    """The AdamW moments of ``ckpt`` for ``modules`` (``(name, nn.Linear)``; parameter ``name + ".weight"``),
    flattened in module order, each ``[d_out, d_in]`` row-major — the feature layout of the hooks."""
    states, meta = load_optimizer_state(ckpt)
    avg, avg_sq, steps = [], [], []
    for name, module in modules:
        key = f"{name}.weight"
        if key not in states:
            raise InputError(f"{ckpt}: optimizer state has no moments for '{key}' (checkpoint and adapter "
                             "disagree: mismatched LoRA configuration?)")
        shape = tuple(module.weight.shape)
        for kind in ("exp_avg", "exp_avg_sq"):
            if tuple(states[key][kind].shape) != shape:
                raise InputError(f"{ckpt}: '{key}.{kind}' has shape {tuple(states[key][kind].shape)}, "
                                 f"the weight has {shape} (mismatched LoRA configuration)")
        avg.append(states[key]["exp_avg"].reshape(-1))
        avg_sq.append(states[key]["exp_avg_sq"].reshape(-1))
        steps.append(torch.full((module.weight.numel(),), float(meta["step"][key]), dtype=torch.float64))
    betas = tuple(float(b) for b in meta["betas"])
    return AdamState(torch.cat(avg).float(), torch.cat(avg_sq).float(), torch.cat(steps), betas,
                     float(meta["eps"]))


def second_moment_estimates(ckpt_dir: str | Path) -> tuple[dict[str, np.ndarray], float]:
    """``({parameter name: v̂ float64}, eps)`` of a checkpoint: ``v̂ = exp_avg_sq / (1 − β₂ᵗ)``, the bias-corrected
    AdamW second moment after ``t = step`` steps, shaped like the parameter (TrackStar's ``√v̂ + ε``
    normalisation, Chang et al. 2024, §3)."""
    states, meta = load_optimizer_state(ckpt_dir)
    beta2 = float(meta["betas"][1])
    out = {}
    for name, state in states.items():
        out[name] = state["exp_avg_sq"].numpy().astype(np.float64) / (1.0 - beta2 ** int(meta["step"][name]))
    return out, float(meta["eps"])

