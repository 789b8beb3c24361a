"""Reference attributions that need no gradients: what a gradient method must beat (or explain losing to).

BM25 (Robertson & Zaragoza 2009) over the training documents, with the query's prompt and response as the
search text: an oracle for "which documents state this fact" when gold documents share the query's words.
Representation similarity: the cosine of the model's mean final hidden states of query and document, which
DATE-LM (Jiao et al. 2025) found competitive with gradient attribution at 8B — one forward pass per row.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from dataworth.data.batching import Encoded
from dataworth.model.losses import consecutive_batches, forward_batches

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased word tokens for lexical baselines."""
    return _WORD.findall(text.lower())


def bm25_scores(documents: Sequence[str], queries: Sequence[str]) -> np.ndarray:
    """BM25 (Okapi, `rank_bm25`) relevance of every document to every query: ``[Q, N]`` float64.

    The lexical baseline that attribution must beat on fact tracing.
    """
    from rank_bm25 import BM25Okapi

    index = BM25Okapi([words(d) for d in documents])
    return np.stack([np.asarray(index.get_scores(words(q)), dtype=np.float64) for q in queries])


def mean_final_hidden_states(model: torch.nn.Module, encoded: Sequence[Encoded], pad_id: int,
                             batch_size: int = 32) -> np.ndarray:
    """``[N, H]`` float64: each row's last-layer hidden state averaged over its attended tokens (the whole row:
    prompt and response for a query, as the model reads it)."""
    model.eval()
    out = None
    for batch, output in forward_batches(model, consecutive_batches(encoded, pad_id, batch_size),
                                         output_hidden_states=True):
        hidden = output.hidden_states[-1].double()
        mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
        if out is None:
            out = np.zeros((len(encoded), mean.shape[-1]))
        out[batch.index.numpy()] = mean.cpu().numpy()
    return out if out is not None else np.zeros((0, 0))


def representation_similarity(model: torch.nn.Module, train: Sequence[Encoded], queries: Sequence[Encoded],
                              pad_id: int, batch_size: int = 32) -> np.ndarray:
    """``[Q, N]`` float64 cosine similarity of mean final hidden states (a zero vector scores 0)."""
    return unit_rows(mean_final_hidden_states(model, queries, pad_id, batch_size)) @ unit_rows(
        mean_final_hidden_states(model, train, pad_id, batch_size)).T


def unit_rows(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero): the cosine's normalisation."""
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
