"""Retraining on subsets of the training data, with an on-disk resumable cache: the ground truth of evaluation.

Why a module of its own: the Linear Datamodeling Score (LDS, Park et al. 2023, "TRAK", §2.2), leave-k-out
and brittleness tests (Ilyas et al. 2022; Bae et al. 2024) all judge an attribution method against what
*really* happens to a query's loss when the model is retrained without some documents. Retraining is by far
the most expensive part of evaluation, so every retrain is cached on disk, one file per retrain, and a killed
run resumes. Several benchmarks (``benchmarks/lds.py``, ``benchmarks/peers.py``) score different attribution
methods against the *same* retrains by calling `build_lds_task` with the same `LdsConfig`.

The task (``build_lds_task(out_dir, LdsConfig(...)) -> LdsTask``)::

    out_dir/cache.json                 the configuration (see `LdsConfig.identity`); another one is refused
    out_dir/model/                     the full-data model (``dataworth.model.train``): the model being attributed,
                                       with ``checkpoints/epoch-N/`` for ``LdsConfig.checkpoints`` epochs
    out_dir/retrains/subset-MMM-rR.json  one LDS retrain: subset M, replicate (seed) R
    out_dir/retrains/removal-<sha>-rR.json  one removal retrain (leave-k-out / brittleness), keyed by the
                                       removed set; ``full-rR.json`` is the all-rows reference retrain

Public API: ``LdsConfig``, ``build_lds_task(out, config) -> LdsTask`` (``load_lds_task`` never trains),
``LdsTask.evaluate(scores [Q, N]) -> dict`` (``evaluation.metrics.lds_summary``), ``removal_losses`` / ``full_losses`` /
``removal_test`` (leave-k-out, brittleness), ``AttributionConfig`` + ``attribution_scores(task, method)``
(dataworth's own scores for the task), ``one_step_effects`` (the ``[Q, N]`` effect of one more training
step on each row: the ground truth of the tail-patch metric, ``evaluation.metrics.tail_patch``), and ``eval_lds`` /
``eval_brittleness`` / ``eval_facts`` (the CLI).

A retrain file (written atomically when that retrain is done)::

    {"name": "subset-003-r0", "seed": 1234, "included": ["doc-001", ...],  # ids of the training rows used
     "losses": [12.3, ...],           # per query (cache.json "query_ids" order): summed response loss
     "train_loss": 0.41, "seconds": 9.8}

Retrains: subset ``m`` holds exactly ``round(α·N)`` rows drawn without replacement with a generator seeded by
``(seed, m)``; replicate ``r`` of subset ``m`` trains from scratch with its own seed (init + shuffle), so the
replicates of a subset differ only by training noise — that is what the noise ceiling measures. The loop is
``dataworth.model.train``'s (same model builder, AdamW, schedule, clipping, seeded shuffle) on the full-data
model's tokenizer; with every row and the base seed it reproduces ``dataworth.model.train`` bit for bit (tested).
Models are not kept: only the per-query losses.

The query measurement is ``data.batching.example_losses``, the loss summed over the query's target tokens, with
``LdsConfig.measure`` choosing which: ``answer`` (default) — the response tokens only, the same measurement
``gradients.queries.query_gradients`` attributes by default — or ``answer+end`` — the response *and* the end token that
``data.encode.encode_rows`` appends (what caches made before ``measure`` existed hold; they open as ``answer+end``).
``AttributionConfig.measure_end_token`` chooses what the *attribution* measures, so the two can be crossed.
Sign convention shared with ``dataworth.influence.scores``: a positive score means the training row *lowers* the query
loss, so the LDS correlates summed scores with the *negated* loss (``dataworth.evaluation.metrics.lds``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dataworth.data.encode import MEASURES, encode_rows, measured_queries
from dataworth.data.rows import load_rows
from dataworth.errors import InputError
from dataworth.evaluation.metrics import lds_summary
from dataworth.model.load import load_model
from dataworth.model.losses import query_losses
from dataworth.model.train import (
    TRAIN_JSON,
    TrainConfig,
    build_model,
    train,
    train_epochs,
)
from dataworth.util import (
    first_difference,
    pad_token_id,
    resolve_device,
    say,
    short,
    torch_threads,
    write_json_atomic,
)

CACHE_FORMAT = "dataworth-retrain-cache"
CACHE_VERSION = 1

# Below 8 subsets a per-query Spearman correlation is noise: under the null its standard deviation is
# 1/sqrt(M-1) ≥ 0.38, so even a perfect method could not be told from chance on one query.
MIN_SUBSETS = 8

# TrainConfig fields that do not change the trained weights (not part of the cache identity).
_RUNTIME_TRAIN_FIELDS = ("threads", "save_every_epoch")


@dataclass(frozen=True)
class LdsConfig:
    """What the retrains are: data, queries, how to train, and which subsets.

    ``data``: training rows spec (``dataworth.data.rows.load_rows``). ``queries``: prompt/response rows whose
    summed response loss is measured. ``train``: a ``dataworth.model.train.TrainConfig`` (e.g.
    ``TrainConfig.from_preset("tiny-test")``). ``alpha``: fraction of rows in each subset, in (0, 1).
    ``subsets``: M ≥ ``MIN_SUBSETS``. ``replicates``: seeds per subset (≥ 2 gives the noise ceiling).
    ``checkpoints``: how many evenly spaced per-epoch checkpoints of the full-data model to keep (checkpoint
    ensembles); 0 keeps only the final model. ``seed``: draws the subsets and the retrain seeds.
    ``measure``: ``answer`` (the response tokens) or ``answer+end`` (plus the appended end token).
    """

    data: str
    queries: str
    train: Any = None
    alpha: float = 0.5
    subsets: int = 32
    replicates: int = 2
    checkpoints: int = 0
    seed: int = 0
    measure: str = "answer"

    def __post_init__(self) -> None:
        if self.train is None:
            object.__setattr__(self, "train", TrainConfig.from_preset("tiny"))
        self.check()

    def check(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < 1):
            raise InputError(f"--alpha: must be strictly between 0 and 1, got {self.alpha}")
        if self.subsets < MIN_SUBSETS:
            raise InputError(f"--subsets: {self.subsets} subsets are too few to correlate; the minimum is "
                             f"{MIN_SUBSETS} (null std of a Spearman correlation is 1/sqrt(M-1))")
        if self.replicates < 1:
            raise InputError(f"--replicates: must be >= 1, got {self.replicates}")
        if self.checkpoints < 0:
            raise InputError(f"--checkpoints: must be >= 0, got {self.checkpoints}")
        if self.measure not in MEASURES:
            raise InputError(f"--measure: must be one of {', '.join(MEASURES)}, got {self.measure!r}")

    def identity(self) -> dict:
        """The keys that decide every cached number; ``cache.json`` must match them exactly."""
        train = self.train.to_json()
        for key in _RUNTIME_TRAIN_FIELDS:
            train.pop(key, None)
        train["betas"] = list(train["betas"])
        train["lora_targets"] = list(train["lora_targets"])
        return {"data": self.data, "queries": self.queries, "train": train, "alpha": float(self.alpha),
                "subsets": int(self.subsets), "replicates": int(self.replicates),
                "checkpoints": int(self.checkpoints), "seed": int(self.seed), "measure": self.measure}


def derived_seed(*parts: object) -> int:
    """A 31-bit seed from ``parts`` (sha256 of their repr joined by ':'), stable across machines."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def subset_masks(n_rows: int, alpha: float, subsets: int, seed: int) -> np.ndarray:
    """``[M, N]`` bool: subset ``m`` holds exactly ``round(α·N)`` (at least 1) rows, drawn by seed ``(seed, m)``."""
    size = min(n_rows, max(1, int(round(alpha * n_rows))))
    masks = np.zeros((subsets, n_rows), dtype=bool)
    for m in range(subsets):
        rng = np.random.default_rng(derived_seed("subset", seed, m))
        masks[m, rng.choice(n_rows, size=size, replace=False)] = True
    return masks


def retrain_seed(seed: int, subset: int | str, replicate: int) -> int:
    """Training seed (init + shuffle) of replicate ``replicate`` of subset ``subset``."""
    return derived_seed("retrain", seed, subset, replicate)


def rows_fingerprint(rows: Sequence[Any]) -> str:
    """sha256 over the rows' ids, kinds and full data (canonical JSON), in order."""
    digest = hashlib.sha256(b"dataworth-rows-v1\0")
    for row in rows:
        digest.update(json.dumps([row.id, row.kind, row.data], sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass
class LdsTask:
    """The evaluation task: the attributed model, its training rows and queries, the subsets and their losses.

    Shapes: ``masks [M, N]`` bool (row order = ``train_ids``, the data spec's order); ``losses [R, M, Q]``
    float64 (R replicates, query order = ``query_ids``); ``base_losses [Q]`` of the full-data model.
    ``checkpoints``: kept per-epoch checkpoint dirs of the full-data model, oldest first.
    """

    out: Path
    config: LdsConfig
    model_dir: Path
    train_ids: list[str]
    query_ids: list[str]
    masks: np.ndarray
    losses: np.ndarray
    base_losses: np.ndarray
    checkpoints: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    context: Any = field(default=None, repr=False)

    @property
    def mean_losses(self) -> np.ndarray:
        """``[M, Q]``: query losses averaged over replicates (the LDS target)."""
        return self.losses.mean(axis=0)

    def train_rows(self) -> list:
        return load_rows(self.config.data)

    def query_rows(self) -> list:
        return load_rows(self.config.queries)

    def evaluate(self, scores: np.ndarray, n_bootstrap: int = 1000) -> dict:
        """LDS figures of a ``[Q, N]`` score matrix (``dataworth.evaluation.metrics.lds_summary``)."""
        return lds_summary(scores, self.masks, self.losses, n_bootstrap=n_bootstrap, seed=self.config.seed)


class RetrainCache:
    """``out/cache.json`` + one JSON file per retrain under ``out/retrains``; refuses another configuration."""

    def __init__(self, out: str | os.PathLike, identity: dict):
        self.out = Path(out)
        self.identity = identity
        self.dir = self.out / "retrains"

    def open(self) -> None:
        """Create ``cache.json`` or check it: a differing key is an ``InputError`` naming that key."""
        path = self.out / "cache.json"
        if path.exists():
            try:
                stored = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: not valid JSON ({exc.msg}); delete the directory to start over") from exc
            if stored.get("format") != CACHE_FORMAT:
                raise InputError(f"{path}: not a dataworth retrain cache (format {stored.get('format')!r})")
            difference = first_difference(_with_new_train_fields(stored.get("config", {}), self.identity),
                                          self.identity)
            if difference is not None:
                key, old, new = difference
                raise InputError(f"{path}: retrain cache was made with {key}={short(json.dumps(old))}, this run has "
                                 f"{key}={short(json.dumps(new))}; use another --out (caches are never mixed)")
            if stored.get("version") != CACHE_VERSION:
                raise InputError(f"{path}: cache version {stored.get('version')} is not {CACHE_VERSION}")
        elif self.out.exists() and any(self.out.iterdir()):
            raise InputError(f"--out: '{self.out}' exists, is not empty and has no cache.json; choose another path")
        self.dir.mkdir(parents=True, exist_ok=True)

    def write_header(self, extra: dict) -> None:
        """(Re)write ``cache.json`` with the identity and ``extra`` facts (ids, fingerprints)."""
        write_json_atomic(self.out / "cache.json", {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                                                     "config": self.identity, **extra}, indent=1, sort_keys=False)

    def header(self) -> dict:
        return json.loads((self.out / "cache.json").read_text())

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def load(self, name: str, included_ids: Sequence[str], seed: int, n_queries: int) -> np.ndarray | None:
        """The cached losses ``[Q]`` of retrain ``name``, or None; a file that disagrees is refused."""
        path = self.path(name)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if record.get("included") != list(included_ids) or record.get("seed") != seed:
            raise InputError(f"{path}: cached retrain has other rows or seed than this configuration asks for; "
                             "the cache is inconsistent, delete it")
        losses = np.asarray(record["losses"], dtype=np.float64)
        if losses.shape != (n_queries,):
            raise InputError(f"{path}: {losses.shape[0]} losses for {n_queries} queries")
        return losses

    def save(self, name: str, record: dict) -> None:
        write_json_atomic(self.path(name), record, indent=1, sort_keys=False)


def _with_new_train_fields(stored: dict, current: dict) -> dict:
    """``stored`` with fields added since the cache was made filled in with what those runs did.

    A field added to ``TrainConfig`` later did not exist when the cache was trained, so those runs behaved as
    its default does; a run that sets it to anything else still differs (and is refused). Caches made before
    ``measure`` existed measured ``answer+end``.
    """
    if "measure" not in stored:
        stored = {**stored, "measure": "answer+end"}
    if not isinstance(stored.get("train"), dict) or not isinstance(current.get("train"), dict):
        return stored
    defaults = LdsConfig(data="", queries="", train=TrainConfig(), subsets=MIN_SUBSETS).identity()["train"]
    train = dict(stored["train"])
    for key in current["train"]:
        if key not in train and key in defaults:
            train[key] = defaults[key]
    return {**stored, "train": train}


def train_on_rows(encoded: Sequence[Any], tokenizer: Any, config: Any, seed: int) -> tuple[torch.nn.Module, float]:
    """A fresh model trained on ``encoded`` with ``config`` and ``seed``; returns (model in eval mode, last
    epoch's mean token loss).

    ``dataworth.model.train``'s own loop (``model.train.train_epochs``: AdamW, ``lr_at`` schedule, gradient clipping, a
    seeded shuffle, mean token loss per batch), without writing anything.
    """
    config = dataclasses.replace(config, seed=seed, save_every_epoch=False)
    device = resolve_device(config.device)
    with torch_threads(config.threads):
        torch.manual_seed(seed)
        model = build_model(config, tokenizer).to(device)
        _optimizer, epochs = train_epochs(model, encoded, pad_token_id(tokenizer), config, device)
    return model, epochs[-1]["loss"] if epochs else float("nan")


# Signature of a retrain function: (included row positions, seed) -> (query losses [Q], final train loss).
Trainer = Callable[[np.ndarray, int], tuple[np.ndarray, float]]


@dataclass
class _Context:
    """What every retrain needs: the full-data model's tokenizer, the encoded rows and queries."""

    config: LdsConfig
    tokenizer: Any
    encoded: list
    encoded_queries: list

    def retrain(self, included: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
        model, train_loss = train_on_rows([self.encoded[i] for i in included], self.tokenizer, self.config.train, seed)
        return query_losses(model, self.encoded_queries, pad_token_id(self.tokenizer)), train_loss


def _context(config: LdsConfig, model_dir: Path) -> _Context:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = config.train
    encoded, _ = encode_rows(load_rows(config.data), tokenizer, max_length=cfg.max_length, chat=cfg.chat)
    queries, _ = encode_rows(load_rows(config.queries), tokenizer, max_length=cfg.max_length, chat=cfg.chat)
    return _Context(config, tokenizer, encoded, measured_queries(queries, tokenizer, config.measure))


def _train_base_model(config: LdsConfig, model_dir: Path, progress: bool) -> None:
    """The full-data model via ``dataworth.model.train``; keeps ``config.checkpoints`` evenly spaced epochs."""
    if (model_dir / TRAIN_JSON).exists():
        return
    keep = config.checkpoints > 0
    train(config.data, model_dir, dataclasses.replace(config.train, save_every_epoch=keep),
          queries_spec=None, progress=progress)
    ckpt_root = model_dir / "checkpoints"
    wanted = set(checkpoint_epochs(config.train.epochs, config.checkpoints))
    for ckpt in sorted(ckpt_root.glob("epoch-*")) if ckpt_root.exists() else []:
        if int(ckpt.name.split("-")[1]) not in wanted:
            shutil.rmtree(ckpt)


def checkpoint_epochs(epochs: int, keep: int) -> list[int]:
    """``keep`` evenly spaced epochs ending at the last: ``round(epochs·i/keep)`` for ``i = 1..keep``."""
    if keep <= 0:
        return [epochs]
    return sorted({max(1, int(round(epochs * i / keep))) for i in range(1, keep + 1)})


def build_lds_task(out_dir: str | os.PathLike, config: LdsConfig, *, progress: bool = True,
                   trainer: Trainer | None = None, stop_after: int | None = None) -> LdsTask:
    """Build (or resume) the LDS task under ``out_dir``: train the full-data model, then every missing retrain.

    ``trainer`` replaces the real retrain (tests: a closed-form toy). ``stop_after`` stops after that many
    new retrains (tests of resumption) and returns None. Returns the complete `LdsTask`.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    cache = RetrainCache(out, config.identity())
    cache.open()
    train_rows, query_rows = load_rows(config.data), load_rows(config.queries)
    _check_rows(config, train_rows, query_rows)
    train_ids, query_ids = [r.id for r in train_rows], [r.id for r in query_rows]
    cache.write_header({"train_ids": train_ids, "query_ids": query_ids,
                        "data_fingerprint": rows_fingerprint(train_rows),
                        "queries_fingerprint": rows_fingerprint(query_rows),
                        "sign": "lds = Spearman(summed scores of included rows, -query loss)"})
    model_dir = out / "model"
    context = None
    if trainer is None:
        if progress:
            say(f"[lds] full-data model → {model_dir}")
        _train_base_model(config, model_dir, progress)
        context = _context(config, model_dir)
        trainer = context.retrain
    masks = subset_masks(len(train_ids), config.alpha, config.subsets, config.seed)
    losses = np.zeros((config.replicates, config.subsets, len(query_ids)))
    done_new = 0
    jobs = [(m, r) for r in range(config.replicates) for m in range(config.subsets)]
    for i, (m, r) in enumerate(jobs):
        name = f"subset-{m:03d}-r{r}"
        included = np.flatnonzero(masks[m])
        seed = retrain_seed(config.seed, m, r)
        ids = [train_ids[j] for j in included]
        cached = cache.load(name, ids, seed, len(query_ids))
        if cached is None:
            if stop_after is not None and done_new >= stop_after:
                return None
            t0 = time.perf_counter()
            values, train_loss = trainer(included, seed)
            cached = np.asarray(values, dtype=np.float64)
            cache.save(name, {"name": name, "subset": m, "replicate": r, "seed": seed, "included": ids,
                              "losses": cached.tolist(), "train_loss": float(train_loss),
                              "seconds": round(time.perf_counter() - t0, 3)})
            done_new += 1
            if progress:
                say(f"[lds] retrain {i + 1}/{len(jobs)} ({name}) {time.perf_counter() - t0:.1f}s")
        losses[r, m] = cached
    base = _base_losses(out, model_dir, context, trainer, len(train_ids), len(query_ids))
    ckpts = sorted((model_dir / "checkpoints").glob("epoch-*"), key=lambda p: int(p.name.split("-")[1])) \
        if (model_dir / "checkpoints").exists() else []
    return LdsTask(out=out, config=config, model_dir=model_dir, train_ids=train_ids, query_ids=query_ids,
                   masks=masks, losses=losses, base_losses=base, checkpoints=ckpts,
                   seconds=time.perf_counter() - started, context=context)


def _check_rows(config: LdsConfig, train_rows: list, query_rows: list) -> None:
    if len(train_rows) < 2:
        raise InputError(f"--data: '{config.data}' has {len(train_rows)} rows; subsets need at least 2")
    if not query_rows:
        raise InputError(f"--queries: '{config.queries}' has no rows")
    bad = [q for q in query_rows if q.kind != "prompt_response"]
    if bad:
        raise InputError(f"{bad[0].source}: query rows need 'prompt' and 'response' (got a {bad[0].kind} row)")
    for label, rows in (("--data", train_rows), ("--queries", query_rows)):
        seen: set[str] = set()
        for r in rows:
            if r.id in seen:
                raise InputError(f"{r.source}: duplicate id {r.id!r} in {label}; ids must be unique")
            seen.add(r.id)


def _base_losses(out: Path, model_dir: Path, context: _Context | None, trainer: Trainer, n_rows: int,
                 n_queries: int) -> np.ndarray:
    """Query losses of the full-data model (``base_losses.json``; toy trainers: all rows, base seed)."""
    path = out / "base_losses.json"
    if path.exists():
        return np.asarray(json.loads(path.read_text())["losses"], dtype=np.float64)
    if context is not None:
        loaded = load_model(str(model_dir), device=context.config.train.device)
        values = query_losses(loaded.model, context.encoded_queries, pad_token_id(context.tokenizer))
    else:
        values = np.asarray(trainer(np.arange(n_rows), 0)[0], dtype=np.float64)
    write_json_atomic(path, {"losses": values.tolist()}, indent=1, sort_keys=False)
    return values


def load_lds_task(out_dir: str | os.PathLike, config: LdsConfig) -> LdsTask:
    """The complete task from ``out_dir`` without training anything; an incomplete cache is an InputError."""
    if not (Path(out_dir) / "cache.json").exists():
        raise InputError(f"{out_dir}: no retrain cache here (cache.json missing); build it with build_lds_task")

    def refuse(_included: np.ndarray, _seed: int) -> tuple[np.ndarray, float]:
        raise InputError(f"{out_dir}: retrain cache is incomplete; run build_lds_task (or dataworth eval lds) first")

    return build_lds_task(out_dir, config, progress=False, trainer=refuse)


def removal_losses(task: LdsTask, removed: Sequence[int], replicate: int = 0, *, progress: bool = True,
                   trainer: Trainer | None = None) -> np.ndarray:
    """``[Q]`` query losses after retraining on all rows except positions ``removed`` (cached).

    Seed ``retrain_seed(seed, "removal", replicate)`` — the same for every removed set of one replicate and
    for the all-rows reference (`full_losses`), so differences between them are due to the data (paired).
    """
    removed = np.unique(np.asarray(removed, dtype=np.int64))
    if removed.size and (removed.min() < 0 or removed.max() >= len(task.train_ids)):
        raise InputError(f"removal: row positions must lie in 0..{len(task.train_ids) - 1}")
    if removed.size >= len(task.train_ids):
        raise InputError(f"removal: cannot remove all {len(task.train_ids)} training rows")
    keep = np.setdiff1d(np.arange(len(task.train_ids)), removed)
    if removed.size == 0:
        name = f"full-r{replicate}"
    else:
        digest = hashlib.sha256(",".join(map(str, removed.tolist())).encode()).hexdigest()[:16]
        name = f"removal-{digest}-r{replicate}"
    cache = RetrainCache(task.out, task.config.identity())
    seed = retrain_seed(task.config.seed, "removal", replicate)
    ids = [task.train_ids[j] for j in keep]
    cached = cache.load(name, ids, seed, len(task.query_ids))
    if cached is not None:
        return cached
    if trainer is None:
        if task.context is None:
            task.context = _context(task.config, task.model_dir)
        trainer = task.context.retrain
    t0 = time.perf_counter()
    values, train_loss = trainer(keep, seed)
    values = np.asarray(values, dtype=np.float64)
    cache.save(name, {"name": name, "replicate": replicate, "seed": seed, "included": ids,
                      "removed": [task.train_ids[j] for j in removed], "losses": values.tolist(),
                      "train_loss": float(train_loss), "seconds": round(time.perf_counter() - t0, 3)})
    if progress:
        say(f"[removal] retrain without {removed.size} rows ({name}) {time.perf_counter() - t0:.1f}s")
    return values


def full_losses(task: LdsTask, replicate: int = 0, **kwargs: Any) -> np.ndarray:
    """``[Q]`` query losses of the all-rows reference retrain of ``replicate`` (paired with removals)."""
    return removal_losses(task, [], replicate, **kwargs)
