"""A learned pre-filter for LESS: skip the expensive gradient pass for rows a cheap model says are hopeless.

Why: LESS needs one forward + backward + projection per pool row *per checkpoint*; a forward pass of the
frozen base model is several times cheaper. So: compute true LESS scores for a random labelled sample,
fit a cheap regressor on cheap features, predict the rest, and run the gradient pass only on the
predicted-top candidates. What matters is whether the true top-p % survives (``recall``) and how much
gradient work is saved; R² and bucket accuracy are reported for comparison with earlier tables.

Cheap features (`cheap_features`, one no-grad forward pass of the frozen model per row): the mean final
hidden state over the row's real tokens (``H`` columns), ``log(1 + tokens)``, ``log(1 + target tokens)``
and the mean target-token loss.

Metrics (`prefilter_metrics`, pure functions of arrays; ``N`` pool rows, ``L`` labelled, ``K`` kept):

- ``recall``: ``|top_p(true) ∩ (labelled ∪ kept)| / |top_p(true)|`` — the share of the true top-p % that
  the final selection can still contain (labelled rows have true scores, kept rows get them);
  ``recall_random``: the same for ``K`` rows kept uniformly at random, in expectation
  ``(L + K) / N`` — the baseline the predictor must beat;
- ``gradient_passes_saved``: ``1 - (L + K) / N``; ``compute_saved`` (when timings are given):
  ``1 - (t_cheap · N + t_grad · (L + K)) / (t_grad · N)`` with measured per-row seconds;
- ``r2`` on the unlabelled rows; ``spearman`` on them; ``bucket_accuracy``: rows split into ``buckets``
  equal-count quantile buckets by true score and by predicted score (ranks, ties by position), the
  fraction landing in the same bucket (chance: ``1 / buckets``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dataworth.data.batching import collate, example_losses, plan_batches
from dataworth.data.encode import encode_rows
from dataworth.data.rows import load_rows
from dataworth.errors import InputError
from dataworth.model.load import load_model
from dataworth.model.losses import forward_batches
from dataworth.selection.less import compute_scores, rank_rows, require, selection_size
from dataworth.util import atomic_write, pad_token_id, torch_threads, write_json_atomic

PREDICTORS = ("ridge", "gbm")


@dataclass(frozen=True)
class PrefilterConfig:
    """``labelled_fraction`` of the pool gets true scores (random, seeded); of the remaining rows the
    predicted-top ``keep_fraction`` (a fraction of the *whole* pool) go to the gradient pass. ``percent``
    is the selection size recall is measured for; ``predictor`` is ``ridge`` (standardised features,
    RidgeCV) or ``gbm`` (HistGradientBoostingRegressor); ``buckets`` for bucket accuracy."""

    labelled_fraction: float = 0.2
    keep_fraction: float = 0.2
    percent: float = 5.0
    predictor: str = "ridge"
    buckets: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.labelled_fraction < 1:
            raise InputError(f"--labelled: must be in (0, 1), got {self.labelled_fraction}")
        if not 0 <= self.keep_fraction <= 1 - self.labelled_fraction:
            raise InputError(f"--keep: must be in [0, 1 - labelled] = [0, {1 - self.labelled_fraction:g}], "
                             f"got {self.keep_fraction}")
        if self.predictor not in PREDICTORS:
            raise InputError(f"--predictor: must be one of {', '.join(PREDICTORS)}, got {self.predictor!r}")
        if self.buckets < 2:
            raise InputError(f"--buckets: must be >= 2, got {self.buckets}")


def cheap_features(model: torch.nn.Module, tokenizer, encoded: Sequence, batch_size: int = 32) -> np.ndarray:
    """``[N, H + 3]`` float64: mean last hidden state over real tokens, ``log1p(tokens)``,
    ``log1p(target tokens)``, mean target-token loss — one no-grad forward pass per row."""
    pad_id = pad_token_id(tokenizer)
    rows: np.ndarray | None = None
    model.eval()
    plan = plan_batches([len(e.input_ids) for e in encoded], batch_size=batch_size)
    batches = [collate([encoded[i] for i in index], index, pad_id) for index in plan]
    for batch, output in forward_batches(model, batches, output_hidden_states=True):
        mask = batch.attention_mask.float()
        hidden = (output.hidden_states[-1].float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        targets = batch.loss_mask[:, 1:].sum(1).float()
        loss = example_losses(output.logits, batch) / targets.clamp(min=1)
        extra = torch.stack([torch.log1p(mask.sum(1)), torch.log1p(targets), loss], dim=1)
        block = torch.cat([hidden, extra], dim=1).double().cpu().numpy()
        if rows is None:
            rows = np.zeros((len(encoded), block.shape[1]))
        rows[batch.index.numpy()] = block
    return rows


def labelled_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean ``[n]``: a seeded uniform random ``round(fraction · n)`` rows (at least 2) are labelled."""
    count = max(2, round(fraction * n))
    if count >= n:
        raise InputError(f"--labelled: {fraction} of {n} rows leaves nothing to predict")
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, size=count, replace=False)] = True
    return mask


def fit_predict(features: np.ndarray, labels: np.ndarray, labelled: np.ndarray, predictor: str = "ridge",
                seed: int = 0) -> np.ndarray:
    """Fit ``predictor`` on ``features[labelled] → labels[labelled]`` and predict every row ``[N]``.

    Labelled rows keep their true label in the output (they were measured, not predicted)."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if predictor == "ridge":
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 4, 15)))
    elif predictor == "gbm":
        model = HistGradientBoostingRegressor(random_state=seed, max_iter=200)
    else:
        raise InputError(f"--predictor: must be one of {', '.join(PREDICTORS)}, got {predictor!r}")
    model.fit(features[labelled], labels[labelled])
    predicted = model.predict(features).astype(np.float64)
    predicted[labelled] = labels[labelled]
    return predicted


def keep_mask(predicted: np.ndarray, labelled: np.ndarray, keep_fraction: float) -> np.ndarray:
    """Boolean ``[N]``: the ``round(keep_fraction · N)`` unlabelled rows with the highest prediction
    (ties: pool order)."""
    n = len(predicted)
    count = min(round(keep_fraction * n), int((~labelled).sum()))
    candidates = np.flatnonzero(~labelled)
    order = candidates[np.argsort(-predicted[candidates], kind="stable")]
    mask = np.zeros(n, dtype=bool)
    mask[order[:count]] = True
    return mask


def quantile_buckets(values: np.ndarray, buckets: int) -> np.ndarray:
    """Equal-count buckets ``0..buckets-1`` by rank (ascending value, ties by position): row with rank
    ``r`` (0-based) of ``n`` goes to ``floor(r · buckets / n)``."""
    n = len(values)
    ranks = np.empty(n, dtype=np.int64)
    ranks[np.argsort(values, kind="stable")] = np.arange(n)
    return ranks * buckets // n


def prefilter_metrics(true_scores: np.ndarray, predicted: np.ndarray, labelled: np.ndarray, kept: np.ndarray,
                      percent: float, buckets: int = 5, seconds_cheap_per_row: float | None = None,
                      seconds_gradient_per_row: float | None = None) -> dict:
    """The figures of the module docstring for one pre-filtering (arrays ``[N]``; masks boolean)."""
    from scipy.stats import spearmanr
    from sklearn.metrics import r2_score

    n = len(true_scores)
    k = selection_size(n, percent)
    top = rank_rows(true_scores)[:k]
    survivors = labelled | kept
    unlabelled = ~labelled
    y, p = true_scores[unlabelled], predicted[unlabelled]
    out = {
        "rows": n, "labelled": int(labelled.sum()), "kept": int(kept.sum()), "top_k": k,
        "recall": float(survivors[top].mean()),
        "recall_random": float(survivors.sum() / n),
        "recall_unlabelled": float(kept[top][unlabelled[top]].mean()) if unlabelled[top].any() else float("nan"),
        "gradient_passes_saved": 1.0 - float(survivors.sum()) / n,
        "r2": float(r2_score(y, p)) if len(y) > 1 else float("nan"),
        "spearman": float(spearmanr(y, p).statistic) if len(y) > 1 else float("nan"),
        "bucket_accuracy": float((quantile_buckets(y, buckets) == quantile_buckets(p, buckets)).mean()),
        "buckets": buckets,
    }
    if seconds_cheap_per_row is not None and seconds_gradient_per_row:
        cost = seconds_cheap_per_row * n + seconds_gradient_per_row * survivors.sum()
        out["compute_saved"] = 1.0 - float(cost) / (seconds_gradient_per_row * n)
        out["seconds_cheap_per_row"] = seconds_cheap_per_row
        out["seconds_gradient_per_row"] = seconds_gradient_per_row
    return out


def evaluate_prefilter(true_scores: np.ndarray, features: np.ndarray, config: PrefilterConfig,
                       seconds_cheap_per_row: float | None = None, seconds_gradient_per_row: float | None = None
                       ) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """One pre-filtering: label a seeded sample, fit, predict, keep the predicted top; returns
    ``(metrics, labelled mask, kept mask, predictions)`` (see `prefilter_metrics`)."""
    labelled = labelled_mask(len(true_scores), config.labelled_fraction, config.seed)
    predicted = fit_predict(features, true_scores, labelled, config.predictor, config.seed)
    kept = keep_mask(predicted, labelled, config.keep_fraction)
    metrics = prefilter_metrics(true_scores, predicted, labelled, kept, config.percent, config.buckets,
                                seconds_cheap_per_row, seconds_gradient_per_row)
    return metrics, labelled, kept, predicted


def run_prefilter(select_config, task: str, config: PrefilterConfig = PrefilterConfig()) -> dict:
    """Evaluate the pre-filter on a LESS run whose features are complete, for ``task``.

    True labels: the run's LESS scores (`dataworth.selection.less.compute_scores`, with the run's ``aggregate``
    and ``across``), known for every row so recall can be measured. Cheap features from the frozen base
    model. Gradient cost per row: the run's measured pool-feature seconds summed over checkpoints (CPU
    time of the process on a CPU device, wall-clock otherwise; ``metrics["clock"]`` says which).
    Writes ``RUN/selected/<task>/prefilter.json`` (metrics + config) and ``prefilter_candidates.jsonl``
    (ids of labelled ∪ kept rows, with their role). Returns the metrics.
    """
    require(select_config, "run", "pool", "base", "valid")
    truth = compute_scores(select_config, task)
    scores = np.asarray(truth["scores"], dtype=np.float64)
    rows = load_rows(select_config.pool)
    if [r.id for r in rows] != truth["ids"]:
        raise InputError(f"--pool {select_config.pool}: rows differ from those the features were computed on")
    loaded = load_model(select_config.base, device=select_config.device)
    tokenizer = loaded.tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded, _ = encode_rows(rows, tokenizer, max_length=select_config.max_length, chat=select_config.chat)
    with torch_threads(select_config.threads):
        started, cpu_started = time.perf_counter(), time.process_time()
        features = cheap_features(loaded.model, tokenizer, encoded)
        cheap_wall, cheap_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    record = json.loads((Path(select_config.run) / "features" / "features.json").read_text())
    # CPU time on a CPU device (robust to other processes sharing the machine); wall-clock otherwise
    use_cpu = loaded.device.type == "cpu" and all("pool_cpu_seconds" in c for c in record["checkpoints"])
    key, cheap_seconds = ("pool_cpu_seconds", cheap_cpu) if use_cpu else ("pool_seconds", cheap_wall)
    gradient_seconds = sum(c[key] for c in record["checkpoints"]) / max(1, len(rows))
    metrics, labelled, kept, predicted = evaluate_prefilter(scores, features, config, cheap_seconds / len(rows),
                                                            gradient_seconds)
    metrics.update({"task": task, "aggregate": select_config.aggregate, "across": select_config.across,
                    "clock": "cpu" if use_cpu else "wall", "config": asdict(config)})
    out = Path(select_config.run) / "selected" / task
    write_json_atomic(out / "prefilter.json", metrics)
    lines = [json.dumps({"id": rows[i].id, "role": "labelled" if labelled[i] else "kept",
                         "predicted": float(predicted[i])}) for i in np.flatnonzero(labelled | kept)]
    atomic_write(out / "prefilter_candidates.jsonl", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return metrics


def format_metrics(metrics: dict) -> str:
    """One line per figure, in a fixed order, for the CLI."""
    keys = ("recall", "recall_random", "recall_unlabelled", "gradient_passes_saved", "compute_saved", "r2",
            "spearman", "bucket_accuracy")
    return "\n".join(f"{k}: {metrics[k]:.4f}" for k in keys if k in metrics and not
                     (isinstance(metrics[k], float) and math.isnan(metrics[k])))
