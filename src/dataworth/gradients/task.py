"""Tasks: what a model *means* — its per-example training loss, the query measurement, the layers to track.

Why a module of its own: extraction, query gradients and the custom-loop logger only need three answers
from the model's owner (the interface kronfluence calls a Task), so any ``nn.Module`` with linear layers
works, not just a causal LM:

- ``compute_train_loss(batch, model) -> [B]``: each example's own loss, *summed* over its tokens (never
  averaged over the batch — a batch mean would scale every per-example gradient by ``1/B``; a scalar is
  refused). Store rows are ``∇_W`` of these.
- ``compute_measurement(batch, model) -> [B]``: the quantity a query asks about, oriented as a *loss*
  (lower = better). Scores are ``s(q, n) = ∇f_qᵀ (F + λI)⁻¹ ∇ℓ_n ≈ -df_q/dε_n``, so a positive score means
  up-weighting training example ``n`` lowers ``f_q``: it *helps* (the sign convention of `dataworth.influence.scores`).
- ``tracked_modules(model) -> [names]``: the linear layers whose gradients are kept (default: all of them
  but the output head; only ``nn.Linear`` / HF ``Conv1D`` are supported, anything else is refused by name).

Batch protocol (the minimum dataworth itself relies on): a batch is any object with ``ids`` — one stable
string id per example, in batch order — and optionally ``to(device)``; everything else is the task's
business. `Task.token_mask` may return a ``[B, T]`` real-token mask (padding activations are then zeroed);
without one, every position counts. Two ready batch types: `dataworth.data.batching.Batch` (tokenized rows with
loss masks; `LanguageModelTask`) and `TensorBatch` (``ids``, ``inputs``, ``targets``;
`ClassificationMarginTask`, `FunctionTask`).

Ready tasks:

- `LanguageModelTask`: causal-LM loss summed over target tokens (``data.batching.example_losses``); the
  measurement is the same loss — for prompt/response rows, the response given the prompt.
- `ClassificationMarginTask`: cross-entropy training loss; measurement ``-margin`` with TRAK's margin
  ``m = z_y - log Σ_{j≠y} exp z_j`` (Park et al. 2023, "TRAK", §3), negated so "lower is better" holds and a
  positive score means the training example raises the correct class's margin (Kronfluence uses the same).
- `FunctionTask`: any user callables ``(batch, model) -> [B]``.

Where tasks are used: `dataworth.gradients.extract.extract_with_task` (what ``dw.extract(config, model=...,
task=..., batches=...)`` runs), `dataworth.gradients.queries.measurement_gradients` (query rows in a store's
layout) and `dataworth.influence.score.score_with_task` (query rows → scores). This module imports no
machinery: a task knows what the model means, not how gradients are captured.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dataworth.data.batching import example_losses
from dataworth.errors import InputError
from dataworth.gradients.modules import resolve_modules


class Task(ABC):
    """What the model means; subclass it, or use `LanguageModelTask`, `ClassificationMarginTask`, `FunctionTask`."""

    modules: str | Sequence[str] = "all"

    @abstractmethod
    def compute_train_loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Per-example training losses ``[B]``, each summed over that example's tokens."""

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Per-example query measurement ``[B]``, oriented as a loss (default: the training loss)."""
        return self.compute_train_loss(batch, model)

    def tracked_modules(self, model: nn.Module) -> list[str]:
        """Names of the linear layers to track (default: ``self.modules``, ``all`` = every linear but the head)."""
        return [name for name, _ in resolve_modules(model, self.modules)]

    def token_mask(self, batch: Any) -> torch.Tensor | None:
        """``[B, T]`` real-token mask, or None when the watched layers see one vector per example."""
        return None

    def batch_ids(self, batch: Any) -> list[str]:
        """The batch's example ids (the batch protocol: ``batch.ids``)."""
        if not hasattr(batch, "ids"):
            raise InputError(f"batch: a {type(batch).__name__} has no 'ids'; a batch must carry one id per example")
        return check_ids(batch.ids)


@dataclass(frozen=True)
class LanguageModelTask(Task):
    """Causal LM on `dataworth.data.batching.Batch`: loss = measurement = summed cross-entropy over target tokens.

    Example: ``dw.extract(cfg, model=model, encoded=rows, task=LanguageModelTask(modules="mlp"))``.
    """

    modules: str | Sequence[str] = "all"

    def compute_train_loss(self, batch, model):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return example_losses(logits, batch)

    def token_mask(self, batch):
        return batch.attention_mask


@dataclass(frozen=True)
class ClassificationMarginTask(Task):
    """Classifier on `TensorBatch` (``model(inputs) -> logits [B, C]``, integer ``targets [B]``).

    Train loss: ``CE(z, y)`` per example. Measurement: ``-m``, ``m = z_y - logsumexp_{j≠y} z_j`` (TRAK's
    margin; lower ``-m`` = more confidently correct), so positive scores mean "helps classify correctly".
    Example: ``ClassificationMarginTask(modules=("net.0", "net.2"))``.
    """

    modules: str | Sequence[str] = "all"

    def compute_train_loss(self, batch, model):
        return F.cross_entropy(model(batch.inputs), batch.targets, reduction="none")

    def compute_measurement(self, batch, model):
        return -classification_margin(model(batch.inputs), batch.targets)


@dataclass(frozen=True)
class FunctionTask(Task):
    """A task from plain callables ``(batch, model) -> [B]``; ``measurement`` defaults to ``train_loss``.

    Example: ``FunctionTask(lambda b, m: ((m(b.inputs).squeeze(1) - b.targets) ** 2))`` (squared error).
    ``mask``: optional ``batch -> [B, T]`` real-token mask.
    """

    train_loss: Callable[[Any, nn.Module], torch.Tensor]
    measurement: Callable[[Any, nn.Module], torch.Tensor] | None = None
    modules: str | Sequence[str] = "all"
    mask: Callable[[Any], torch.Tensor] | None = None

    def compute_train_loss(self, batch, model):
        return self.train_loss(batch, model)

    def compute_measurement(self, batch, model):
        return (self.measurement or self.train_loss)(batch, model)

    def token_mask(self, batch):
        return None if self.mask is None else self.mask(batch)


def classification_margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``m_b = z_{b,y_b} - log Σ_{j≠y_b} exp z_{b,j}`` for logits ``[B, C]`` and targets ``[B]`` (TRAK, §3)."""
    correct = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(targets, logits.shape[1]).bool(), float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


@dataclass
class TensorBatch:
    """A batch of plain tensors: ``ids`` (one per example), ``inputs [B, ...]``, optional ``targets [B, ...]``."""

    ids: list[str]
    inputs: torch.Tensor
    targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device) -> "TensorBatch":
        return TensorBatch(self.ids, self.inputs.to(device), None if self.targets is None else self.targets.to(device))


def tensor_batches(inputs: torch.Tensor, targets: torch.Tensor | None = None, ids: Sequence[Any] | None = None,
                   batch_size: int = 64) -> list[TensorBatch]:
    """Split ``inputs`` (and ``targets``) into `TensorBatch` es of ``batch_size`` rows; ids default to row numbers."""
    n = inputs.shape[0]
    if targets is not None and targets.shape[0] != n:
        raise InputError(f"targets: {targets.shape[0]} rows for {n} inputs")
    ids = [str(i) for i in (range(n) if ids is None else ids)]
    if len(ids) != n:
        raise InputError(f"ids: {len(ids)} ids for {n} inputs")
    if batch_size < 1:
        raise InputError(f"batch_size: must be >= 1, got {batch_size}")
    return [TensorBatch(ids[i:i + batch_size], inputs[i:i + batch_size],
                        None if targets is None else targets[i:i + batch_size]) for i in range(0, n, batch_size)]


def per_example(values: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """Refuse anything but ``[n]`` per-example values (a scalar is a batch-reduced loss: the classic bug)."""
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.shape[0] != n:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise InputError(
            f"{what} returned shape {shape}, expected [{n}] per-example values (each summed over its own tokens, "
            "not averaged over the batch)"
        )
    return values


@contextlib.contextmanager
def frozen(model: nn.Module):
    """Eval mode and ``requires_grad=False`` on every weight (only activation gradients are needed); restored."""
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved.get(name, True))
        model.train(was_training)


def batch_to(batch: Any, device: torch.device) -> Any:
    return batch.to(device) if hasattr(batch, "to") else batch


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
