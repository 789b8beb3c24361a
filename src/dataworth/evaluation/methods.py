"""dataworth's attribution options for a retrain task: one row of an LDS table each (`AttributionConfig`).

Stores are extracted once per (checkpoint, projection, rank, modules) under the task directory and reused;
options add curvature, score mode, checkpoint ensembles (TRAK's model ensemble / TracIn's checkpoint sum,
equal weights) and TrackStar (Chang et al. 2024, §3: Adam ``√v̂`` normalisation, dense projection, a damped
train/query second-moment whitening, unit norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataworth.errors import InputError
from dataworth.evaluation.baselines import unit_rows
from dataworth.evaluation.retrain import LdsTask
from dataworth.gradients.extract import ExtractConfig, extract
from dataworth.gradients.projection import dense_project
from dataworth.gradients.queries import query_gradients
from dataworth.influence.curvature import (
    DampingSpec,
    check_kind,
    fit_curvature,
    parse_damping,
    resolve_damping,
)
from dataworth.influence.scores import check_mode, score_rows
from dataworth.model.load import load_model
from dataworth.model.optimizer import (
    final_optimizer_dir,
    second_moment_estimates,
)

# TrackStar whitens with R + λI, λ = this × mean eigenvalue of R under --damping auto (its own choice, kept
# apart from the influence curvature's auto).
TRACKSTAR_DAMPING_FRACTION = 0.1


@dataclass(frozen=True)
class AttributionConfig:
    """How dataworth attributes the task's queries (one row of the LDS table).

    ``projection``: ``random`` | ``pca`` | ``whitened`` | ``identity`` (LoGra; ``rank`` = k_in = k_out, ignored for
    identity).
    ``curvature``: ``none`` | ``raw`` | ``kfac`` | ``ekfac``; ``damping``: as ``dataworth fit --damping``.
    ``mode``: ``dot`` | ``cosine`` | ``relative`` (``dataworth.influence.scores``).
    ``checkpoints``: ``final`` (the full-data model) or ``ensemble`` — the mean of the score matrices of
    the task's kept per-epoch checkpoints (TRAK's model ensemble / TracIn's checkpoint sum, with equal
    weights). ``optimizer``: ``none`` or ``adam`` — TrackStar (Chang et al. 2024, "Scalable Influence and
    Fact Tracing for LLM Pretraining", §3): each gradient is divided elementwise by ``√v̂ + ε`` (the final
    checkpoint's Adam second moment) — exact only with ``identity`` projection, which this requires —
    then densely projected to ``rank`` dims, preconditioned with the damped mixture
    ``R = (1 − mix)·R_train + mix·R_query`` of the train and query gradient second moments, and unit-normalised
    (``mode`` is then ignored: TrackStar is a cosine). ``rank=0`` with ``adam``: no projection and ``R = I``.
    ``measure_end_token``: the query gradient includes the appended end-of-sequence target (matching a task
    with ``measure="answer+end"``); off by default, like ``gradients.queries.query_gradients`` for prompt/response rows
    (its shared "stop here" gradient drowns the answer's signal) and like the default ``measure="answer"``.
    """

    projection: str = "random"
    rank: int = 32
    curvature: str = "ekfac"
    damping: Any = "auto"
    mode: str = "dot"
    modules: str = "all"
    checkpoints: str = "final"
    optimizer: str = "none"
    mix: float = 0.5
    measure_end_token: bool = False

    def label(self) -> str:
        return self._label() + (" +end-token" if self.measure_end_token else "")

    def _label(self) -> str:
        proj = "identity" if self.projection == "identity" else f"{self.projection}-{self.rank}"
        if self.optimizer == "adam":
            how = "exact, R=I" if self.rank == 0 else f"{proj}→{self.rank} mix={self.mix}"
            return f"trackstar {how}" + (" ensemble" if self.checkpoints == "ensemble" else "")
        extra = " ensemble" if self.checkpoints == "ensemble" else ""
        return f"{proj} {self.curvature}/{self.mode}{extra}"

    def check(self) -> None:
        check_kind(self.curvature)
        check_mode(self.mode)
        if self.projection not in ("random", "pca", "whitened", "identity"):
            raise InputError(f"--projection: must be random, pca, whitened or identity, got {self.projection!r}")
        if self.checkpoints not in ("final", "ensemble"):
            raise InputError(f"--checkpoints: must be final or ensemble, got {self.checkpoints!r}")
        if self.optimizer not in ("none", "adam"):
            raise InputError(f"--optimizer: must be none or adam, got {self.optimizer!r}")
        if self.optimizer == "adam" and self.projection != "identity":
            raise InputError("--optimizer adam (TrackStar) needs --projection identity (exact per-element scaling)")
        if self.rank < (0 if self.optimizer == "adam" else 1):
            raise InputError(f"--rank: must be >= 1 (0 only with --optimizer adam), got {self.rank}")
        if not 0 <= self.mix <= 1:
            raise InputError(f"--mix: must be in [0, 1], got {self.mix}")


def attribution_scores(task: LdsTask, method: AttributionConfig, *, progress: bool = False,
                       memo: dict | None = None) -> np.ndarray:
    """The ``[Q, N]`` float64 score matrix of ``method`` for the task's queries (row order ``task.train_ids``).

    Stores are extracted once per (checkpoint, projection, rank) under ``task.out/stores`` and reused.
    ``memo``: a dict in which query gradients and fitted curvatures are kept between calls (benchmarks
    that score many options of the same stores pass one; results are identical without it).
    """
    method.check()
    if method.checkpoints == "ensemble":
        if not task.checkpoints:
            raise InputError("--checkpoints ensemble: the task kept no checkpoints (build it with checkpoints >= 2)")
        models = list(task.checkpoints)
    else:
        models = [task.model_dir]
    memo = {} if memo is None else memo
    mats = [_scores_at(task, Path(m), method, progress, memo) for m in models]
    return np.mean(mats, axis=0)


def store_dir_for(task: LdsTask, model_dir: Path, method: AttributionConfig) -> Path:
    """Where the store of ``method``'s projection on checkpoint ``model_dir`` lives (shared between options)."""
    tag = "final" if Path(model_dir) == task.model_dir else Path(model_dir).name
    proj = method.projection if method.projection == "identity" else f"{method.projection}-{method.rank}"
    return task.out / "stores" / f"{tag}-{proj}-{method.modules}"


def _scores_at(task: LdsTask, model_dir: Path, method: AttributionConfig, progress: bool, memo: dict) -> np.ndarray:
    store_dir = store_dir_for(task, model_dir, method)
    # identity ignores the rank; a fixed value keeps one identity store whatever rank an option asks for
    rank = 64 if method.projection == "identity" else method.rank
    store = extract(ExtractConfig(model=str(model_dir), data=task.config.data, out=str(store_dir),
                                  modules=method.modules, projection=method.projection, rank_in=rank,
                                  rank_out=rank, seed=task.config.seed, dtype="float32", device="cpu",
                                  shard_rows=4096, max_length=task.config.train.max_length), progress=progress)
    if list(store.ids) != task.train_ids:
        raise InputError(f"{store_dir}: store rows are not the task's training rows in order")
    key = ("queries", str(store_dir), method.measure_end_token)
    if key not in memo:
        loaded = load_model(str(model_dir), device="cpu")
        memo[key] = query_gradients(store, loaded.model, loaded.tokenizer, task.query_rows(),
                                    chat=task.config.train.chat, measure_end_token=method.measure_end_token)
    queries = memo[key]
    if method.optimizer == "adam":
        return trackstar_scores(store, queries, model_dir, method)
    key = ("curvature", str(store_dir), method.curvature, str(method.damping))
    if key not in memo:
        memo[key] = fit_curvature(store, method.curvature, method.damping)
    result = score_rows(store, queries, task.query_ids, memo[key], mode=method.mode, top_k=1, full=True)
    return np.asarray(result.matrix, dtype=np.float64)


def adam_normalise(rows: np.ndarray, store, second_moments: dict[str, np.ndarray], eps: float) -> np.ndarray:
    """Divide each module's exact gradient columns ``[*, D]`` by ``√v̂ + eps`` of that module's weight
    (TrackStar's optimizer normalisation; ``second_moments``: `model.optimizer.second_moment_estimates`)."""
    out = np.array(rows, dtype=np.float32, copy=True)
    layouts = {m["name"]: m for m in store.manifest["config"]["module_info"]}
    for spec in store.modules:
        name = f"{spec.name}.weight"
        if name not in second_moments:
            raise InputError(f"optimizer state has no entry for {name} (checkpoint from another model?)")
        v = second_moments[name]
        if layouts[spec.name].get("weight_layout", "out_in") != "out_in":
            v = v.T  # Conv1D stores in × out; store rows are out × in
        denom = (np.sqrt(v) + eps).reshape(-1).astype(np.float32)
        if denom.size != spec.size:
            raise InputError(f"module {spec.name}: optimizer state has {denom.size} entries, store has {spec.size}")
        out[:, spec.offset:spec.offset + spec.size] /= denom[None]
    return out


def trackstar_scores(store, query_rows: np.ndarray, model_dir: Path, method: AttributionConfig) -> np.ndarray:
    """TrackStar scores ``[Q, N]``: cos(R^{-1/2} P ĝ_q, R^{-1/2} P ĝ_n) with ĝ Adam-normalised exact gradients,
    P a seeded Gaussian ``D → rank`` projection, ``R`` the damped train/query second-moment mixture."""
    source = final_optimizer_dir(model_dir)
    if source is None:
        raise InputError(f"{model_dir}: no optimizer state (checkpoints/epoch-N/optimizer.safetensors) for TrackStar")
    second_moments, eps = second_moment_estimates(source)
    train = adam_normalise(store.matrix(), store, second_moments, eps)
    query = adam_normalise(query_rows, store, second_moments, eps)
    if method.rank == 0:  # no projection and R = I: the cosine of the Adam-normalised exact gradients
        return unit_rows(query.astype(np.float64)) @ unit_rows(train.astype(np.float64)).T
    both = torch.from_numpy(np.concatenate([train, query]))
    projected = dense_project(both, store.manifest["projection"]["seed"], method.rank).double().numpy()
    train_p, query_p = projected[: len(train)], projected[len(train):]
    r = (1 - method.mix) * (train_p.T @ train_p) / len(train_p) + method.mix * (query_p.T @ query_p) / len(query_p)
    values, vectors = np.linalg.eigh(r)
    values = np.clip(values, 0, None)
    spec = parse_damping(method.damping)
    damping = resolve_damping(spec if not spec.is_auto else DampingSpec(fraction=TRACKSTAR_DAMPING_FRACTION),
                              float(values.mean()))
    whiten = (vectors / np.sqrt(values + damping)) @ vectors.T  # R^{-1/2}
    return unit_rows(query_p @ whiten) @ unit_rows(train_p @ whiten).T
