"""Extraction: a dataset and a model in, a gradient store out (LoGra per-example projected gradients).

Rows are written shard by shard in dataset order. Within a shard, batches may be length-sorted to cut
padding; results are scattered back to their dataset positions before the shard is written. Each shard's
KFAC statistics are written beside it, so a killed run resumes after the last complete shard and the
final store is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from dataworth.batching import Encoded, collate, example_losses, plan_batches
from dataworth.errors import InputError
from dataworth.logging import GradientHooks, enable_input_grads, layer_dims, select_modules, weight_layout
from dataworth.projection import (
    KINDS,
    ModuleProjection,
    check_projection,
    dense_project,
    identity_projection,
    pca_projection,
    projection_digest,
    random_projection,
)

STORE_DTYPES = ("float16", "bfloat16", "float32")
KFAC_FILE = "curvature/kfac_factors.safetensors"
PCA_FILE = "projection/pca.safetensors"
FULL_COV_FILE = "covariance/full.safetensors"


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that determines a store's contents (serialised into the manifest to replay a run).

    ``rank_in`` / ``rank_out``: LoGra k_in / k_out (clamped to the layer's size). ``dense_dim``: output
    size of the ``dense`` projection. ``batch_size`` / ``token_budget``: how rows are grouped (never
    changes the rows). ``shard_rows``: rows per shard (the unit of resumption).
    """

    model: str = ""
    data: str = ""
    out: str = ""
    modules: str = "all"
    projection: str = "random"
    rank_in: int = 64
    rank_out: int = 64
    dense_dim: int = 8192
    seed: int = 0
    dtype: str = "float16"
    batch_size: int | None = None
    token_budget: int | None = None
    max_length: int | None = 512
    device: str = "auto"
    shard_rows: int = 1024
    chat: str = "auto"
    skip_nonfinite: bool = False
    transform: str | None = None

    def check(self) -> None:
        if self.projection not in KINDS:
            raise InputError(f"--projection must be one of {', '.join(KINDS)}, got {self.projection!r}")
        if self.dtype not in STORE_DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(STORE_DTYPES)}, got {self.dtype!r}")
        for name in ("rank_in", "rank_out", "dense_dim", "shard_rows"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.token_budget is not None and self.token_budget < 1:
            raise InputError(f"--token-budget must be >= 1, got {self.token_budget}")

    def replay_keys(self) -> dict:
        """The configuration that determines the rows (not where they go or how they are batched)."""
        d = asdict(self)
        for k in ("out", "batch_size", "token_budget", "device"):
            d.pop(k)
        return d


# --------------------------------------------------------------------------------------------------------
# Projections for a model


def build_projections(
    modules: Sequence[tuple[str, nn.Module]],
    kind: str,
    rank_in: int,
    rank_out: int,
    seed: int,
    pca_covariances: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, ModuleProjection]:
    """One `ModuleProjection` per watched module. ``dense`` hooks capture exact gradients (identity)."""
    out = {}
    for name, module in modules:
        d_in, d_out = layer_dims(module)
        if kind == "random":
            proj = random_projection(name, d_in, d_out, rank_in, rank_out, seed)
        elif kind in ("identity", "dense"):
            proj = identity_projection(name, d_in, d_out)
        elif kind == "pca":
            if pca_covariances is None:
                raise ValueError("pca projection needs the covariances of a first pass")
            cov_in, cov_out = pca_covariances[name]
            proj = pca_projection(name, cov_in, cov_out, rank_in, rank_out)
        else:
            raise InputError(f"unknown projection {kind!r}")
        check_projection(proj)
        out[name] = proj
    return out


def row_layout(modules: Sequence[tuple[str, nn.Module]], projections: dict[str, ModuleProjection], kind: str,
               dense_dim: int) -> list[dict]:
    """Module slices of a row, in module order (``dense``: one pseudo-module of ``dense_dim`` columns)."""
    if kind == "dense":
        return [{"name": "dense", "k_out": 1, "k_in": dense_dim, "offset": 0, "size": dense_dim, "layout": "out_in"}]
    layout, offset = [], 0
    for name, module in modules:
        p = projections[name]
        size = p.k_out * p.k_in
        layout.append({"name": name, "k_out": p.k_out, "k_in": p.k_in, "offset": offset, "size": size,
                       "layout": "out_in", "weight_layout": weight_layout(module), "d_in": p.d_in, "d_out": p.d_out})
        offset += size
    return layout


# --------------------------------------------------------------------------------------------------------
# The per-batch computation


@dataclass
class Extractor:
    """A model with hooks attached: `rows(batch)` returns the batch's projected per-example gradients.

    Weights are frozen for the duration (``requires_grad=False``) — only activation gradients are needed —
    and restored by `close`.
    """

    model: nn.Module
    modules: list[tuple[str, nn.Module]]
    projections: dict[str, ModuleProjection]
    device: torch.device
    kind: str = "random"
    dense_dim: int = 8192
    seed: int = 0
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    collect_covariance: bool = False
    covariance_only: bool = False
    hooks: GradientHooks = field(init=False)
    _saved_requires_grad: dict = field(init=False, default_factory=dict)
    _emb_handle: object = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.projections = {n: _to_device(p, self.device) for n, p in self.projections.items()}
        self.hooks = GradientHooks(self.modules, self.projections, collect_covariance=self.collect_covariance,
                                   covariance_only=self.covariance_only).attach()
        for n, p in self.model.named_parameters():
            self._saved_requires_grad[n] = p.requires_grad
            p.requires_grad_(False)
        self._emb_handle = enable_input_grads(self.model)

    def close(self) -> None:
        self.hooks.detach()
        if self._emb_handle is not None:
            self._emb_handle.remove()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._saved_requires_grad.get(n, True))

    def __enter__(self) -> "Extractor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, batch) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Forward + backward of the summed per-example loss; returns (rows [B, D] float32, losses [B])."""
        batch = batch.to(self.device)
        self.hooks.set_mask(batch.attention_mask)
        with torch.enable_grad():
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            losses = example_losses(logits, batch)
            # Sum (not mean) over examples: each example's δ is then exactly its own gradient.
            losses.sum().backward()
        if self.covariance_only:
            return None, losses.detach()
        rows = self.hooks.take_rows()
        if self.kind == "dense":
            if self.transform is not None:
                rows = self.transform(rows)
            rows = dense_project(rows, self.seed, self.dense_dim)
        return rows.float(), losses.detach()


def _to_device(p: ModuleProjection, device: torch.device) -> ModuleProjection:
    move = (lambda m: None if m is None else m.to(device))
    return ModuleProjection(p.name, p.d_in, p.d_out, move(p.p_in), move(p.p_out))


def encoded_rows_for(extractor: Extractor, encoded: Sequence[Encoded], pad_id: int, batch_size: int | None,
                     token_budget: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, losses and target-token counts for ``encoded``, in the given order (batches length-sorted)."""
    lengths = [len(e.input_ids) for e in encoded]
    plan = plan_batches(lengths, batch_size=batch_size, token_budget=token_budget,
                        sort_by_length=token_budget is not None)
    rows_out: np.ndarray | None = None
    losses = np.zeros(len(encoded), dtype=np.float64)
    for idx in plan:
        batch = collate([encoded[i] for i in idx], idx, pad_id)
        rows, loss = extractor.run(batch)
        if rows_out is None and rows is not None:
            rows_out = np.zeros((len(encoded), rows.shape[1]), dtype=np.float32)
        if rows is not None:
            rows_out[idx] = rows.cpu().numpy()
        losses[idx] = loss.cpu().double().numpy()
    tokens = np.array([e.n_targets for e in encoded], dtype=np.int64)
    return rows_out, losses, tokens


# --------------------------------------------------------------------------------------------------------
# Covariances


def covariance_sums(hooks: GradientHooks) -> dict[str, torch.Tensor]:
    """Per-module ``Σ a aᵀ`` and ``Σ s sᵀ`` accumulated by the hooks (float64, on CPU), then reset."""
    out = {}
    for name, cap in hooks.captures.items():
        if cap.cov_in is not None:
            out[f"{name}.A"] = cap.cov_in.cpu()
        if cap.cov_out is not None:
            out[f"{name}.S"] = cap.cov_out.cpu()
    hooks.reset_covariance()
    return out


def first_pass_covariances(model: nn.Module, modules, encoded, pad_id, device, batch_size, token_budget
                           ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, int]:
    """PCA first pass: full-size KFAC factors ``A = (1/T) Σ_t x xᵀ``, ``S = (1/N) Σ_n Σ_t δ δᵀ``."""
    projs = {n: identity_projection(n, *layer_dims(m)) for n, m in modules}
    with Extractor(model, list(modules), projs, device, kind="identity", collect_covariance=True,
                   covariance_only=True) as ex:
        encoded_rows_for(ex, encoded, pad_id, batch_size, token_budget)
        sums = covariance_sums(ex.hooks)
    n_tokens = sum(len(e.input_ids) for e in encoded)
    n_rows = len(encoded)
    return ({n: (sums[f"{n}.A"] / n_tokens, sums[f"{n}.S"] / n_rows) for n, _ in modules}, n_rows, n_tokens)


# --------------------------------------------------------------------------------------------------------
# The stage


def extract(config: ExtractConfig, *, model: nn.Module | None = None, tokenizer=None,
            encoded: Sequence[Encoded] | None = None, overwrite: bool = False,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None, progress: bool = True,
            stop_after_shards: int | None = None):
    """Build (or resume) a gradient store; returns the opened `dataworth.store.Store`.

    With only ``config``: loads ``config.model`` and ``config.data``. A ready ``model`` / ``tokenizer`` /
    ``encoded`` rows may be passed instead (custom models, tests). ``stop_after_shards`` stops early
    (tests of resumption).
    """
    from dataworth.store import StoreWriter, open_store

    config.check()
    if not config.out:
        raise InputError("--out is required")
    device = _device(config.device)
    fingerprint = None
    if model is None:
        from dataworth.models import load_model

        loaded = load_model(config.model, device=str(device))
        model, tokenizer, fingerprint = loaded.model, loaded.tokenizer, loaded.fingerprint
    else:
        model = model.to(device)
    model.eval()
    if fingerprint is None:
        from dataworth.models import model_fingerprint

        fingerprint = model_fingerprint(model)
    if encoded is None:
        from dataworth.data import encode_rows, load_rows

        rows = load_rows(config.data)
        encoded, report = encode_rows(rows, tokenizer, max_length=config.max_length, chat=config.chat)
        if report.truncated:
            _say(f"truncated {report.truncated} of {report.rows} rows to --max-length {config.max_length}")
        if report.no_targets:
            _say(f"{report.no_targets} rows have no target tokens (their gradient rows are zero)")
    if not encoded:
        raise InputError(f"{config.data or 'data'}: no rows to extract")
    from dataworth.data import data_fingerprint

    pad_id = _pad_id(tokenizer)
    modules = select_modules(model, config.modules)
    pca_cov = None
    pca_path = Path(config.out) / PCA_FILE
    header_projection = {"kind": config.projection, "seed": config.seed, "rank_in": config.rank_in,
                         "rank_out": config.rank_out}
    if config.projection == "dense":
        header_projection.update({"dense_dim": config.dense_dim, "transform": config.transform})
    header = {
        "projection": header_projection,
        "model": {"fingerprint": fingerprint, "path": config.model},
        "data": {"fingerprint": data_fingerprint(list(encoded)), "spec": config.data, "rows": len(encoded)},
        "config": config.replay_keys(),
    }
    if config.projection == "pca" and pca_path.exists() and not overwrite:
        pca_cov = _load_pca_covariances(pca_path, modules)
    elif config.projection == "pca":
        _say("pca: first pass over the data to collect the KFAC covariances")
        pca_cov, _, _ = first_pass_covariances(model, modules, list(encoded), pad_id, device,
                                               config.batch_size, config.token_budget)
    projections = build_projections(modules, config.projection, config.rank_in, config.rank_out, config.seed, pca_cov)
    layout = row_layout(modules, projections, config.projection, config.dense_dim)
    header["projection"]["digest"] = projection_digest(list(projections.values()))
    header["projection"]["modules"] = {m["name"]: [m.get("k_out"), m.get("k_in")] for m in layout}
    from dataworth.store import ModuleSpec

    specs = [ModuleSpec(m["name"], m["k_out"], m["k_in"], m["offset"], m["size"], m["layout"]) for m in layout]
    header["config"]["module_info"] = layout
    writer = StoreWriter(config.out, modules=specs, dtype=config.dtype, shard_rows=config.shard_rows,
                         header=header, overwrite=overwrite)
    if config.projection == "pca" and writer.done_shards == 0:
        writer.save_tensors(PCA_FILE, {f"{n}.A": a for n, (a, s) in pca_cov.items()}
                            | {f"{n}.S": s for n, (a, s) in pca_cov.items()})
    n = len(encoded)
    n_shards = math.ceil(n / config.shard_rows)
    dim = sum(s.size for s in specs)
    _print_plan(encoded, dim, config, n_shards, writer.done_shards, model)
    nonfinite: list[str] = []
    with Extractor(model, modules, projections, device, kind=config.projection, dense_dim=config.dense_dim,
                   seed=config.seed, transform=transform, collect_covariance=config.projection != "dense") as ex:
        bar = _progress(progress)
        with bar:
            task = bar.add_task("extract", total=sum(len(e.input_ids) for e in encoded))
            done_tokens = sum(len(e.input_ids) for e in encoded[: writer.done_shards * config.shard_rows])
            bar.update(task, completed=done_tokens)
            for shard in range(writer.done_shards, n_shards):
                lo, hi = shard * config.shard_rows, min(n, (shard + 1) * config.shard_rows)
                part = list(encoded[lo:hi])
                rows, losses, tokens = encoded_rows_for(ex, part, pad_id, config.batch_size, config.token_budget)
                bad = ~np.isfinite(rows).all(axis=1) | ~np.isfinite(losses)
                if bad.any():
                    names = [part[i].id for i in np.flatnonzero(bad)]
                    if not config.skip_nonfinite:
                        raise InputError(
                            f"non-finite gradient in rows {', '.join(names[:10])} (shard {shard}); "
                            "rerun with --skip-nonfinite to record them as zero rows"
                        )
                    rows[bad] = 0.0
                    nonfinite.extend(names)
                if config.projection != "dense":
                    writer.save_tensors(f"covariance/partial/{shard:05d}.safetensors", covariance_sums(ex.hooks))
                writer.write_shard(shard, rows, [e.id for e in part], losses, tokens)
                bar.update(task, advance=sum(len(e.input_ids) for e in part))
                if stop_after_shards is not None and shard + 1 >= stop_after_shards:
                    return None
    if nonfinite:
        _write_json_atomic(Path(config.out) / "nonfinite.json", {"ids": nonfinite})
    if config.projection != "dense":
        writer.save_tensors(KFAC_FILE, merge_covariance_partials(Path(config.out), modules, n_shards, encoded),
                            metadata={"n_rows": str(n), "n_tokens": str(sum(len(e.input_ids) for e in encoded))})
    if config.projection == "pca":
        writer.save_tensors(FULL_COV_FILE, {f"{k}.A": a for k, (a, _) in pca_cov.items()}
                            | {f"{k}.S": s for k, (_, s) in pca_cov.items()})
    writer.finalize()
    return open_store(config.out)


def merge_covariance_partials(root: Path, modules, n_shards: int, encoded) -> dict[str, torch.Tensor]:
    """``A = (1/T) Σ_shards Σ a aᵀ`` and ``S = (1/N) Σ_shards Σ s sᵀ`` from the per-shard sums, in shard order."""
    from safetensors.torch import load_file

    total: dict[str, torch.Tensor] = {}
    for shard in range(n_shards):
        part = load_file(str(root / f"covariance/partial/{shard:05d}.safetensors"))
        for k, v in part.items():
            total[k] = v.clone() if k not in total else total[k] + v
    n_tokens = sum(len(e.input_ids) for e in encoded)
    n_rows = len(encoded)
    return {k: (v / n_tokens if k.endswith(".A") else v / n_rows) for k, v in total.items()}


def _load_pca_covariances(path: Path, modules) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from safetensors.torch import load_file

    t = load_file(str(path))
    return {n: (t[f"{n}.A"], t[f"{n}.S"]) for n, _ in modules}


# --------------------------------------------------------------------------------------------------------
# Queries


def store_extractor(store, model: nn.Module, device: torch.device | str = "cpu") -> Extractor:
    """An `Extractor` that reproduces ``store``'s projection and modules on ``model`` (for query rows)."""
    proj = store.manifest["projection"]
    cfg = store.manifest["config"]
    kind = proj["kind"]
    modules = select_modules(model, cfg["modules"])
    names = [n for n, _ in modules]
    stored = [m["name"] for m in cfg.get("module_info", [])]
    if kind != "dense" and names != stored:
        raise InputError(f"store {store.path}: modules {stored[:3]}... do not match the model's {names[:3]}...")
    pca_cov = _load_pca_covariances(Path(store.path) / PCA_FILE, modules) if kind == "pca" else None
    projections = build_projections(modules, kind, proj["rank_in"], proj["rank_out"], proj["seed"], pca_cov)
    if projection_digest(list(projections.values())) != proj.get("digest"):
        raise InputError(f"store {store.path}: regenerated projection differs from the stored digest "
                         "(different torch version or model?)")
    return Extractor(model, modules, projections, torch.device(device), kind=kind,
                     dense_dim=proj.get("dense_dim") or cfg.get("dense_dim", 8192), seed=proj["seed"])


def token_contributions(store, model: nn.Module, tokenizer, encoded: Sequence[Encoded],
                        preconditioned: np.ndarray) -> list[np.ndarray]:
    """Exact per-token split of influence: for each training row n, ``[Q, T_n]`` contributions.

    ``s(q, n) = Σ_t Σ_m ⟨Q_{q,m}, s_{t,m} a_{t,m}ᵀ⟩`` with ``Q_{q,m}`` the preconditioned query
    ``(F+λI)⁻¹ĝ_q`` of module m reshaped to ``k_out × k_in`` (DESIGN.md, per-token attribution); token t's
    share is the inner sum. Summing a row's contributions gives its score. Recomputed only for the rows
    asked (e.g. the top-k shown in a report). Not available for the ``dense`` projection.
    """
    if store.manifest["projection"]["kind"] == "dense":
        raise InputError(f"store {store.path}: per-token attribution needs a LoGra store, not --projection dense")
    q = torch.as_tensor(np.asarray(preconditioned, dtype=np.float32))
    device = next(model.parameters()).device
    out = []
    with store_extractor(store, model, device) as ex:
        ex.hooks.keep_tokens = True
        for e in encoded:
            ex.run(collate([e], [0], _pad_id(tokenizer)))
            contrib = torch.zeros(q.shape[0], len(e.input_ids))
            for spec in store.modules:
                cap = ex.hooks.captures[spec.name]
                qm = q[:, spec.offset:spec.offset + spec.size].reshape(-1, spec.k_out, spec.k_in).to(device)
                contrib += torch.einsum("to,qoi,ti->qt", cap.token_grads[0], qm, cap.token_acts[0]).cpu()
                cap.token_acts = cap.token_grads = None
            out.append(contrib.numpy())
    return out


def query_gradients(store, model: nn.Module, tokenizer, rows, *, max_length: int | None = None,
                    batch_size: int | None = 8, chat: str = "auto") -> np.ndarray:
    """Projected gradient rows ``[Q, D]`` (float32) of query rows, in the store's layout, not written anywhere.

    ``rows``: `dataworth.data.Row`s (prompt/response: the measurement is the response's summed loss) or
    `Encoded` rows.
    """
    from dataworth.data import encode_rows

    if rows and not isinstance(rows[0], Encoded):
        cfg = store.manifest["config"]
        encoded, _ = encode_rows(rows, tokenizer, max_length=max_length or cfg.get("max_length"), chat=chat)
    else:
        encoded = list(rows)
    device = next(model.parameters()).device
    with store_extractor(store, model, device) as ex:
        out, _, _ = encoded_rows_for(ex, encoded, _pad_id(tokenizer), batch_size, None)
    return out


# --------------------------------------------------------------------------------------------------------
# Small helpers


def _write_json_atomic(path: Path, value) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(spec)
    except RuntimeError as exc:
        raise InputError(f"--device {spec!r}: {exc}") from None


def _pad_id(tokenizer) -> int:
    if tokenizer is None:
        return 0
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _print_plan(encoded, dim: int, config: ExtractConfig, n_shards: int, done: int, model: nn.Module) -> None:
    """Before a long run: rows, tokens, store size on disk, a rough peak-memory estimate."""
    rows = len(encoded)
    tokens = sum(len(e.input_ids) for e in encoded)
    itemsize = 4 if config.dtype == "float32" else 2
    size = rows * dim * itemsize
    params = sum(p.numel() for p in model.parameters())
    longest = max(len(e.input_ids) for e in encoded)
    batch = config.token_budget or (config.batch_size or 8) * longest
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0) or 0
    peak = params * 4 + batch * vocab * 4 * 3 + (config.batch_size or 8) * dim * 4
    _say(f"plan: {rows} rows, {tokens} tokens, {dim} dims/row ({config.dtype}), store {_human(size)} in "
         f"{n_shards} shards ({done} already done), est. peak memory {_human(peak)}")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _progress(enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    class TokensPerSecond(TextColumn):
        def __init__(self):
            super().__init__("")

        def render(self, task):
            speed = task.finished_speed or task.speed
            from rich.text import Text

            return Text(f"{speed:,.0f} tok/s" if speed else "", style="cyan")

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} tok"),
                    TokensPerSecond(), TimeRemainingColumn(), disable=not enabled, transient=False,
                    console=_stderr_console())


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)
