"""Retraining on subsets of the training data, with an on-disk resumable cache: the ground truth of evaluation.

Why a module of its own: the Linear Datamodeling Score (LDS, Park et al. 2023, "TRAK", §2.2), leave-k-out
and brittleness tests (Ilyas et al. 2022; Bae et al. 2024) all judge an attribution method against what
*really* happens to a query's loss when the model is retrained without some documents. Retraining is by far
the most expensive part of evaluation, so every retrain is cached on disk, one file per retrain, and a killed
run resumes. Several benchmarks (``benchmarks/lds.py``, ``benchmarks/peers.py``) score different attribution
methods against the *same* retrains by calling `build_lds_task` with the same `LdsConfig`.

The task (``build_lds_task(out_dir, LdsConfig(...)) -> LdsTask``)::

    out_dir/cache.json                 the configuration (see `LdsConfig.identity`); another one is refused
    out_dir/model/                     the full-data model (``dataworth.train``): the model being attributed,
                                       with ``checkpoints/epoch-N/`` for ``LdsConfig.checkpoints`` epochs
    out_dir/retrains/subset-MMM-rR.json  one LDS retrain: subset M, replicate (seed) R
    out_dir/retrains/removal-<sha>-rR.json  one removal retrain (leave-k-out / brittleness), keyed by the
                                       removed set; ``full-rR.json`` is the all-rows reference retrain

Public API: ``LdsConfig``, ``build_lds_task(out, config) -> LdsTask`` (``load_lds_task`` never trains),
``LdsTask.evaluate(scores [Q, N]) -> dict`` (``evaluate.lds_summary``), ``removal_losses`` / ``full_losses`` /
``removal_test`` (leave-k-out, brittleness), ``AttributionConfig`` + ``attribution_scores(task, method)``
(dataworth's own scores for the task), ``one_step_effects`` (the ``[Q, N]`` effect of one more training
step on each row: the ground truth of the tail-patch metric, ``evaluate.tail_patch``), and ``eval_lds`` /
``eval_brittleness`` / ``eval_facts`` (the CLI).

A retrain file (written atomically when that retrain is done)::

    {"name": "subset-003-r0", "seed": 1234, "included": ["doc-001", ...],  # ids of the training rows used
     "losses": [12.3, ...],           # per query (cache.json "query_ids" order): summed response loss
     "train_loss": 0.41, "seconds": 9.8}

Retrains: subset ``m`` holds exactly ``round(α·N)`` rows drawn without replacement with a generator seeded by
``(seed, m)``; replicate ``r`` of subset ``m`` trains from scratch with its own seed (init + shuffle), so the
replicates of a subset differ only by training noise — that is what the noise ceiling measures. The loop is
``dataworth.train``'s (same model builder, AdamW, schedule, clipping, seeded shuffle) on the full-data
model's tokenizer; with every row and the base seed it reproduces ``dataworth.train`` bit for bit (tested).
Models are not kept: only the per-query losses.

The query measurement is ``batching.example_losses``, the loss summed over the query's target tokens, with
``LdsConfig.measure`` choosing which: ``answer`` (default) — the response tokens only, the same measurement
``extract.query_gradients`` attributes by default — or ``answer+end`` — the response *and* the end token that
``data.encode_rows`` appends (what caches made before ``measure`` existed hold; they open as ``answer+end``).
``AttributionConfig.measure_end_token`` chooses what the *attribution* measures, so the two can be crossed.
Sign convention shared with ``dataworth.scoring``: a positive score means the training row *lowers* the query
loss, so the LDS correlates summed scores with the *negated* loss (``dataworth.evaluate.lds``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from dataworth.data.batching import collate, example_losses


@torch.no_grad()
def query_losses(model: torch.nn.Module, encoded_queries: Sequence[Any], pad_id: int, batch_size: int = 64) -> np.ndarray:
    """``[Q]`` float64: each query's loss summed over its target tokens (``batching.example_losses``)."""

    device = next(model.parameters()).device
    out = np.zeros(len(encoded_queries), dtype=np.float64)
    model.eval()
    for start in range(0, len(encoded_queries), batch_size):
        index = list(range(start, min(start + batch_size, len(encoded_queries))))
        batch = collate([encoded_queries[i] for i in index], index, pad_id).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        out[index] = example_losses(logits, batch).double().cpu().numpy()
    return out


@torch.no_grad()
def batch_losses(model: torch.nn.Module, batches: Sequence[Any]) -> np.ndarray:
    """``[Q]`` float64 summed target losses of the pre-collated query ``batches``, at each row's ``index``."""

    out = np.zeros(sum(len(b) for b in batches), dtype=np.float64)
    for b in batches:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        out[b.index.numpy()] = example_losses(logits, b).double().cpu().numpy()
    return out
