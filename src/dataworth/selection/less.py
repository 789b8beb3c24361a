"""LESS targeted data selection (Xia et al. 2024, "LESS: Selecting Influential Data for Targeted Instruction
Tuning", §2-3): which rows of a pool should I fine-tune on to get better at a *target task*?

Why a module of its own: selection is the one stage that trains, extracts, scores and trains again. The
steps read only what the previous step wrote into one run directory, so each can be re-run on its own::

    RUN/select.json                          the SelectConfig used (later steps read it back)
    RUN/warmup/rows.jsonl                    the random warm-up subset (p % of the pool)
    RUN/warmup/model/checkpoints/epoch-N/    LoRA adapter + AdamW moments + trainer_state.json (η̄) per epoch
    RUN/features/ckpt-C/pool/                gradient store: Adam-preconditioned pool gradients, projected
    RUN/features/ckpt-C/valid/<task>/        gradient store: plain (SGD) validation gradients, projected
    RUN/features/features.json               checkpoints (path, η̄) in order, measured seconds per store
    RUN/selected/<task>/scores.parquet       the full score table (every pool row)
    RUN/selected/<task>/top_p<P>.jsonl       the selection: original rows + "score", best first
    RUN/final/<task>/                        LoRA fine-tuned on the selection (dataworth.model.train output)
    RUN/eval/<task>.json                     held-out test loss and exact-match accuracy

The mathematics (tests check each against a hand computation):

1. Warm-up: LoRA on a random ``warmup_percent`` % of the pool for ``warmup_epochs`` epochs with AdamW,
   a checkpoint per epoch (``dataworth.model.train``), each with its Adam moments ``m, v``, step count and the
   epoch's average learning rate ``η̄``.
2. Per-example gradients ``g`` of the LoRA weights (every ``lora_A`` / ``lora_B`` ``nn.Linear``, flattened
   module by module, each row-major ``d_out × d_in`` = that weight's ``.grad`` layout) of the example's
   *token-mean* loss — LESS takes ``model(**batch).loss`` with batch size 1, Hugging Face's mean over the
   example's target tokens. (Extraction hooks give the summed loss's gradient; we divide by the target
   count.) Pool rows are transformed into one Adam update's direction (`adam_update`); validation rows stay
   plain SGD gradients. Both go through the same seeded ``dense`` Gaussian projection to ``dense_dim``.
3. Matching: ``s(z, v) = Σ_c η̄_c · cos(Γ_c(z), g_c(v))`` per (pool row z, validation row v), then
   ``aggregate`` (mean | max | min, default mean as LESS) over the validation rows of each subtask, then
   ``across`` (default max, as LESS) over subtasks. Rows are ranked by score (ties: pool order) and the
   top ``floor(p · N / 100)`` are selected (``selection_size``).
4. Fine-tune LoRA on the selection; evaluate on the task's held-out test rows: loss (mean over target
   tokens) and exact match (greedy answer == expected answer, both stripped).

LESS's published code (``collect_grad_reps.obtain_gradients_with_adam``) differs from its paper's formula:
it uses no bias correction and puts ε under the square root, ``m'/√(v'+ε)``. Both are available
(``adam_convention``): ``"paper"`` (default) and ``"less_code"``; for cosine matching the bias correction of
``m`` is a positive scalar and drops out, so the two differ only through ε and ``v``'s correction.
AdamW's decoupled weight decay is not part of Γ (LESS ignores it too; the ``lora`` preset uses none).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dataworth.data.batching import collate, example_losses, plan_batches
from dataworth.data.encode import data_fingerprint, encode_rows
from dataworth.data.rows import load_rows
from dataworth.errors import InputError
from dataworth.gradients.extract import Extractor, encoded_rows_for
from dataworth.gradients.modules import select_modules
from dataworth.gradients.projection import build_projections
from dataworth.model.generate import generate_token_ids
from dataworth.model.load import load_model
from dataworth.model.losses import forward_batches
from dataworth.model.optimizer import (
    ADAM_CONVENTIONS,
    OPTIMIZER_JSON,
    OPTIMIZER_TENSORS,
    adam_update,
    checkpoint_lr,
    load_adam_state,
)
from dataworth.model.train import TrainConfig, train
from dataworth.store.format import STORE_DTYPES, ModuleSpec
from dataworth.store.reader import open_store
from dataworth.store.writer import StoreWriter
from dataworth.util import (
    atomic_write,
    pad_token_id,
    progress_bar,
    say,
    torch_threads,
    write_json_atomic,
    write_jsonl_atomic,
)

LORA_MODULES = r"lora_[AB]\."
GRADIENTS = ("adam", "sgd")
AGGREGATES = ("mean", "max", "min")
SELECT_JSON = "select.json"
ADAPTER_FIELDS = ("r", "lora_alpha", "target_modules", "base_model_name_or_path", "lora_dropout",
                  "fan_in_fan_out", "use_rslora", "use_dora", "bias", "modules_to_save", "layers_to_transform")
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")


@dataclass(frozen=True)
class SelectConfig:
    """Everything that decides a LESS run (saved as ``RUN/select.json``; later steps read it back).

    Data: ``pool`` (rows to select from), ``valid`` / ``test`` (per-task validation / held-out rows, see
    `load_task_rows`), ``tasks`` (target task names), ``base`` (the model LoRA adapts; a ``load_model``
    spec). Warm-up: ``warmup_percent`` % of the pool for ``warmup_epochs``. LoRA training (warm-up and the
    final fine-tune share it): ``lr``, ``batch_size``, ``lora_*``, ``max_length``. Features: ``dense_dim``
    (LESS default 8192), ``projection_seed``, ``gradient`` (``adam`` for the pool as LESS; ``sgd`` only when
    asked), ``adam_convention``, ``dtype`` of the stores (float32 by default: validation gradients of a
    trained model can underflow float16). Matching: ``aggregate`` over the validation rows of a subtask,
    ``across`` subtasks; ``percent`` of the pool or an absolute ``n_select``.
    """

    run: str = ""
    pool: str | None = None
    base: str | None = None
    valid: str | None = None
    test: str | None = None
    tasks: tuple[str, ...] = ()
    seed: int = 0
    warmup_percent: float = 5.0
    warmup_epochs: int = 4
    finetune_epochs: int = 4
    lr: float = 2e-4
    batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    max_length: int | None = 512
    dense_dim: int = 8192
    projection_seed: int = 0
    gradient: str = "adam"
    adam_convention: str = "paper"
    dtype: str = "float32"
    feature_batch_size: int = 16
    aggregate: str = "mean"
    across: str = "max"
    percent: float = 5.0
    n_select: int | None = None
    chat: str = "auto"
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        checks = [
            (0 < self.warmup_percent <= 100, "warmup-percent", f"must be in (0, 100], got {self.warmup_percent}"),
            (0 < self.percent <= 100, "percent", f"must be in (0, 100], got {self.percent}"),
            (self.n_select is None or self.n_select >= 1, "n", f"must be >= 1, got {self.n_select}"),
            (self.warmup_epochs >= 1, "warmup-epochs", f"must be >= 1, got {self.warmup_epochs}"),
            (self.finetune_epochs >= 1, "finetune-epochs", f"must be >= 1, got {self.finetune_epochs}"),
            (self.dense_dim >= 1, "dense-dim", f"must be >= 1, got {self.dense_dim}"),
            (self.feature_batch_size >= 1, "feature-batch-size", f"must be >= 1, got {self.feature_batch_size}"),
            (self.gradient in GRADIENTS, "gradient", f"must be one of {', '.join(GRADIENTS)}, got {self.gradient!r}"),
            (self.adam_convention in ADAM_CONVENTIONS, "adam-convention",
             f"must be one of {', '.join(ADAM_CONVENTIONS)}, got {self.adam_convention!r}"),
            (self.aggregate in AGGREGATES, "aggregate", f"must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}"),
            (self.across in AGGREGATES, "across", f"must be one of {', '.join(AGGREGATES)}, got {self.across!r}"),
            (self.dtype in STORE_DTYPES, "dtype", f"must be float16, bfloat16 or float32, got {self.dtype!r}"),
        ]
        for ok, flag, message in checks:
            if not ok:
                raise InputError(f"--{flag}: {message}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict, source: str = SELECT_JSON) -> "SelectConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{source}: unknown field(s) {', '.join(unknown)}")
        return cls(**data)


def require(config: SelectConfig, *names: str) -> None:
    """``InputError`` naming the flag of the first of ``names`` that is unset (None / empty)."""
    for name in names:
        if getattr(config, name) in (None, "", ()):
            flag = {"tasks": "task", "run": "out"}.get(name, name.replace("_", "-"))
            raise InputError(f"--{flag} is required (not given and not in {config.run or 'RUN'}/{SELECT_JSON})")


def load_config(run: str | Path, **overrides: Any) -> SelectConfig:
    """``RUN/select.json`` with ``overrides`` applied (``None`` values are ignored: unset flags)."""
    path = Path(run) / SELECT_JSON
    given = {k: v for k, v in overrides.items() if v is not None and v != ()}
    if path.is_file():
        try:
            saved = json.loads(path.read_text())["config"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: not a dataworth select run file ({exc})") from None
        return dataclasses.replace(SelectConfig.from_json(saved, str(path)), **{**given, "run": str(run)})
    return SelectConfig(**{**given, "run": str(run)})


def save_config(config: SelectConfig) -> None:
    """Write ``RUN/select.json`` atomically."""
    write_json_atomic(Path(config.run) / SELECT_JSON, {"format": "dataworth-select", "version": 1,
                                                 "config": config.to_json()})


def selection_size(n_pool: int, percent: float | None = None, n: int | None = None) -> int:
    """Rows to select: ``n`` when given, else ``floor(percent · n_pool / 100)`` computed exactly (decimal
    ``percent`` as written, so 5 % of 2000 is 100, never 99). Floor, as LESS's ``write_selected_data``
    truncates. ``InputError`` when the pool cannot supply it (``n > n_pool``, or zero rows)."""
    if n is not None:
        if n > n_pool:
            raise InputError(f"--n: selecting {n} rows but the pool has only {n_pool}")
        return n
    if percent is None or not 0 < percent <= 100:
        raise InputError(f"--percent: must be in (0, 100], got {percent}")
    k = math.floor(Fraction(str(percent)) * n_pool / 100)
    if k < 1:
        raise InputError(f"--percent: {percent} % of a pool of {n_pool} rows is {k} rows; the pool is smaller "
                         f"than one selected row (use a larger pool or percent)")
    return k


def random_subset(n_pool: int, k: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded uniform random ``k``-subset of ``range(n_pool)`` (numpy PCG64)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_pool, size=k, replace=False))


def _task_file(directory: Path, task: str) -> Path | None:
    for suffix in DATA_SUFFIXES:
        if (directory / f"{task}{suffix}").is_file():
            return directory / f"{task}{suffix}"
    return directory / task if (directory / task).is_dir() else None


def list_tasks(spec: str) -> list[str]:
    """Task names a validation/test spec offers: file stems (or sub-folders) of a directory, else the
    distinct ``task`` fields of its rows (in first-seen order)."""
    path = Path(spec)
    if not spec.startswith(("builtin:", "hf:")) and path.is_dir():
        names = sorted({p.stem for p in path.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file()}
                       | {p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")})
        return names
    seen: dict[str, None] = {}
    for row in load_rows(spec):
        if isinstance(row.data.get("task"), str):
            seen.setdefault(row.data["task"], None)
    return list(seen)


def load_task_rows(spec: str, task: str, what: str = "valid") -> list:
    """The rows of target ``task`` in a validation or test ``spec`` (``what`` names the flag in errors).

    ``spec`` is either a directory of per-task files (``<task>.jsonl`` / ``.json`` / ``.parquet`` or a
    ``<task>/`` folder, open-instruct messages rows as LESS ships them), or any `dataworth.data` spec whose
    rows carry a ``task`` field (e.g. ``builtin:instruct:valid``); a file without ``task`` fields is taken
    to be entirely ``task``. A row's subtask is its ``subtask`` field, else the task itself. No rows for
    the task is an ``InputError`` listing the tasks that exist.
    """
    path = Path(spec)
    if not spec.startswith(("builtin:", "hf:")) and path.is_dir():
        found = _task_file(path, task)
        if found is None:
            raise InputError(f"--{what} {spec}: no examples for task '{task}' (expected {task}.jsonl, .json, "
                             f".parquet or {task}/; tasks here: {', '.join(list_tasks(spec)) or 'none'})")
        return load_rows(str(found))
    rows = load_rows(spec)
    if not any("task" in row.data for row in rows):
        return rows
    chosen = [row for row in rows if row.data.get("task") == task]
    if not chosen:
        raise InputError(f"--{what} {spec}: no examples for task '{task}' "
                         f"(tasks present: {', '.join(list_tasks(spec)) or 'none'})")
    return chosen


def subtask_labels(rows: Sequence, task: str) -> list[str]:
    """Each row's ``subtask`` field (a string), else ``task``."""
    return [row.data["subtask"] if isinstance(row.data.get("subtask"), str) else task for row in rows]


def checkpoint_dirs(run: str | Path) -> list[Path]:
    """The warm-up checkpoints of a run, ``RUN/warmup/model/checkpoints/epoch-N``, in epoch order."""
    root = Path(run) / "warmup" / "model" / "checkpoints"
    found = [p for p in root.glob("epoch-*") if p.is_dir() and re.fullmatch(r"epoch-\d+", p.name)]
    if not found:
        raise InputError(f"{root}: no warm-up checkpoints (run `dataworth select warmup` first)")
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def check_checkpoints(ckpts: Sequence[Path], gradient: str = "adam") -> None:
    """All checkpoints must be LoRA adapters with one configuration, and (for Adam features) carry AdamW
    moments of the same parameters; else ``InputError`` naming the checkpoints and the differing field."""
    first_config, first_params = None, None
    for ckpt in ckpts:
        adapter = ckpt / "adapter_config.json"
        if not adapter.is_file():
            raise InputError(f"{ckpt}: not a LoRA checkpoint (no adapter_config.json); LESS features are "
                             "gradients of LoRA weights")
        config = json.loads(adapter.read_text())
        fields = {k: _canonical_field(config.get(k)) for k in ADAPTER_FIELDS}
        if first_config is None:
            first_config = (ckpt, fields)
        else:
            for key in ADAPTER_FIELDS:
                if fields[key] != first_config[1][key]:
                    raise InputError(f"{ckpt}: LoRA configuration field '{key}' is {fields[key]!r} but "
                                     f"{first_config[0]} has {first_config[1][key]!r}; checkpoints of one "
                                     "warm-up must share their LoRA configuration")
        if gradient != "adam":
            continue
        if not ((ckpt / OPTIMIZER_TENSORS).is_file() and (ckpt / OPTIMIZER_JSON).is_file()):
            raise InputError(f"{ckpt}: no optimizer state ({OPTIMIZER_TENSORS}, {OPTIMIZER_JSON}); LESS's "
                             "Adam-preconditioned features need the warm-up's AdamW moments; re-run "
                             "`dataworth select warmup`, or pass --gradient sgd to use plain SGD gradients")
        params = sorted(json.loads((ckpt / OPTIMIZER_JSON).read_text()).get("params", []))
        if first_params is None:
            first_params = (ckpt, params)
        elif params != first_params[1]:
            raise InputError(f"{ckpt}: optimizer state covers other parameters than {first_params[0]} "
                             "(mismatched LoRA configurations between checkpoints)")


def _canonical_field(value: Any) -> Any:
    return sorted(value) if isinstance(value, (list, set, tuple)) else value


def lora_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The LoRA ``nn.Linear`` layers (``…lora_A.<adapter>``, ``…lora_B.<adapter>``) in module order."""
    try:
        return select_modules(model, LORA_MODULES)
    except InputError:
        raise InputError("model has no LoRA layers (lora_A / lora_B); LESS features need a LoRA "
                         "checkpoint (dataworth select warmup)") from None


def gradient_features(model: torch.nn.Module, tokenizer, encoded: Sequence, out: str | Path, *,
                      transform: Callable[[torch.Tensor], torch.Tensor] | None, dense_dim: int, seed: int,
                      header: dict, dtype: str = "float32", batch_size: int = 16, shard_rows: int = 4096,
                      overwrite: bool = False, progress: bool = True):
    """Write a gradient store of projected per-example LoRA gradients; returns the opened store.

    Row ``n`` = ``P · T(g_n)`` with ``g_n = ∇_LoRA (Σ_t ℓ_{n,t}) / max(1, T_n)`` (token-mean loss of
    example n, the LESS convention), ``T`` = ``transform`` (e.g. `adam_update`) or identity, ``P`` the
    seeded ``dense`` Gaussian projection (``D_full → dense_dim``, entries N(0, 1/k)). Resumable per shard;
    a complete store with the same header is returned as is; one with another header is an error unless
    ``overwrite``. The rows come from the same hook engine and batch loop as `dw.extract`'s ``dense``
    projection (`Extractor` with ``loss="token_mean"``).
    """
    modules = lora_modules(model)
    d_full = sum(m.weight.numel() for _, m in modules)
    device = next(model.parameters()).device
    full_header = {
        "projection": {"kind": "dense", "seed": seed, "dense_dim": dense_dim, "d_full": d_full,
                       **header.get("projection", {})},
        "model": header.get("model", {}),
        "data": {"fingerprint": data_fingerprint(list(encoded)), "rows": len(encoded), **header.get("data", {})},
        "config": {"loss": "token_mean", "modules": LORA_MODULES,
                   "module_names": [n for n, _ in modules], **header.get("config", {})},
    }
    spec = ModuleSpec("dense", 1, dense_dim, 0, dense_dim, "out_in")
    writer = StoreWriter(out, modules=[spec], dtype=dtype, shard_rows=shard_rows, header=full_header,
                         overwrite=overwrite)
    if writer.complete:
        return open_store(out)
    projections = build_projections(modules, "identity", 0, 0, seed)
    n = len(encoded)
    bar = progress_bar(n - writer.done_rows, Path(out).name, enabled=progress)
    with Extractor(model, modules, projections, device, kind="dense", dense_dim=dense_dim, seed=seed,
                   transform=transform, loss="token_mean") as extractor:
        for shard in range(writer.done_shards, math.ceil(n / shard_rows)):
            part = list(encoded[shard * shard_rows:(shard + 1) * shard_rows])
            rows, losses, tokens = encoded_rows_for(extractor, part, pad_token_id(tokenizer), batch_size, None)
            if not np.isfinite(rows).all():
                bad = [part[i].id for i in np.flatnonzero(~np.isfinite(rows).all(axis=1))[:5]]
                raise InputError(f"{out}: non-finite gradient features for rows {', '.join(bad)}")
            writer.write_shard(shard, rows, [e.id for e in part], losses, tokens)
            bar.update(len(part))
    bar.close()
    writer.finalize()
    return open_store(out)


def _checkpoint_model(ckpt: str | Path, device: str):
    loaded = load_model(ckpt, device=device)
    if loaded.tokenizer.pad_token_id is None:
        loaded.tokenizer.pad_token = loaded.tokenizer.eos_token
    return loaded


def features(config: SelectConfig, checkpoints: Sequence[str | Path] | None = None, progress: bool = True,
             overwrite: bool = False) -> dict:
    """Step 2: per checkpoint, pool features (Adam or SGD) and each task's validation features (SGD).

    ``checkpoints``: explicit LoRA checkpoint directories (default: the run's warm-up checkpoints).
    ``overwrite``: replace existing stores made with other settings (else they are an error; complete
    stores with the same settings are reused).
    Writes ``RUN/features/ckpt-<c>/{pool, valid/<task>}`` stores (``c`` = 1-based position in
    ``checkpoints``) and ``RUN/features/features.json`` (checkpoints, their η̄, wall-clock seconds per store;
    wall-clock and this process's CPU time — the fair cost measure on a shared CPU machine; a reused store
    keeps the figures recorded when it was computed). Returns that record.
    """
    require(config, "run", "pool", "valid")
    ckpts = [Path(c) for c in checkpoints] if checkpoints else checkpoint_dirs(config.run)
    check_checkpoints(ckpts, config.gradient)
    lrs = [checkpoint_lr(c) for c in ckpts]
    tasks = list(config.tasks) or list_tasks(config.valid)
    if not tasks:
        raise InputError(f"--valid {config.valid}: no target tasks found (give --task)")
    pool_rows = load_rows(config.pool)
    valid_rows = {task: load_task_rows(config.valid, task) for task in tasks}
    record_path = Path(config.run) / "features" / "features.json"
    previous = json.loads(record_path.read_text()) if record_path.is_file() else {"checkpoints": []}
    earlier_seconds = {c["features"]: (c.get("pool_seconds"), c.get("pool_cpu_seconds"))
                       for c in previous.get("checkpoints", []) if c.get("pool_seconds")}
    record = {"checkpoints": [], "tasks": tasks, "gradient": config.gradient,
              "adam_convention": config.adam_convention, "dense_dim": config.dense_dim}
    with torch_threads(config.threads):
        for c, (ckpt, lr) in enumerate(zip(ckpts, lrs), start=1):
            loaded = _checkpoint_model(ckpt, config.device)
            model, tokenizer = loaded.model, loaded.tokenizer
            root = Path(config.run) / "features" / f"ckpt-{c}"
            common = dict(dense_dim=config.dense_dim, seed=config.projection_seed, dtype=config.dtype,
                          batch_size=config.feature_batch_size, overwrite=overwrite, progress=progress)
            model_header = {"fingerprint": loaded.fingerprint, "path": str(ckpt)}
            pool_encoded, _ = encode_rows(pool_rows, tokenizer, max_length=config.max_length, chat=config.chat)
            transform = None
            if config.gradient == "adam":
                state = load_adam_state(ckpt, lora_modules(model))
                transform = lambda g, s=state: adam_update(g, s, config.adam_convention)  # noqa: E731
            reused = _store_complete(root / "pool")
            started, cpu_started = time.perf_counter(), time.process_time()
            gradient_features(model, tokenizer, pool_encoded, root / "pool", transform=transform, header={
                "projection": {"transform": config.gradient if config.gradient == "sgd"
                               else f"adam-{config.adam_convention}"},
                "model": model_header, "data": {"spec": config.pool}}, **common)
            pool_seconds = time.perf_counter() - started
            pool_cpu_seconds = time.process_time() - cpu_started
            if reused and earlier_seconds.get(str(root)):
                pool_seconds, pool_cpu_seconds = earlier_seconds[str(root)]
            valid_seconds = {}
            for task in tasks:
                encoded, _ = encode_rows(valid_rows[task], tokenizer, max_length=config.max_length, chat=config.chat)
                started = time.perf_counter()
                gradient_features(model, tokenizer, encoded, root / "valid" / task, transform=None, header={
                    "projection": {"transform": "sgd"}, "model": model_header,
                    "data": {"spec": config.valid, "task": task}}, **common)
                valid_seconds[task] = time.perf_counter() - started
            record["checkpoints"].append({"path": str(ckpt), "avg_lr": lr, "features": str(root),
                                          "pool_seconds": pool_seconds, "pool_cpu_seconds": pool_cpu_seconds,
                                          "pool_rows": len(pool_rows),
                                          "valid_seconds": valid_seconds})
    write_json_atomic(record_path, record)
    return record


def _store_complete(path: Path) -> bool:
    try:
        return json.loads((path / "manifest.json").read_text()).get("complete") is True
    except (OSError, ValueError):
        return False


def cosine_matrix(train: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``cos[n, m] = ⟨x_n, y_m⟩ / (‖x_n‖ ‖y_m‖)`` for ``train [N, k]``, ``valid [M, k]`` → ``[N, M]``
    (float64; a zero row has cosine 0 with everything)."""
    x = np.asarray(train, dtype=np.float64)
    y = np.asarray(valid, dtype=np.float64)
    nx = np.linalg.norm(x, axis=1, keepdims=True)
    ny = np.linalg.norm(y, axis=1, keepdims=True)
    x = np.divide(x, nx, out=np.zeros_like(x), where=nx > 0)
    y = np.divide(y, ny, out=np.zeros_like(y), where=ny > 0)
    return x @ y.T


def weighted_cosine(trains: Sequence[np.ndarray], valids: Sequence[np.ndarray], lrs: Sequence[float]) -> np.ndarray:
    """LESS's per-pair score ``Σ_c η̄_c · cos(Γ_c[n], g_c[m])`` → ``[N, M]`` (one term per checkpoint)."""
    if not (len(trains) == len(valids) == len(lrs)) or not lrs:
        raise ValueError("one train matrix, one validation matrix and one learning rate per checkpoint")
    return sum(lr * cosine_matrix(t, v) for t, v, lr in zip(trains, valids, lrs))


_REDUCE = {"mean": np.mean, "max": np.max, "min": np.min}


def aggregate_scores(pair_scores: np.ndarray, subtasks: Sequence[str], aggregate: str = "mean",
                     across: str = "max") -> tuple[np.ndarray, list[str], np.ndarray]:
    """Reduce ``pair_scores [N, M]`` over validation rows: ``aggregate`` within each subtask (LESS: mean),
    then ``across`` subtasks (LESS: max). Returns ``(scores [N], subtask names, per_subtask [N, S])`` with
    subtasks in order of first appearance in ``subtasks`` (length M)."""
    if aggregate not in _REDUCE or across not in _REDUCE:
        raise InputError(f"--aggregate / --across: must be one of {', '.join(AGGREGATES)}")
    if pair_scores.shape[1] != len(subtasks):
        raise ValueError(f"{pair_scores.shape[1]} validation columns but {len(subtasks)} subtask labels")
    names = list(dict.fromkeys(subtasks))
    labels = np.asarray(subtasks)
    per_subtask = np.stack([_REDUCE[aggregate](pair_scores[:, labels == s], axis=1) for s in names], axis=1)
    return _REDUCE[across](per_subtask, axis=1), names, per_subtask


def rank_rows(scores: np.ndarray) -> np.ndarray:
    """Positions sorted best first: descending score, ties broken by pool order (stable)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def compute_scores(config: SelectConfig, task: str) -> dict:
    """LESS scores of every pool row for ``task`` from the run's feature stores (see module docstring).

    Returns ``{"ids", "scores" [N], "subtasks", "per_subtask" [N, S], "lrs"}``.
    """
    require(config, "run", "valid")
    valid_rows = load_task_rows(config.valid, task)
    subtasks = subtask_labels(valid_rows, task)
    record_path = Path(config.run) / "features" / "features.json"
    if not record_path.is_file():
        raise InputError(f"{record_path}: missing (run `dataworth select features` first)")
    record = json.loads(record_path.read_text())
    pairs, lrs, ids = None, [], None
    for ckpt in record["checkpoints"]:
        root = Path(ckpt["features"])
        if not (root / "valid" / task / "manifest.json").is_file():
            raise InputError(f"{root / 'valid' / task}: no validation features for task '{task}' "
                             f"(run `dataworth select features --task {task}`)")
        pool, valid = open_store(root / "pool"), open_store(root / "valid" / task)
        if ids is None:
            ids = pool.ids
        elif pool.ids != ids:
            raise InputError(f"{root / 'pool'}: pool rows differ from the first checkpoint's")
        if valid.ids != [r.id for r in valid_rows]:
            raise InputError(f"{root / 'valid' / task}: validation rows differ from --valid {config.valid}; "
                             "re-run features")
        valid_matrix = valid.matrix()
        if pairs is None:
            pairs = np.zeros((pool.rows, valid.rows))
        # Σ_c η̄_c · cos, streamed over pool blocks so a large pool never sits in memory whole
        for start, block in pool.iter_blocks(reuse=True):
            pairs[start:start + len(block)] += ckpt["avg_lr"] * cosine_matrix(block, valid_matrix)
        lrs.append(ckpt["avg_lr"])
    scores, names, per_subtask = aggregate_scores(pairs, subtasks, config.aggregate, config.across)
    return {"ids": ids, "scores": scores, "subtasks": names, "per_subtask": per_subtask, "lrs": lrs}


def percent_label(percent: float) -> str:
    """``5`` → ``"5"``, ``2.5`` → ``"2.5"`` (file names ``top_p5.jsonl``, ``top_p2.5.jsonl``)."""
    return format(float(percent), "g")


def write_selection(pool_rows: Sequence, scores: np.ndarray, out_dir: str | Path, *, percent: float,
                    n_select: int | None = None, per_subtask: np.ndarray | None = None,
                    subtasks: Sequence[str] = ()) -> dict:
    """Write ``out_dir/scores.parquet`` (every row: id, position, score, rank (1-based), selected, and one
    ``subtask:<name>`` column per subtask) and ``out_dir/top_p<P>.jsonl`` (or ``top_n<K>.jsonl`` with
    ``n_select``): the selected original rows, best first, each with ``"score"`` added (and ``"id"`` when
    the row had none). Returns a summary (paths, k, score range)."""
    import pandas as pd

    n = len(pool_rows)
    if len(scores) != n:
        raise ValueError(f"{len(scores)} scores for {n} pool rows")
    k = selection_size(n, percent, n_select)
    order = rank_rows(scores)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    table = {"id": [r.id for r in pool_rows], "position": np.arange(n), "score": np.asarray(scores, np.float64),
             "rank": rank, "selected": rank <= k}
    for j, name in enumerate(subtasks):
        table[f"subtask:{name}"] = per_subtask[:, j]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "scores.parquet", lambda tmp: pd.DataFrame(table).to_parquet(tmp, index=False))
    name = f"top_n{k}.jsonl" if n_select is not None else f"top_p{percent_label(percent)}.jsonl"
    lines = []
    for position in order[:k]:
        row = pool_rows[position]
        if "score" in row.data:
            raise InputError(f"{row.source}: field 'score' already exists; rename it before selecting "
                             "(the selection adds a 'score' field)")
        data = dict(row.data) if "id" in row.data else {"id": row.id, **row.data}
        data["score"] = float(scores[position])
        lines.append(json.dumps(data, ensure_ascii=False))
    atomic_write(out / name, lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))
    return {"selection": str(out / name), "scores": str(out / "scores.parquet"), "k": k, "pool": n,
            "min_selected_score": float(scores[order[k - 1]]), "max_score": float(scores[order[0]])}


def match(config: SelectConfig, task: str) -> dict:
    """Step 3: score the pool for ``task`` and write ``RUN/selected/<task>/{scores.parquet, top_p<P>.jsonl}``."""
    require(config, "run", "pool", "valid")
    result = compute_scores(config, task)
    pool_rows = load_rows(config.pool)
    if [r.id for r in pool_rows] != result["ids"]:
        raise InputError(f"--pool {config.pool}: rows differ from those the features were computed on")
    summary = write_selection(pool_rows, result["scores"], Path(config.run) / "selected" / task,
                              percent=config.percent, n_select=config.n_select,
                              per_subtask=result["per_subtask"], subtasks=result["subtasks"])
    summary.update({"task": task, "aggregate": config.aggregate, "across": config.across,
                    "checkpoint_lrs": result["lrs"], "subtasks": result["subtasks"]})
    write_json_atomic(Path(config.run) / "selected" / task / "summary.json", summary)
    return summary


def lora_train_config(config: SelectConfig, epochs: int, seed: int | None = None):
    """The ``dataworth.model.train`` LoRA configuration shared by warm-up and final fine-tuning."""
    return TrainConfig.from_preset(
        "lora", base=config.base, epochs=epochs, lr=config.lr, batch_size=config.batch_size,
        lora_r=config.lora_r, lora_alpha=config.lora_alpha, lora_targets=tuple(config.lora_targets),
        max_length=config.max_length, seed=config.seed if seed is None else seed, chat=config.chat,
        device=config.device, threads=config.threads, save_every_epoch=True,
    )


def write_rows(rows: Sequence, path: str | Path) -> Path:
    """Original rows (``"id"`` added when missing) as JSONL, atomically."""
    return write_jsonl_atomic(path, (r.data if "id" in r.data else {"id": r.id, **r.data} for r in rows))


def warmup(config: SelectConfig, progress: bool = True):
    """Step 1: LoRA warm-up on a seeded random ``warmup_percent`` % of the pool, a checkpoint per epoch
    (adapter + AdamW moments + η̄). Writes ``RUN/warmup/rows.jsonl`` and ``RUN/warmup/model``; saves the
    config as ``RUN/select.json``. Returns the ``TrainResult``."""
    require(config, "run", "pool", "base")
    pool_rows = load_rows(config.pool)
    k = selection_size(len(pool_rows), config.warmup_percent)
    subset = [pool_rows[i] for i in random_subset(len(pool_rows), k, config.seed)]
    Path(config.run).mkdir(parents=True, exist_ok=True)
    save_config(config)
    path = write_rows(subset, Path(config.run) / "warmup" / "rows.jsonl")
    say(f"warm-up: LoRA on {k} of {len(pool_rows)} pool rows ({config.warmup_percent} %), "
         f"{config.warmup_epochs} epochs")
    return train(str(path), Path(config.run) / "warmup" / "model", lora_train_config(config, config.warmup_epochs),
                 queries_spec=None, progress=progress)


def finetune(config: SelectConfig, data: str | Path, out: str | Path, progress: bool = True):
    """LoRA fine-tuning of ``config.base`` on ``data`` for ``finetune_epochs`` (the final training)."""
    require(config, "base")
    return train(str(data), out, lora_train_config(config, config.finetune_epochs), queries_spec=None,
                 progress=progress)


def exact_match(generated: str, expected: str) -> bool:
    """``generated.strip() == expected.strip()`` (the instruct world's answers are short and exact)."""
    return generated.strip() == expected.strip()


def _prompt_and_answer(row) -> tuple[list[dict], str]:
    """Conversation before the last assistant turn, and that turn's content (the expected answer)."""
    if row.kind == "messages":
        messages = row.messages
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last], messages[last]["content"]
    if row.kind == "prompt_response":
        return [{"role": "user", "content": row.prompt}], row.response
    raise InputError(f"{row.source}: test rows need messages or prompt/response, got a {row.kind} row")


def evaluate_rows(model: torch.nn.Module, tokenizer, rows: Sequence, *, max_length: int | None = 512,
                  chat: str = "auto", batch_size: int = 16, max_new_tokens: int | None = None) -> dict:
    """Held-out metrics of ``model`` on ``rows``: ``loss`` = Σ target-token losses / Σ target tokens
    (the answer tokens and their end-of-turn token), and ``exact_match`` = fraction of rows whose greedy
    answer (prompt = the conversation before the last assistant turn, rendered as in training) equals the
    expected answer after stripping (`exact_match`). Deterministic."""
    encoded, _ = encode_rows(list(rows), tokenizer, max_length=max_length, chat=chat)
    pad_id = pad_token_id(tokenizer)
    total, targets = 0.0, 0
    model.eval()
    plan = plan_batches([len(e.input_ids) for e in encoded], batch_size=batch_size)
    for batch, output in forward_batches(model, [collate([encoded[i] for i in index], index, pad_id)
                                                 for index in plan]):
        total += float(example_losses(output.logits, batch).double().sum())
        targets += int(batch.loss_mask[:, 1:].sum())
    prompts = [prompt_ids(e) for e in encoded]
    answers = [_prompt_and_answer(row)[1] for row in rows]
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    outputs = generate_token_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens or longest + 4,
                                 batch_size=batch_size)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]
    correct = [exact_match(t, a) for t, a in zip(texts, answers)]
    return {"loss": total / max(targets, 1), "exact_match": sum(correct) / len(correct), "rows": len(rows),
            "target_tokens": targets, "examples": [{"expected": a, "generated": t} for a, t in
                                                   list(zip(answers, texts))[:5]]}


def prompt_ids(encoded) -> list[int]:
    """Token ids before the last answer of an encoded row: everything up to the last run of target tokens
    (exactly the tokens ``encode_rows`` put before that assistant turn, so generation sees the training
    rendering)."""
    mask = encoded.loss_mask
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    if end == 0:
        raise InputError(f"row {encoded.id}: no answer tokens to evaluate")
    return list(encoded.input_ids[:start])


def evaluate_model(model_spec: str | Path, test_rows: Sequence, config: SelectConfig) -> dict:
    """`evaluate_rows` for a saved model (a ``load_model`` spec)."""
    loaded = _checkpoint_model(model_spec, config.device)
    with torch_threads(config.threads):
        return evaluate_rows(loaded.model, loaded.tokenizer, test_rows, max_length=config.max_length,
                             chat=config.chat, batch_size=config.feature_batch_size)


def run(config: SelectConfig, progress: bool = True) -> dict:
    """The whole pipeline for each target task: warm-up → features → match → select → fine-tune on the
    selection with LoRA → evaluate on the task's held-out test rows. Finished steps are reused (warm-up
    when its checkpoints exist, feature stores when complete). Writes ``RUN/eval/<task>.json`` and
    returns ``{task: {"selection": …, "eval": …}}``."""
    require(config, "run", "pool", "base", "valid", "test")
    tasks = list(config.tasks) or list_tasks(config.valid)
    config = dataclasses.replace(config, tasks=tuple(tasks))
    test_rows = {task: load_task_rows(config.test, task, what="test") for task in tasks}
    for task in tasks:
        load_task_rows(config.valid, task)  # fail on a task without validation rows before training

    selection_size(len(load_rows(config.pool)), config.percent, config.n_select)
    ckpt_root = Path(config.run) / "warmup" / "model" / "checkpoints"
    if ckpt_root.is_dir() and any(ckpt_root.glob("epoch-*")):
        say(f"warm-up: reusing {ckpt_root}")
        save_config(config)
    else:
        warmup(config, progress=progress)
    features(config, progress=progress)
    results = {}
    for task in tasks:
        summary = match(config, task)
        final_dir = Path(config.run) / "final" / task
        finetune(config, summary["selection"], final_dir, progress=progress)
        metrics = evaluate_model(final_dir, test_rows[task], config)
        result = {"task": task, "selection": summary, "eval": metrics}
        write_json_atomic(Path(config.run) / "eval" / f"{task}.json", result)
        results[task] = result
    return results


def remove_run(run: str | Path) -> None:
    """Delete a run directory that holds a ``select.json`` (never anything else)."""
    path = Path(run)
    if path.exists():
        if not (path / SELECT_JSON).is_file():
            raise InputError(f"{path}: not a dataworth select run (no {SELECT_JSON}); refusing to delete")
        shutil.rmtree(path)
