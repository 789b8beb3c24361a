"""A model's per-example losses on encoded rows, without gradients: the one evaluation loop.

Why a module of its own: retrains measure their query losses, one-step effects measure the queries before
and after a step, LESS evaluates held-out loss and the pre-filter reads losses and hidden states. All of them
run the same no-grad forward over padded batches and read ``data.batching.example_losses`` (the loss *summed* over
each row's target tokens); each only chooses its batches and what it keeps.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from dataworth.data.batching import Batch, Encoded, collate, example_losses


def consecutive_batches(encoded: Sequence[Encoded], pad_id: int, batch_size: int) -> list[Batch]:
    """Rows ``[0, b), [b, 2b), …`` of ``encoded`` collated in order (``Batch.index`` = their positions)."""
    out = []
    for start in range(0, len(encoded), batch_size):
        index = list(range(start, min(start + batch_size, len(encoded))))
        out.append(collate([encoded[i] for i in index], index, pad_id))
    return out


@torch.no_grad()
def forward_batches(model: torch.nn.Module, batches: Iterable[Batch], **kwargs: Any) -> Iterator[tuple[Batch, Any]]:
    """``(batch on the model's device, model output)`` for each batch, under ``torch.no_grad``; ``kwargs`` go to
    the model (e.g. ``output_hidden_states=True``). The model's train/eval mode is left as it is."""
    device = next(model.parameters()).device
    for batch in batches:
        batch = batch.to(device)
        yield batch, model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)


def batch_losses(model: torch.nn.Module, batches: Sequence[Batch]) -> np.ndarray:
    """``[N]`` float64: each row's summed target loss, written at its ``Batch.index`` (N = rows in ``batches``)."""
    out = np.zeros(sum(len(b) for b in batches), dtype=np.float64)
    for batch, output in forward_batches(model, batches):
        out[batch.index.numpy()] = example_losses(output.logits, batch).double().cpu().numpy()
    return out


def query_losses(model: torch.nn.Module, encoded_queries: Sequence[Encoded], pad_id: int,
                 batch_size: int = 64) -> np.ndarray:
    """``[Q]`` float64: each query's loss summed over its target tokens, in eval mode, batches in row order."""
    model.eval()
    return batch_losses(model, consecutive_batches(encoded_queries, pad_id, batch_size))
