"""Encoded rows → padded batches with loss masks, and the per-example loss every stage agrees on.

Why a module of its own: training, extraction, scoring and evaluation must all compute *the same* loss —
summed (never averaged) over an example's target tokens, with prompt tokens and padding contributing
exactly nothing. A per-example gradient of a mean loss depends on what else is in the batch; that is the
classic bug this module exists to rule out.

Convention (causal LM): token ``t`` is a *target* when ``loss_mask[t] == 1``; it is predicted from the
logits at position ``t - 1``. ``loss_mask[0]`` is always 0. Padding is on the right.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Encoded:
    """One tokenized row: ids, which tokens are targets, and whether truncation cut it."""

    id: str
    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"row {self.id}: {len(self.input_ids)} tokens but {len(self.loss_mask)} mask entries")

    @property
    def n_targets(self) -> int:
        return int(sum(self.loss_mask[1:]))


@dataclass
class Batch:
    """Right-padded batch. Shapes: ``input_ids``, ``attention_mask``, ``loss_mask`` are ``[B, T]``.

    ``index`` holds each row's position in the dataset (so results can be written back in dataset order
    after length-sorted batching); ``ids`` holds the rows' stable ids.
    """

    ids: list[str]
    index: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    extra: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            ids=self.ids,
            index=self.index,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            loss_mask=self.loss_mask.to(device),
            extra=self.extra,
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(rows: Sequence[Encoded], index: Sequence[int], pad_id: int) -> Batch:
    """Pad ``rows`` on the right to the longest one. Padding has attention 0 and loss mask 0."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        input_ids[i, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        attention[i, :n] = 1
        mask[i, :n] = torch.tensor(r.loss_mask, dtype=torch.float32)
    mask[:, 0] = 0.0
    return Batch(
        ids=[r.id for r in rows],
        index=torch.tensor(list(index), dtype=torch.long),
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=mask,
    )


def plan_batches(
    lengths: Sequence[int],
    batch_size: int | None = None,
    token_budget: int | None = None,
    sort_by_length: bool = False,
) -> list[list[int]]:
    """Group row positions into batches.

    ``batch_size``: at most that many rows per batch. ``token_budget``: at most that many *padded* tokens
    per batch (rows × longest row), which cuts padding when combined with ``sort_by_length``. A single row
    longer than the budget still gets a batch of its own. Every position appears exactly once.
    """
    if batch_size is None and token_budget is None:
        batch_size = 8
    if batch_size is not None and batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if token_budget is not None and token_budget < 1:
        raise ValueError("token_budget must be >= 1")
    order = list(range(len(lengths)))
    if sort_by_length:
        # Longest first (stable), so a too-long row fails early rather than after hours.
        order.sort(key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        grown = max(longest, lengths[i])
        too_many = batch_size is not None and len(current) >= batch_size
        too_big = token_budget is not None and current and grown * (len(current) + 1) > token_budget
        if current and (too_many or too_big):
            batches.append(current)
            current, grown = [], lengths[i]
        current.append(i)
        longest = grown
    if current:
        batches.append(current)
    return batches


def token_losses(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Cross-entropy of each target token, ``[B, T]``; 0 at non-targets (position 0, prompt, padding).

    ``out[b, t] = -log p(input_ids[b, t] | input_ids[b, :t]) * loss_mask[b, t]``, computed in float32.
    """
    b, t, v = logits.shape
    shifted = logits[:, :-1, :].float()
    targets = batch.input_ids[:, 1:]
    ce = F.cross_entropy(shifted.reshape(-1, v), targets.reshape(-1), reduction="none").view(b, t - 1)
    out = torch.zeros((b, t), dtype=torch.float32, device=logits.device)
    out[:, 1:] = ce * batch.loss_mask[:, 1:].to(ce.dtype)
    return out


def example_losses(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-example loss ``[B]``: the *sum* over that example's target tokens (never the mean)."""
    return token_losses(logits, batch).sum(dim=1)


def batches(
    encoded: Sequence[Encoded],
    pad_id: int,
    batch_size: int | None = None,
    token_budget: int | None = None,
    sort_by_length: bool = False,
) -> Iterator[Batch]:
    """Padded batches over ``encoded`` (``dataworth.data.batching.plan_batches`` + ``collate``); ``Batch.index``
    holds positions in ``encoded``, so results can be written back in dataset order."""
    plan = plan_batches([len(e.input_ids) for e in encoded], batch_size=batch_size, token_budget=token_budget,
                        sort_by_length=sort_by_length)
    for positions in plan:
        yield collate([encoded[i] for i in positions], positions, pad_id)
