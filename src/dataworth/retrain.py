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

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dataworth.errors import InputError
from dataworth.store import first_difference

CACHE_FORMAT = "dataworth-retrain-cache"
CACHE_VERSION = 1
# Below 8 subsets a per-query Spearman correlation is noise: under the null its standard deviation is
# 1/sqrt(M-1) ≥ 0.38, so even a perfect method could not be told from chance on one query.
MIN_SUBSETS = 8
# What a retrain measures per query: the response tokens, or the response plus its appended end token.
MEASURES = ("answer", "answer+end")
# TrainConfig fields that do not change the trained weights (not part of the cache identity).
_RUNTIME_TRAIN_FIELDS = ("threads", "save_every_epoch")


# ------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class LdsConfig:
    """What the retrains are: data, queries, how to train, and which subsets.

    ``data``: training rows spec (``dataworth.data.load_rows``). ``queries``: prompt/response rows whose
    summed response loss is measured. ``train``: a ``dataworth.train.TrainConfig`` (e.g.
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
            from dataworth.train import TrainConfig

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


# --------------------------------------------------------------------------------------------------- task

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
        from dataworth.data import load_rows

        return load_rows(self.config.data)

    def query_rows(self) -> list:
        from dataworth.data import load_rows

        return load_rows(self.config.queries)

    def evaluate(self, scores: np.ndarray, n_bootstrap: int = 1000) -> dict:
        """LDS figures of a ``[Q, N]`` score matrix (``dataworth.evaluate.lds_summary``)."""
        from dataworth.evaluate import lds_summary

        return lds_summary(scores, self.masks, self.losses, n_bootstrap=n_bootstrap, seed=self.config.seed)


# -------------------------------------------------------------------------------------------- the cache

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
                raise InputError(f"{path}: retrain cache was made with {key}={_short(old)}, this run has "
                                 f"{key}={_short(new)}; use another --out (caches are never mixed)")
            if stored.get("version") != CACHE_VERSION:
                raise InputError(f"{path}: cache version {stored.get('version')} is not {CACHE_VERSION}")
        elif self.out.exists() and any(self.out.iterdir()):
            raise InputError(f"--out: '{self.out}' exists, is not empty and has no cache.json; choose another path")
        self.dir.mkdir(parents=True, exist_ok=True)

    def write_header(self, extra: dict) -> None:
        """(Re)write ``cache.json`` with the identity and ``extra`` facts (ids, fingerprints)."""
        write_json_atomic(self.out / "cache.json", {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                                                     "config": self.identity, **extra})

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
        write_json_atomic(self.path(name), record)


def _with_new_train_fields(stored: dict, current: dict) -> dict:
    """``stored`` with fields added since the cache was made filled in with what those runs did.

    A field added to ``TrainConfig`` later did not exist when the cache was trained, so those runs behaved as
    its default does; a run that sets it to anything else still differs (and is refused). Caches made before
    ``measure`` existed measured ``answer+end``.
    """
    from dataworth.train import TrainConfig

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


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_json_atomic(path: Path, value: Any) -> None:
    """JSON through ``path.tmp-<pid>`` + ``os.replace``: a killed run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- training a subset

def train_on_rows(encoded: Sequence[Any], tokenizer: Any, config: Any, seed: int) -> tuple[torch.nn.Module, float]:
    """A fresh model trained on ``encoded`` with ``config`` and ``seed``; returns (model in eval mode, last
    epoch's mean token loss).

    ``dataworth.train``'s own loop (``train.train_epochs``: AdamW, ``lr_at`` schedule, gradient clipping, a
    seeded shuffle, mean token loss per batch), without writing anything.
    """
    from dataworth.models import resolve_device
    from dataworth.train import build_model, train_epochs

    config = dataclasses.replace(config, seed=seed, save_every_epoch=False)
    device = resolve_device(config.device)
    before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(seed)
        model = build_model(config, tokenizer).to(device)
        _optimizer, epochs = train_epochs(model, encoded, tokenizer.pad_token_id, config, device)
        return model, epochs[-1]["loss"] if epochs else float("nan")
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def query_losses(model: torch.nn.Module, encoded_queries: Sequence[Any], pad_id: int, batch_size: int = 64) -> np.ndarray:
    """``[Q]`` float64: each query's loss summed over its target tokens (``batching.example_losses``)."""
    from dataworth.batching import collate, example_losses

    device = next(model.parameters()).device
    out = np.zeros(len(encoded_queries), dtype=np.float64)
    model.eval()
    for start in range(0, len(encoded_queries), batch_size):
        index = list(range(start, min(start + batch_size, len(encoded_queries))))
        batch = collate([encoded_queries[i] for i in index], index, pad_id).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        out[index] = example_losses(logits, batch).double().cpu().numpy()
    return out


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
        return query_losses(model, self.encoded_queries, self.tokenizer.pad_token_id), train_loss


def _context(config: LdsConfig, model_dir: Path) -> _Context:
    from dataworth.data import encode_rows, load_rows
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = config.train
    encoded, _ = encode_rows(load_rows(config.data), tokenizer, max_length=cfg.max_length, chat=cfg.chat)
    queries, _ = encode_rows(load_rows(config.queries), tokenizer, max_length=cfg.max_length, chat=cfg.chat)
    return _Context(config, tokenizer, encoded, measured_queries(queries, tokenizer, config.measure))


def measured_queries(queries: Sequence[Any], tokenizer: Any, measure: str) -> list:
    """The encoded queries with exactly the ``measure``d targets in their loss masks (``MEASURES``)."""
    from dataworth.extract import without_end_token

    if measure == "answer":
        return [without_end_token(q, tokenizer) for q in queries]
    return list(queries)


# ------------------------------------------------------------------------------- one step on one row (tail-patch)
#
# The influence ground truth of fact tracing's tail-patch metric (Chang et al. 2024, "Scalable Influence and Fact
# Tracing for LLM Pretraining", §4): recall/MRR ask whether a method *finds* the documents that state a fact;
# tail-patch asks whether one more training step on a retrieved document actually raises log p(answer).


def final_optimizer_dir(model_dir: str | os.PathLike) -> Path | None:
    """The directory holding the final AdamW state of a ``dataworth.train`` run, or None.

    ``train`` writes it to ``model_dir/checkpoints/epoch-<last>/`` (``train.OPTIMIZER_TENSORS`` and
    ``OPTIMIZER_JSON``), not to ``model_dir`` itself; a directory holding both files (a checkpoint) is returned
    as is.
    """
    from dataworth.train import OPTIMIZER_JSON, OPTIMIZER_TENSORS

    def holds_state(d: Path) -> bool:
        return (d / OPTIMIZER_TENSORS).is_file() and (d / OPTIMIZER_JSON).is_file()

    root = Path(model_dir)
    if holds_state(root):
        return root
    ckpts = sorted((root / "checkpoints").glob("epoch-*"), key=lambda p: int(p.name.split("-")[1])) \
        if (root / "checkpoints").is_dir() else []
    ckpts = [c for c in ckpts if holds_state(c)]
    return ckpts[-1] if ckpts else None


def row_gradients(model: torch.nn.Module, rows: Sequence[Any], pad_id: int,
                  params: Sequence[torch.nn.Parameter]):
    """For each encoded row, ``∇_params L_n(θ)`` of its summed target loss (``batching.example_losses``), as a
    list of tensors shaped like ``params`` (zeros for a parameter the loss does not reach). One backward pass
    per row, on a batch of that row alone (no padding, so nothing else can leak in)."""
    from dataworth.batching import collate, example_losses

    device = params[0].device
    for i, row in enumerate(rows):
        batch = collate([row], [i], pad_id).to(device)
        with torch.enable_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = example_losses(logits, batch).sum()
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        yield [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def one_step_effects(model: torch.nn.Module, tokenizer: Any, train_encoded: Sequence[Any],
                     query_encoded: Sequence[Any], *, optimizer_dir: str | os.PathLike | None = None,
                     lr: float | None = None, batch_size: int = 64, params: Sequence[str] | None = None,
                     progress: bool = False) -> np.ndarray:
    """``[Q, N]`` float64: how much one more training step on row ``n`` alone lowers query ``q``'s loss.

    ``effect[q, n] = L_q(θ) − L_q(θ − η·u_n)`` — positive: one more step on ``n`` raises the log-probability of
    ``q``'s targets by that many nats. ``L_q`` is the loss summed over the targets of ``q``'s loss mask
    (``batching.example_losses``; pass the queries through ``measured_queries(…, "answer")`` to measure the
    answer only). The step touches ``params`` (``model.named_parameters()`` names; default: every parameter
    with ``requires_grad``) and is, per parameter:

    - with ``optimizer_dir`` (a ``dataworth.train`` checkpoint, or a trained model directory: its final state,
      `final_optimizer_dir`) — AdamW's step on a batch holding row ``n`` alone, from the saved state, without
      the past momentum and the decoupled weight decay (both are the same for every row: they would shift all
      effects of a query by one constant). With ``g = ∇L_n(θ) / T_n`` (the row's loss as ``dataworth.train``
      computes it: the mean over its ``T_n`` targets), ``t`` the saved step count, ``v`` the saved
      ``exp_avg_sq``::

          v' = β₂·v + (1 − β₂)·g²        u_n = (1 − β₁)/(1 − β₁^{t+1}) · g / (√(v' / (1 − β₂^{t+1})) + ε)

      and ``η`` the learning rate of the checkpoint's last step (``optimizer.json`` ``lr``: ``train`` sets it
      from ``lr_at(step, …)`` before each step), unless ``lr`` is given. ``v'`` includes the row's own ``g²``,
      as in Adam: dividing by the stale ``√v̂`` alone (TrackStar's normalisation, fine for a cosine) lets a row
      take enormous steps on weights the last batches did not touch (the embeddings of its rare tokens):
      with it, on the demo model, one step on any row lowered the answers' log-probability by ~60 nats on
      average, and a query's own gold documents looked no better than the others (measured).
    - otherwise plain SGD on the summed loss, ``u_n = ∇L_n(θ)``, with the given ``lr`` (to first order the
      effect is ``η ∇L_qᵀ∇L_n``, the gradient dot product); neither ``optimizer_dir`` nor ``lr``: ``InputError``.

    Cost: N backward passes (one row each) + 1 + N batched forward passes over the queries (``batch_size``
    rows each), never Q×N. θ is restored bit for bit after every row (the touched tensors are copied back),
    also when an exception escapes. Runs in the model's own dtype and device with ``model.eval()`` (no
    dropout); the previous train/eval mode is restored afterwards.
    """
    from dataworth.batching import collate, plan_batches

    named = _chosen_parameters(model, params)
    step_of = _update_rule(named, optimizer_dir, lr)
    if not train_encoded or not query_encoded:
        return np.zeros((len(query_encoded), len(train_encoded)), dtype=np.float64)
    weights = [p for _, p in named]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = weights[0].device
    # length-sorted batches waste less on padding; every query's loss goes back to its own position
    plan = plan_batches([len(r.input_ids) for r in query_encoded], batch_size=batch_size, sort_by_length=True)
    q_batches = [collate([query_encoded[i] for i in index], index, pad_id).to(device) for index in plan]
    out = np.zeros((len(query_encoded), len(train_encoded)), dtype=np.float64)
    originals = [w.detach().clone() for w in weights]
    was_training = model.training
    model.eval()
    bar = _progress(len(train_encoded), progress, "one-step effects")
    try:
        base = _batched_losses(model, q_batches)
        for n, grads in enumerate(row_gradients(model, train_encoded, pad_id, weights)):
            with torch.no_grad():
                for i, (w, g) in enumerate(zip(weights, grads)):
                    step, eta = step_of(i, g, train_encoded[n])
                    w.sub_(step, alpha=eta)
            out[:, n] = base - _batched_losses(model, q_batches)
            _restore(weights, originals)
            bar.update(1)
    finally:
        _restore(weights, originals)
        model.train(was_training)
        bar.close()
    return out


def _chosen_parameters(model: torch.nn.Module, names: Sequence[str] | None) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` to update: those named, in model order, or every one with ``requires_grad``."""
    available = dict(model.named_parameters())
    if names is None:
        chosen = [(n, p) for n, p in available.items() if p.requires_grad]
    else:
        unknown = [n for n in names if n not in available]
        if unknown:
            raise InputError(f"params: {unknown[:3]} are not parameters of the model")
        wanted = set(names)
        chosen = [(n, p) for n, p in available.items() if n in wanted]
    if not chosen:
        raise InputError("params: no trainable parameter to update")
    return chosen


def _update_rule(named: list, optimizer_dir: str | os.PathLike | None, lr: float | None) -> Callable:
    """``step_of(i, grad, row) -> (u, η)``: the update of parameter ``i`` for a row's summed-loss gradient."""
    if optimizer_dir is None:
        if lr is None:
            raise InputError("one-step effects: give the final optimizer state (optimizer_dir) or an explicit lr")
        return lambda _i, grad, _row: (grad, float(lr))
    from dataworth.train import OPTIMIZER_TENSORS, load_optimizer_state

    source = final_optimizer_dir(optimizer_dir)
    if source is None:
        raise InputError(f"{optimizer_dir}: no optimizer state ({OPTIMIZER_TENSORS} here or under checkpoints/epoch-N/)")
    states, meta = load_optimizer_state(source)
    beta1, beta2 = (float(b) for b in meta["betas"])
    eps, eta = float(meta["eps"]), float(meta["lr"] if lr is None else lr)
    second, first_scale, second_scale = [], [], []
    for name, p in named:
        if name not in states or name not in meta.get("step", {}):
            raise InputError(f"{source}: optimizer state has no entry for {name} (a checkpoint of another model?)")
        v = states[name]["exp_avg_sq"]
        if v.shape != p.shape:
            raise InputError(f"{source}: {name} has optimizer state {tuple(v.shape)}, the model {tuple(p.shape)}")
        t = int(meta["step"][name]) + 1
        second.append(v.to(device=p.device, dtype=p.dtype))
        first_scale.append((1 - beta1) / (1 - beta1 ** t))
        second_scale.append(1 - beta2 ** t)

    def step_of(i: int, grad: torch.Tensor, row: Any) -> tuple[torch.Tensor, float]:
        g = grad / max(row.n_targets, 1)
        v_new = second[i] * beta2 + (1 - beta2) * g * g
        return first_scale[i] * g / ((v_new / second_scale[i]).sqrt() + eps), eta

    return step_of


def _state_covers(model: torch.nn.Module, optimizer_dir: Path) -> bool:
    """Whether the saved optimizer state (``optimizer.json`` ``params``) names every trainable parameter."""
    from dataworth.train import OPTIMIZER_JSON

    saved = set(json.loads((Path(optimizer_dir) / OPTIMIZER_JSON).read_text()).get("params", []))
    return all(name in saved for name, p in model.named_parameters() if p.requires_grad)


@torch.no_grad()
def _batched_losses(model: torch.nn.Module, batches: Sequence[Any]) -> np.ndarray:
    """``[Q]`` float64 summed target losses of the pre-collated query ``batches``, at each row's ``index``."""
    from dataworth.batching import example_losses

    out = np.zeros(sum(len(b) for b in batches), dtype=np.float64)
    for b in batches:
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        out[b.index.numpy()] = example_losses(logits, b).double().cpu().numpy()
    return out


@torch.no_grad()
def _restore(weights: Sequence[torch.Tensor], originals: Sequence[torch.Tensor]) -> None:
    for w, w0 in zip(weights, originals):
        w.copy_(w0)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=not enabled, dynamic_ncols=True, leave=False)


# -------------------------------------------------------------------------------------------- the builders

def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _train_base_model(config: LdsConfig, model_dir: Path, progress: bool) -> None:
    """The full-data model via ``dataworth.train``; keeps ``config.checkpoints`` evenly spaced epochs."""
    from dataworth.train import TRAIN_JSON, train

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
    from dataworth.data import load_rows

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
            _say(f"[lds] full-data model → {model_dir}")
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
                _say(f"[lds] retrain {i + 1}/{len(jobs)} ({name}) {time.perf_counter() - t0:.1f}s")
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
        from dataworth.models import load_model

        loaded = load_model(str(model_dir), device=context.config.train.device)
        values = query_losses(loaded.model, context.encoded_queries, context.tokenizer.pad_token_id)
    else:
        values = np.asarray(trainer(np.arange(n_rows), 0)[0], dtype=np.float64)
    write_json_atomic(path, {"losses": values.tolist()})
    return values


def load_lds_task(out_dir: str | os.PathLike, config: LdsConfig) -> LdsTask:
    """The complete task from ``out_dir`` without training anything; an incomplete cache is an InputError."""
    if not (Path(out_dir) / "cache.json").exists():
        raise InputError(f"{out_dir}: no retrain cache here (cache.json missing); build it with build_lds_task")

    def refuse(_included: np.ndarray, _seed: int) -> tuple[np.ndarray, float]:
        raise InputError(f"{out_dir}: retrain cache is incomplete; run build_lds_task (or dataworth eval lds) first")

    return build_lds_task(out_dir, config, progress=False, trainer=refuse)


# ------------------------------------------------------------------------------------------- removal retrains

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
        _say(f"[removal] retrain without {removed.size} rows ({name}) {time.perf_counter() - t0:.1f}s")
    return values


def full_losses(task: LdsTask, replicate: int = 0, **kwargs: Any) -> np.ndarray:
    """``[Q]`` query losses of the all-rows reference retrain of ``replicate`` (paired with removals)."""
    return removal_losses(task, [], replicate, **kwargs)


# ------------------------------------------------------------------------------------ attributing the task
#
# What `dataworth eval` runs: dataworth's own attribution of the task's queries, scored against the retrains.


@dataclass(frozen=True)
class AttributionConfig:
    """How dataworth attributes the task's queries (one row of the LDS table).

    ``projection``: ``random`` | ``pca`` | ``identity`` (LoGra; ``rank`` = k_in = k_out, ignored for identity).
    ``curvature``: ``none`` | ``raw`` | ``kfac`` | ``ekfac``; ``damping``: a float or ``auto``.
    ``mode``: ``dot`` | ``cosine`` | ``relative`` (``dataworth.scoring``).
    ``checkpoints``: ``final`` (the full-data model) or ``ensemble`` — the mean of the score matrices of
    the task's kept per-epoch checkpoints (TRAK's model ensemble / TracIn's checkpoint sum, with equal
    weights). ``optimizer``: ``none`` or ``adam`` — TrackStar (Chang et al. 2024, "Scalable Influence and
    Fact Tracing for LLM Pretraining", §3): each gradient is divided elementwise by ``√v̂ + ε`` (the final
    checkpoint's Adam second moment) — exact only with ``identity`` projection, which this requires —
    then densely projected to ``rank`` dims, preconditioned with the damped mixture
    ``R = (1 − mix)·R_train + mix·R_query`` of the train and query gradient second moments, and unit-normalised
    (``mode`` is then ignored: TrackStar is a cosine). ``rank=0`` with ``adam``: no projection and ``R = I``.
    ``measure_end_token``: the query gradient includes the appended end-of-sequence target (matching a task
    with ``measure="answer+end"``); off by default, like ``extract.query_gradients`` for prompt/response rows
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
        from dataworth.curvature import check_kind
        from dataworth.scoring import check_mode

        check_kind(self.curvature)
        check_mode(self.mode)
        if self.projection not in ("random", "pca", "identity"):
            raise InputError(f"--projection: must be random, pca or identity, got {self.projection!r}")
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
    from dataworth.curvature import fit_curvature
    from dataworth.extract import ExtractConfig, extract, query_gradients
    from dataworth.models import load_model
    from dataworth.scoring import score_rows

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


def adam_normalise(rows: np.ndarray, store, states: dict, eps: float) -> np.ndarray:
    """Divide each module's exact gradient columns ``[*, D]`` by ``√v̂ + eps`` of that module's weight
    (TrackStar's optimizer normalisation), ``v̂ = exp_avg_sq / (1 − β₂ᵗ)`` the bias-corrected Adam second
    moment (``states[name]["_bias2"]`` holds ``1 − β₂ᵗ``)."""
    out = np.array(rows, dtype=np.float32, copy=True)
    layouts = {m["name"]: m for m in store.manifest["config"]["module_info"]}
    for spec in store.modules:
        name = f"{spec.name}.weight"
        if name not in states:
            raise InputError(f"optimizer state has no entry for {name} (checkpoint from another model?)")
        v = states[name]["exp_avg_sq"].numpy().astype(np.float64)
        v = v / states[name]["_bias2"]
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
    from dataworth.projection import dense_project
    from dataworth.train import load_optimizer_state

    source = final_optimizer_dir(model_dir)
    if source is None:
        raise InputError(f"{model_dir}: no optimizer state (checkpoints/epoch-N/optimizer.safetensors) for TrackStar")
    states, meta = load_optimizer_state(source)
    beta2 = float(meta["betas"][1])
    for name, st in states.items():
        st["_bias2"] = 1.0 - beta2 ** int(meta["step"][name])
    train = adam_normalise(store.matrix(), store, states, float(meta["eps"]))
    query = adam_normalise(query_rows, store, states, float(meta["eps"]))
    if method.rank == 0:  # no projection and R = I: the cosine of the Adam-normalised exact gradients
        return _unit(query.astype(np.float64)) @ _unit(train.astype(np.float64)).T
    both = torch.from_numpy(np.concatenate([train, query]))
    projected = dense_project(both, store.manifest["projection"]["seed"], method.rank).double().numpy()
    train_p, query_p = projected[: len(train)], projected[len(train):]
    r = (1 - method.mix) * (train_p.T @ train_p) / len(train_p) + method.mix * (query_p.T @ query_p) / len(query_p)
    values, vectors = np.linalg.eigh(r)
    values = np.clip(values, 0, None)
    damping = 0.1 * values.mean() if method.damping == "auto" else float(method.damping)
    whiten = (vectors / np.sqrt(values + damping)) @ vectors.T  # R^{-1/2}
    return _unit(query_p @ whiten) @ _unit(train_p @ whiten).T


def _unit(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)


# ----------------------------------------------------------------------------------------- evaluation runs

def run_lds(task: LdsTask, method: AttributionConfig, *, leave_out_percent: Sequence[float] = (),
            random_draws: int = 1, n_bootstrap: int = 1000, progress: bool = True) -> dict:
    """LDS of ``method`` on ``task`` (see ``dataworth.evaluate.lds_summary`` for the keys) plus, for each
    ``p`` in ``leave_out_percent``, the leave-k-out test with ``k = round(p·N/100)``: per query, retrain
    without its top-k rows vs without k random rows (``leave_out@p%_top_increase`` etc., see
    ``evaluate.removal_summary``). Leave-k-out retrains one model per query and k: expensive, opt-in."""
    started = time.perf_counter()
    scores = attribution_scores(task, method, progress=progress)
    score_s = time.perf_counter() - started
    out = {"method": method.label(), **task.evaluate(scores, n_bootstrap=n_bootstrap),
           "sign": "lds = Spearman(sum of scores of the included rows, -query loss); positive score = lowers loss",
           "score_s": round(score_s, 2)}
    for p in leave_out_percent:
        if not 0 < p < 100:
            raise InputError(f"--leave-out-percent: must be in (0, 100), got {p}")
        k = max(1, int(round(p * len(task.train_ids) / 100)))
        summary = removal_test(task, scores, k, range(len(task.query_ids)), random_draws, progress=progress)
        out.update({f"leave_out@{p:g}%_{key}": value for key, value in summary.items()})
    return out


def removal_test(task: LdsTask, scores: np.ndarray, k: int, queries: Sequence[int], random_draws: int = 1,
                 replicate: int = 0, *, progress: bool = True, trainer: Trainer | None = None) -> dict:
    """For each query in ``queries``: retrain without its ``k`` top-scored rows and without ``k`` random rows
    (``random_draws`` draws), and compare the *query's own* loss with the all-rows retrain
    (``evaluate.removal_summary``; ``k`` is added to the result)."""
    from dataworth.evaluate import removal_summary, top_k_rows

    queries = list(queries)
    if not 1 <= k < len(task.train_ids):
        raise InputError(f"--k: must be in 1..{len(task.train_ids) - 1}, got {k}")
    kw = {"progress": progress, "trainer": trainer}
    base_all = full_losses(task, replicate, **kw)
    top_rows = top_k_rows(scores, k)
    base, top, rand = [], [], np.zeros((random_draws, len(queries)))
    for j, q in enumerate(queries):
        base.append(base_all[q])
        top.append(removal_losses(task, top_rows[q], replicate, **kw)[q])
        for d in range(random_draws):
            rng = np.random.default_rng(derived_seed("random-removal", task.config.seed, q, k, d))
            rand[d, j] = removal_losses(task, rng.choice(len(task.train_ids), k, replace=False), replicate, **kw)[q]
    return {"k": k, **removal_summary(np.array(base), np.array(top), rand)}


def run_brittleness(task: LdsTask, method: AttributionConfig, ks: Sequence[int] = (1, 2, 4), n_queries: int = 4,
                    random_draws: int = 1, *, progress: bool = True) -> dict:
    """Brittleness (Ilyas et al. 2022): for ``n_queries`` queries (a seeded sample) and each ``k`` in ``ks``,
    the query-loss increase from removing the top-k attributed rows vs k random rows. Keys per k:
    ``top_increase@k``, ``random_increase@k``, ``ratio@k``, ``top_beats_random@k``."""
    if n_queries < 1:
        raise InputError(f"--queries-sampled: must be >= 1, got {n_queries}")
    rng = np.random.default_rng(derived_seed("brittleness-queries", task.config.seed))
    chosen = sorted(rng.choice(len(task.query_ids), min(n_queries, len(task.query_ids)), replace=False).tolist())
    scores = attribution_scores(task, method, progress=progress)
    out: dict[str, Any] = {"method": method.label(), "queries_sampled": [task.query_ids[q] for q in chosen],
                           "ks": list(ks)}
    for k in ks:
        summary = removal_test(task, scores, int(k), chosen, random_draws, progress=progress)
        out.update({f"{key}@{k}": value for key, value in summary.items() if key != "k"})
    return out


def auto_queries(data_spec: str) -> str:
    """``builtin:bios[?params]`` → ``builtin:bios:queries[?params]`` (the fact queries of the same world)."""
    head, sep, params = data_spec.partition("?")
    if head not in ("builtin:bios", "builtin:bios:train"):
        raise InputError(f"--queries: required for --data '{data_spec}' (only builtin:bios has default queries)")
    return "builtin:bios:queries" + sep + params


def eval_lds(out_dir: str | os.PathLike, config: LdsConfig, method: AttributionConfig, **kwargs: Any) -> dict:
    """``dataworth eval lds``: build (or resume) the task under ``out_dir`` and return `run_lds`'s figures."""
    method.check()
    progress = kwargs.pop("progress", True)
    task = build_lds_task(out_dir, config, progress=progress)
    out = run_lds(task, method, progress=progress, **kwargs)
    out["retrain_s"] = round(task.seconds, 1)
    return out


def eval_brittleness(out_dir: str | os.PathLike, config: LdsConfig, method: AttributionConfig, **kwargs: Any) -> dict:
    """``dataworth eval brittleness``: the task under ``out_dir`` (its LDS retrains are built too, since the
    cache is one task) and `run_brittleness`'s figures."""
    method.check()
    progress = kwargs.pop("progress", True)
    return run_brittleness(build_lds_task(out_dir, config, progress=progress), method, progress=progress, **kwargs)


def eval_facts(model: str, data: str, queries: str, out_dir: str | os.PathLike, *, projection: str = "random",
               rank: int = 32, curvatures: Sequence[str] = ("none", "ekfac"), modes: Sequence[str] = ("dot", "cosine"),
               modules: str = "all", seed: int = 0, progress: bool = True) -> list[dict]:
    """``dataworth eval facts``: recall@1/@10, strict recall@10 and MRR of the gold fact documents for each
    (curvature, mode), with BM25 in the same table (``demo.fact_tracing_table``; 1-based ranks, ties by row
    order), and ``tail-patch@10`` with its reference rows when ``model`` is a ``dataworth train`` directory
    holding its final optimizer state. Extracts a store of ``model`` on ``data`` under ``out_dir/store``
    (resumed when present)."""
    from dataworth.curvature import check_kind
    from dataworth.data import load_rows
    from dataworth.demo import fact_tracing_table
    from dataworth.extract import ExtractConfig, extract
    from dataworth.models import load_model
    from dataworth.scoring import check_mode

    for kind in curvatures:
        check_kind(kind)
    for mode in modes:
        check_mode(mode)
    query_rows = load_rows(queries)
    missing = [q for q in query_rows if "gold" not in q.data]
    if missing:
        raise InputError(f"{missing[0].source}: fact queries need a 'gold' list of training ids (builtin:bios:queries)")
    store = extract(ExtractConfig(model=model, data=data, out=str(Path(out_dir) / "store"), modules=modules,
                                  projection=projection, rank_in=rank, rank_out=rank, seed=seed, dtype="float32",
                                  device="cpu", shard_rows=1024), progress=progress)
    loaded = load_model(model, device="cpu")
    train_rows = load_rows(data)
    documents = [r.data.get("text") or (r.prompt + r.response) for r in train_rows]
    optimizer_dir = final_optimizer_dir(model) if Path(model).is_dir() else None
    if optimizer_dir is not None and not _state_covers(loaded.model, optimizer_dir):
        optimizer_dir = None  # e.g. a merged LoRA model: the state holds the adapter's weights, not these
    if optimizer_dir is None and progress:
        _say(f"[facts] {model}: no final optimizer state for its weights (checkpoints/epoch-N/), so no tail-patch")
    return fact_tracing_table(store, loaded.model, loaded.tokenizer, query_rows, list(curvatures), list(modes),
                              documents, train_rows=train_rows, optimizer_dir=optimizer_dir)
