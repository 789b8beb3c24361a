"""Curvature in the projected gradient space: fit once per store, then precondition query rows with it.

Why a module of its own: influence functions need ``(F + λI)⁻¹ ĝ`` where ``F`` approximates the Hessian
of the training loss. LoGra (Choe et al. 2024, "What is Your Data Worth to GPT? LLM-Scale Data Valuation
with Influence Functions", §3) shows that in the *projected* space (``k_out × k_in`` per module) ``F`` is
small enough to fit exactly or with a Kronecker factorisation, block-diagonal across modules. Fitting is a
streaming pass over the store (never the model); preconditioning is a handful of small matrix products.

Layout (the store contract, docs/design.md "Store on disk"): a row is the concatenation over modules of
``Ĝ`` (``k_out × k_in``) flattened ROW-MAJOR, so the vector index of ``Ĝ[o, i]`` is ``o * k_in + i``.
In that ordering ``vec(s aᵀ) = s ⊗ a`` and the KFAC approximation is ``F ≈ S ⊗ A`` (``S`` outer).
Modules stored ``in_out`` (``Ĝᵀ``, HF Conv1D) are transposed back to ``Ĝ`` before the Kronecker algebra.

Per module ``m`` (``N`` store rows ``ĝ_n``, ``D_m = k_out · k_in``):

- ``none``  — ``F = 0`` and ``λ = 0``: the preconditioner is the identity (plain gradient dot product,
  TracIn at one checkpoint). The damping argument is validated but not used.
- ``raw``   — ``F = (1/N) Σ_n vec(Ĝ_n) vec(Ĝ_n)ᵀ`` (``D_m × D_m``), the exact empirical Fisher of the
  projected gradients, accumulated in float64 over store blocks and eigendecomposed in float64:
  ``F = V diag(e) Vᵀ`` → ``(F + λI)⁻¹ g = V [(Vᵀ g) ⊘ (e + λ)]``. When the store has fewer rows than the
  module has columns (``N < D_m``, a LoGra-64 block is 4096 wide), ``F`` has rank ≤ N and is fitted *thin*
  instead: the SVD ``G = U diag(σ) Vᵀ`` of the module's ``[N, D_m]`` rows gives ``V`` (``D_m × N``) and
  ``e = σ²/N``; the other ``D_m − N`` eigenvalues are exactly 0, so
  ``(F + λI)⁻¹ g = V [(Vᵀ g) ⊘ (e + λ)] + (g − V Vᵀ g) / λ`` — the same operator in ``N·D_m`` floats
  instead of ``D_m²`` (90 SmolLM2 MLP blocks at rank 64: 12 GB of float64 Fisher blocks → the rows
  themselves). Single process only (distributed ranks hold only their rows: the full form is used).
- ``kfac``  — ``F ≈ S ⊗ A`` with ``A = (1/T) Σ_tokens a aᵀ`` (``a = P_in x_t``, ``k_in × k_in``) and
  ``S = (1/N) Σ_n Σ_t s sᵀ`` (``s = P_out δ_t``, ``k_out × k_out``), written by extraction to
  ``curvature/kfac_factors.safetensors``. With ``S = Q_S diag(e_S) Q_Sᵀ``, ``A = Q_A diag(e_A) Q_Aᵀ``:
  ``(S ⊗ A + λI)⁻¹ vec(G) = vec(Q_S [(Q_Sᵀ G Q_A) ⊘ (e_S e_Aᵀ + λ)] Q_Aᵀ)`` (Martens & Grosse 2015).
- ``ekfac`` — the KFAC eigenbasis with the eigenvalues re-fitted from the stored rows (George et al. 2018,
  "Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis"; Grosse et al. 2023,
  "Studying Large Language Model Generalization with Influence Functions", §2.2.3):
  ``Λ[o, i] = (1/N) Σ_n (Q_Sᵀ Ĝ_n Q_A)[o, i]²`` (one streaming pass, no model run), then
  ``(F + λI)⁻¹ vec(G) = vec(Q_S [(Q_Sᵀ G Q_A) ⊘ (Λ + λ)] Q_Aᵀ)``.

Damping ``λ > 0`` is per module: an explicit float (the same for every module), a fraction ``f`` of the mean
eigenvalue of that module's curvature (``--damping 1e-3x``), or ``auto`` = ``AUTO_DAMPING_FRACTION ×`` that
mean (``mean(e)`` for raw, ``mean(e_S)·mean(e_A)`` for kfac, ``mean(Λ)`` for ekfac). A module whose curvature
is exactly zero (all its gradients are zero) gets ``λ = 1`` under a relative damping — any positive value
gives the same influence there, because its training rows are zero.
The value used for each module is recorded in the saved file and in ``Curvature.damping``.

Saved as ``curvature/{kind}.safetensors`` in the store: float64 tensors per module (``{m}.eigvecs``,
``{m}.eigvals`` for raw; ``{m}.Q_S``, ``{m}.e_S``, ``{m}.Q_A``, ``{m}.e_A`` for kfac; ``{m}.Q_S``, ``{m}.Q_A``,
``{m}.eigvals`` (= ``Λ``) for ekfac; ``{m}.damping`` (shape ``[1]``) for all) and a ``dataworth`` metadata
entry holding a JSON string (kind, damping spec, per-module damping values, rows fitted on).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from dataworth.distributed import (
    SINGLE,
    DistContext,
    all_reduce_arrays,
    all_reduce_count,
    barrier,
    check_agreement,
    init_distributed,
    iter_owned_blocks,
    raise_together,
)
from dataworth.errors import InputError
from dataworth.store.format import KFAC_FILE
from dataworth.store.reader import PREFETCH_OVERHEAD_BYTES, open_store
from dataworth.util import (
    acquire_directory_lock,
    finite_number,
    release_directory_lock,
    say,
)

CURVATURE_KINDS = ("none", "raw", "kfac", "ekfac")

# EKFAC by default: it scales to any module size (raw needs D_m² floats per module) and is the better fit.
DEFAULT_CURVATURE = "ekfac"
CURVATURE_FORMAT_VERSION = 1
# auto = 1e-4 × each module's mean eigenvalue. Measured (README "Real text"): on stdlib docstrings × GPT-2 the
# LDS of LoGra-64 EK-FAC rises 0.201 → 0.243 from 0.1× to 1e-4× (exact EK-FAC 0.260 → 0.289), and on
# builtin:bios the demo's EK-FAC recall@10 0.929 → 0.996 (MRR 0.755 → 0.870). A tiny absolute λ (1e-8) is no
# better for LoGra-64 (0.242) and a little better for exact gradients (0.297): a training row has no component
# in the null space of the curvature fitted on it, so λ → 0 is safe; a relative λ keeps each module's scale.
AUTO_DAMPING_FRACTION = 1e-4
ZERO_CURVATURE_DAMPING = 1.0

# A raw Fisher block is D_m × D_m float64: 8192² × 8 B = 512 MiB. Beyond that use kfac/ekfac.
RAW_MAX_MODULE_SIZE = 8192
DEFAULT_BLOCK_ROWS = 1024
# Without --memory-budget, blocks are also capped at this many MiB of buffers: 1024 rows of exact gradients
# of a 0.7 M-parameter GPT-2 are 1.6 GB per buffer (two are held while the next block is read ahead). 128
# rather than 512: on the real-text benchmark the same CPU time (exact EK-FAC 41.3 vs 41.7 s; LoGra-64
# 10.8 vs 11.6 s) at 190–250 MiB less peak memory (measured 2026-12-07).
DEFAULT_FIT_BUDGET_MB = 128


def curvature_file(kind: str) -> str:
    """Store-relative name of a fitted curvature: ``curvature/{kind}.safetensors``."""
    return f"curvature/{kind}.safetensors"


@dataclass(frozen=True)
class DampingSpec:
    """Damping as asked for: an absolute ``value`` (a float > 0, the same for every module) or a ``fraction`` of
    each module's mean eigenvalue (``'1e-3x'``); ``auto`` is the fraction `AUTO_DAMPING_FRACTION`."""

    value: float | None = None
    fraction: float | None = None

    @property
    def is_auto(self) -> bool:
        return self.value is None and self.fraction is None

    @property
    def relative(self) -> float:
        """The fraction of the mean eigenvalue used (auto's when none was given)."""
        return AUTO_DAMPING_FRACTION if self.fraction is None else self.fraction

    def to_json(self) -> str | float:
        return str(self) if self.value is None else self.value

    def __str__(self) -> str:
        if self.value is not None:
            return repr(self.value)
        return "auto" if self.fraction is None else f"{self.fraction!r}x"


DAMPING_HELP = (f"λ: 'auto' (= {AUTO_DAMPING_FRACTION!r}x), a fraction of each module's mean eigenvalue ('1e-3x'), "
                "or an absolute number > 0.")


def parse_damping(damping: "str | float | int | DampingSpec | None", flag: str = "--damping") -> DampingSpec:
    """``'auto'`` / ``None`` → auto; ``'<f>x'`` → ``f ×`` mean eigenvalue; a number (or its text) > 0 → that
    absolute value; anything else → InputError."""
    if isinstance(damping, DampingSpec):
        return damping
    text = damping.strip().lower() if isinstance(damping, str) else None
    if damping is None or text == "auto":
        return DampingSpec()
    relative = text is not None and text.endswith("x")
    try:
        value = float(text[:-1] if relative else damping)
    except (TypeError, ValueError):
        raise InputError(f"{flag}: expected 'auto', a fraction of the mean eigenvalue like '1e-3x', or a number > 0, "
                         f"got {damping!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{flag}: damping must be finite and > 0 ('auto', '1e-3x' or a number), got {damping!r}")
    return DampingSpec(fraction=value) if relative else DampingSpec(value)


def check_kind(kind: str, flag: str = "--curvature") -> str:
    """Validate a curvature kind name."""
    if kind not in CURVATURE_KINDS:
        raise InputError(f"{flag}: unknown curvature {kind!r}; choose one of {', '.join(CURVATURE_KINDS)}")
    return kind


@dataclass(frozen=True, eq=False)
class ModuleCurvature:
    """The fitted curvature of one module (one diagonal block of ``F``), float64 arrays.

    ``eigvecs``/``eigvals`` (``[D_m, D_m]``/``[D_m]``) for raw; ``q_s`` (``k_out × k_out``), ``q_a``
    (``k_in × k_in``) and ``eigvals`` (``k_out × k_in``: ``e_S e_Aᵀ`` for kfac, ``Λ`` for ekfac) for the
    Kronecker kinds; ``e_s``/``e_a`` kept for kfac. Nothing for none.
    """

    name: str
    k_out: int
    k_in: int
    offset: int
    damping: float
    layout: str = "out_in"
    eigvecs: np.ndarray | None = None
    eigvals: np.ndarray | None = None
    q_s: np.ndarray | None = None
    q_a: np.ndarray | None = None
    e_s: np.ndarray | None = None
    e_a: np.ndarray | None = None

    @property
    def size(self) -> int:
        return self.k_out * self.k_in

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.size)

    @property
    def mean_eigenvalue(self) -> float:
        """Mean over all ``D_m`` eigenvalues (a thin raw basis leaves out exact zeros, so: sum / D_m)."""
        if self.eigvals is None:
            return 0.0
        if self.eigvecs is not None:
            return float(np.sum(self.eigvals)) / self.size
        return float(np.mean(self.eigvals))

    @property
    def thin(self) -> bool:
        """A raw basis of fewer than ``D_m`` eigenvectors (the rest have eigenvalue exactly 0)."""
        return self.eigvecs is not None and self.eigvecs.shape[1] < self.size


@dataclass(frozen=True, eq=False)
class Curvature:
    """A fitted, damped curvature for a store: block-diagonal ``(F + λI)⁻¹`` across ``modules``.

    ``precondition(rows)`` maps query rows ``[Q, D]`` to ``(F + λI)⁻¹`` applied per module, ``[Q, D]``
    float32 (float64 inside). ``damping`` maps module name → the ``λ`` used.
    """

    kind: str
    damping_spec: DampingSpec
    modules: tuple[ModuleCurvature, ...]
    dim: int
    n_rows: int
    fit_seconds: float = 0.0
    path: Path | None = None

    @property
    def damping(self) -> dict[str, float]:
        return {m.name: m.damping for m in self.modules}

    def precondition(self, rows: np.ndarray) -> np.ndarray:
        """``[Q, D]`` rows → ``[Q, D]`` float32 rows ``(F_m + λ_m I)⁻¹ ĝ[:, cols_m]`` for every module ``m``."""
        return self.precondition64(rows).astype(np.float32)

    def precondition64(self, rows: np.ndarray) -> np.ndarray:
        """Same as :meth:`precondition` but returns float64 (used for self-influence)."""
        rows = _check_rows(rows, self.dim)
        out = np.array(rows, dtype=np.float64, copy=True)
        if self.kind == "none":
            return out
        for m in self.modules:
            out[:, m.columns] = precondition_module(self.kind, m, out[:, m.columns])
        return out

    def self_inner(self, rows: np.ndarray) -> np.ndarray:
        """``ĝᵀ (F + λI)⁻¹ ĝ`` per row: ``[B, D]`` → ``[B]`` float64 (the self-influence).

        Uses half the work of :meth:`precondition`: in the eigenbasis it is ``Σ_j (Vᵀ ĝ)_j² / (e_j + λ)``
        (raw) or ``Σ_{o,i} (Q_Sᵀ Ĝ Q_A)[o,i]² / (eigvals[o,i] + λ)`` (kfac/ekfac), summed over modules.
        """
        rows = np.asarray(_check_rows(rows, self.dim), dtype=np.float64)
        if self.kind == "none":
            return np.einsum("bd,bd->b", rows, rows)
        total = np.zeros(rows.shape[0])
        for m in self.modules:
            g = rows[:, m.columns]
            if self.kind == "raw":
                coeffs = g @ m.eigvecs
                total += (coeffs * coeffs / (m.eigvals + m.damping)).sum(axis=1)
                if m.thin:  # the null space of F: eigenvalue 0, so 1/λ times the part of g outside V
                    total += np.maximum((g * g).sum(axis=1) - (coeffs * coeffs).sum(axis=1), 0.0) / m.damping
            else:
                rotated = m.q_s.T @ as_matrices(g, m) @ m.q_a
                total += (rotated * rotated / (m.eigvals + m.damping)).sum(axis=(1, 2))
        return total

    def metadata(self) -> dict:
        """The JSON-able description saved beside the tensors and reported by ``score``."""
        return {
            "format": "dataworth-curvature",
            "version": CURVATURE_FORMAT_VERSION,
            "kind": self.kind,
            "damping": self.damping_spec.to_json(),
            "damping_values": self.damping,
            "n_rows": self.n_rows,
            "dim": self.dim,
            "modules": [{"name": m.name, "k_out": m.k_out, "k_in": m.k_in, "offset": m.offset, "layout": m.layout}
                        for m in self.modules],
            "fit_seconds": self.fit_seconds,
        }


def as_matrices(columns: np.ndarray, m) -> np.ndarray:
    """A module's columns ``[B, D_m]`` as ``Ĝ`` ``[B, k_out, k_in]`` (``layout="in_out"`` stores ``Ĝᵀ``)."""
    if m.layout == "in_out":
        return columns.reshape(-1, m.k_in, m.k_out).transpose(0, 2, 1)
    return columns.reshape(-1, m.k_out, m.k_in)


def from_matrices(grads: np.ndarray, m) -> np.ndarray:
    """Inverse of :func:`as_matrices`: ``[B, k_out, k_in]`` → the module's columns ``[B, D_m]``."""
    if m.layout == "in_out":
        grads = grads.transpose(0, 2, 1)
    return np.ascontiguousarray(grads).reshape(-1, m.k_out * m.k_in)


def sandwich(left: np.ndarray, grads: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``left @ G_b @ right`` for every ``G_b`` of ``grads`` ``[B, a, b]``, float64, ``[B, d, c]``.

    Two folded GEMMs (``[B·a, b] @ right``, then ``left @ [a, B·c]``) in torch: numpy's stacked matmul runs
    one small GEMM per matrix, which made the EK-FAC eigenvalue refit of exact gradients 2–3× slower.
    Float64 throughout (the same sums as the stacked form, to round-off).
    """
    g = torch.from_numpy(np.ascontiguousarray(grads, dtype=np.float64))
    batch, a, b = g.shape
    x = (g.reshape(batch * a, b) @ torch.from_numpy(np.ascontiguousarray(right))).reshape(batch, a, -1)
    del g
    c = x.shape[2]
    x = x.transpose(0, 1).reshape(a, batch * c)  # one copy: [a, B·c]
    y = torch.from_numpy(np.ascontiguousarray(left)) @ x
    del x
    return y.reshape(-1, batch, c).transpose(0, 1).numpy()


def _check_rows(rows: np.ndarray, dim: int) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != dim:
        raise ValueError(f"expected rows of shape [Q, {dim}], got {tuple(rows.shape)}")
    return rows


def precondition_module(kind: str, m: ModuleCurvature, g: np.ndarray) -> np.ndarray:
    """``(F_m + λ I)⁻¹`` applied to ``g`` (``[Q, D_m]`` float64) in the module's eigenbasis.

    raw: ``V [(Vᵀ g) ⊘ (e + λ)]`` (thin ``V``: ``+ (g − V Vᵀ g) / λ``); kfac/ekfac:
    ``Q_S [(Q_Sᵀ G Q_A) ⊘ (eigvals + λ)] Q_Aᵀ`` with ``G = g.reshape(Q, k_out, k_in)`` (row-major, matching
    the store layout).
    """
    if kind == "raw":
        coeffs = g @ m.eigvecs
        if m.thin:
            outside = g - coeffs @ m.eigvecs.T
            return (coeffs / (m.eigvals + m.damping)) @ m.eigvecs.T + outside / m.damping
        coeffs /= m.eigvals + m.damping
        return coeffs @ m.eigvecs.T
    if kind in ("kfac", "ekfac"):
        rotated = sandwich(m.q_s.T, as_matrices(g, m), m.q_a)
        rotated /= m.eigvals + m.damping
        return from_matrices(sandwich(m.q_s, rotated, m.q_a.T), m)
    raise ValueError(f"no preconditioner for curvature kind {kind!r}")


def dense_curvature(kind: str, m: ModuleCurvature) -> np.ndarray:
    """The explicit ``D_m × D_m`` matrix ``F_m`` the fitted factors represent (reference; small modules only).

    raw: ``V diag(e) Vᵀ``; kfac/ekfac: ``(Q_S ⊗ Q_A) diag(vec(eigvals)) (Q_S ⊗ Q_A)ᵀ`` (for kfac that is
    exactly ``S ⊗ A``); none: zeros. For ``layout="in_out"`` modules the column order is ``i * k_out + o``,
    so the Kronecker factors swap: ``(Q_A ⊗ Q_S) diag(vec(eigvalsᵀ)) (Q_A ⊗ Q_S)ᵀ``.
    """
    if kind == "none":
        return np.zeros((m.size, m.size))
    if kind == "raw":
        return (m.eigvecs * m.eigvals) @ m.eigvecs.T
    if m.layout == "in_out":
        basis, vals = np.kron(m.q_a, m.q_s), m.eigvals.T.reshape(-1)
    else:
        basis, vals = np.kron(m.q_s, m.q_a), m.eigvals.reshape(-1)
    return (basis * vals) @ basis.T


def precondition_reference(curvature: Curvature, rows: np.ndarray) -> np.ndarray:
    """Reference ``(F + λI)⁻¹ g`` per module with an explicit dense inverse: ``np.linalg.inv(F_m + λ_m I)``."""
    rows = np.asarray(_check_rows(rows, curvature.dim), dtype=np.float64)
    out = rows.copy()
    if curvature.kind == "none":
        return out
    for m in curvature.modules:
        dense = dense_curvature(curvature.kind, m) + m.damping * np.eye(m.size)
        out[:, m.columns] = rows[:, m.columns] @ np.linalg.inv(dense).T
    return out


def eigh_psd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigendecomposition of a symmetric PSD matrix in float64: ``(eigvals ≥ 0, eigvecs)`` (columns).

    The matrix is symmetrised first; round-off can make tiny eigenvalues negative, and a second-moment
    matrix has none, so they are clipped to 0 (the damping keeps the inverse finite).
    """
    sym = torch.from_numpy(np.asarray(matrix, dtype=np.float64))
    sym = (sym + sym.T) / 2
    vals, vecs = torch.linalg.eigh(sym)
    return vals.clamp_min(0).numpy(), vecs.numpy()


def resolve_damping(spec: DampingSpec, mean_eigenvalue: float) -> float:
    """``λ`` for one module: the explicit value, or the spec's fraction × mean eigenvalue (``1.0`` if that is
    0)."""
    if spec.value is not None:
        return float(spec.value)
    relative = spec.relative * float(mean_eigenvalue)
    return relative if relative > 0 else ZERO_CURVATURE_DAMPING


def second_moments(blocks: Iterable[np.ndarray], modules: Sequence, ctx: DistContext = SINGLE, *,
                   keep=None) -> tuple[list[np.ndarray], int]:
    """``(1/N) Σ_n vec(Ĝ_n) vec(Ĝ_n)ᵀ`` per module (``[D_m, D_m]`` float64) from row blocks, and ``N``.

    Distributed (``ctx``): each rank's blocks are its own rows; the sums and ``N`` are all-reduced before
    the division, so every rank gets the moments of the whole store. ``keep(first_row, block)`` sees every
    block before it is released (the thin raw fit copies its modules' columns out)."""
    sums = [np.zeros((m.size, m.size)) for m in modules]
    n = 0
    for block in blocks:
        block = np.asarray(block)
        if keep is not None:
            keep(n, block)
        n += block.shape[0]
        for acc, m in zip(sums, modules):
            g = block[:, m.offset : m.offset + m.size].astype(np.float64)
            acc += g.T @ g
            del g
        del block  # before the next block is read: one block alive at a time (memory budget)
    sums, n = all_reduce_arrays(ctx, sums), all_reduce_count(ctx, n)
    if n == 0:
        raise InputError("store has no rows: nothing to fit curvature on")
    return [s / n for s in sums], n


def kronecker_eigenvalue_fit(
    blocks: Iterable[np.ndarray], modules: Sequence, bases: Sequence[tuple[np.ndarray, np.ndarray]],
    ctx: DistContext = SINGLE,
) -> tuple[list[np.ndarray], int]:
    """EKFAC eigenvalues ``Λ[o, i] = (1/N) Σ_n (Q_Sᵀ Ĝ_n Q_A)[o, i]²`` per module, from row blocks, and ``N``
    (sums and ``N`` all-reduced over ranks, as in `second_moments`)."""
    sums = [np.zeros((m.k_out, m.k_in)) for m in modules]
    n = 0
    for block in blocks:
        block = np.asarray(block)
        n += block.shape[0]
        for acc, m, (q_s, q_a) in zip(sums, modules, bases):
            grads = as_matrices(block[:, m.offset : m.offset + m.size].astype(np.float64), m)
            rotated = sandwich(q_s.T, grads, q_a)
            del grads
            acc += np.square(rotated).sum(axis=0)
            del rotated
        del block  # one block alive at a time (memory budget)
    sums, n = all_reduce_arrays(ctx, sums), all_reduce_count(ctx, n)
    if n == 0:
        raise InputError("store has no rows: nothing to fit curvature on")
    return [s / n for s in sums], n


def _row_blocks(store, block_rows: int, ctx: DistContext = SINGLE) -> Iterator[np.ndarray]:
    """Store rows in order, ``[B, D]`` float32 blocks (callers upcast per module); only this rank's shards."""
    for _start, block in iter_owned_blocks(store, block_rows, ctx, reuse=True):
        yield block  # valid until the next one: every consumer folds it into sums first


def check_memory_budget(memory_budget_mb: float) -> float:
    """``--memory-budget`` as a finite number of MiB > 0 (NaN or inf cannot size a block; both were a
    ``cannot convert float NaN to integer`` traceback)."""
    budget = finite_number(memory_budget_mb, "--memory-budget")
    if budget <= 0:
        raise InputError(f"--memory-budget: must be > 0 MiB, got {memory_budget_mb}")
    return budget


def fit_block_rows(memory_budget_mb: float, store, kind: str) -> int:
    """Rows per block so that one block's buffers fit in ``memory_budget_mb`` MiB while fitting ``kind``.

    Accounted per row (bytes): ``8·D`` (two float32 blocks: the current one and the next, read ahead by
    ``Store.iter_row_ranges``) + ``2s·D`` (the two float16 / bfloat16 blocks as read, before widening:
    ``s`` = 2; float32 rows are read straight into the blocks) + ``32·D_max`` (float64 upcast of the largest module
    and, for ekfac, the rotated ``Q_Sᵀ Ĝ Q_A`` products and their squares). Fixed, whatever the store size,
    and taken off the budget first: the reader's ``PREFETCH_OVERHEAD_BYTES`` and three float64 copies of the accumulators (``Σ_m D_m²``
    for raw, ``Σ_m k_out·k_in`` plus the eigenbases for ekfac). Too small for the fixed part plus one row →
    InputError naming ``--memory-budget`` and the minimum.
    """
    d_max = max((m.size for m in store.modules), default=store.dim)
    per_row = (8 + (4 if store.dtype != "float32" else 0)) * store.dim + 32 * d_max
    fixed = PREFETCH_OVERHEAD_BYTES
    if kind == "raw":  # full blocks: D_m² accumulators; thin ones: the module's N rows (float32) + their SVD
        thin = thin_raw_modules(store)
        fixed += sum(3 * 8 * m.size * m.size if m.name not in thin else 4 * store.rows * m.size
                     for m in store.modules)
        fixed += max((3 * 8 * store.rows * m.size for m in store.modules if m.name in thin), default=0)
    elif kind == "ekfac":
        fixed += 3 * 8 * sum(m.size + m.k_out * m.k_out + m.k_in * m.k_in for m in store.modules)
    rows = int((check_memory_budget(memory_budget_mb) * 2**20 - fixed) // per_row)
    if rows < 1:
        raise InputError(f"--memory-budget {memory_budget_mb} MiB is too small to fit {kind} on rows of "
                         f"{store.dim} columns; at least {(fixed + per_row) / 2**20:.3f} MiB is needed")
    return rows


def _check_module_sizes(kind: str, modules: Sequence) -> None:
    if kind != "raw":
        return
    for m in modules:
        if m.size > RAW_MAX_MODULE_SIZE:
            raise InputError(
                f"--curvature raw: module {m.name} has {m.size} = {m.k_out}×{m.k_in} columns; a raw Fisher block "
                f"over {RAW_MAX_MODULE_SIZE} columns is too large, use --curvature kfac or ekfac"
            )


def load_kfac_factors(store) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{module: (S [k_out, k_out], A [k_in, k_in])}`` float64 from ``curvature/kfac_factors.safetensors``."""
    if not store.has(KFAC_FILE):
        raise InputError(
            f"{store.path}: store lacks KFAC factors ({KFAC_FILE}; extraction writes them for every projection "
            "but dense); use --curvature raw or none"
        )
    tensors = store.load_tensors(KFAC_FILE)
    factors = {}
    for m in store.modules:
        try:
            s, a = tensors[f"{m.name}.S"], tensors[f"{m.name}.A"]
        except KeyError as exc:
            raise InputError(f"{store.path / KFAC_FILE}: missing tensor {exc.args[0]!r}") from None
        if s.shape != (m.k_out, m.k_out) or a.shape != (m.k_in, m.k_in):
            raise InputError(
                f"{store.path / KFAC_FILE}: module {m.name}: S is {tuple(s.shape)} and A is {tuple(a.shape)}, "
                f"expected ({m.k_out}, {m.k_out}) and ({m.k_in}, {m.k_in})"
            )
        factors[m.name] = (s.double().numpy(), a.double().numpy())
    return factors


def fit_none(store, spec: DampingSpec) -> list[ModuleCurvature]:
    """Identity curvature: no factors, ``λ = 0`` (the preconditioner is the identity)."""
    return [ModuleCurvature(m.name, m.k_out, m.k_in, m.offset, 0.0, m.layout) for m in store.modules]


def thin_raw_modules(store, ctx: DistContext = SINGLE) -> set[str]:
    """Modules whose raw Fisher is fitted thin (module docstring): more columns than the store has rows,
    in a single process."""
    if ctx.active:
        return set()
    return {m.name for m in store.modules if store.rows < m.size}


def fit_raw(store, spec: DampingSpec, block_rows: int = DEFAULT_BLOCK_ROWS, ctx: DistContext = SINGLE
            ) -> list[ModuleCurvature]:
    """Exact projected empirical Fisher per module, ``F = (1/N) Σ_n ĝ_n ĝ_nᵀ``, eigendecomposed (float64);
    thin (SVD of the module's rows) where ``N < D_m`` (`thin_raw_modules`)."""
    thin = thin_raw_modules(store, ctx)
    full = [m for m in store.modules if m.name not in thin]
    _check_module_sizes("raw", full)
    rows = {m.name: np.empty((store.rows, m.size), dtype=np.float32) for m in store.modules if m.name in thin}
    moments, _n = second_moments(_row_blocks(store, block_rows, ctx), full, ctx,
                                 keep=lambda start, block: _keep_columns(rows, store.modules, start, block))
    fitted_full = dict(zip((m.name for m in full), moments))
    fitted = []
    for m in store.modules:
        if m.name in thin:
            vals, vecs = thin_eigh(rows.pop(m.name))
            mean = float(vals.sum()) / m.size
        else:
            vals, vecs = eigh_psd(fitted_full.pop(m.name))
            mean = float(vals.mean())
        damping = resolve_damping(spec, mean)
        fitted.append(ModuleCurvature(m.name, m.k_out, m.k_in, m.offset, damping, m.layout, eigvecs=vecs, eigvals=vals))
    return fitted


def _keep_columns(rows: dict[str, np.ndarray], modules: Sequence, start: int, block: np.ndarray) -> None:
    for m in modules:
        if m.name in rows:
            rows[m.name][start:start + block.shape[0]] = block[:, m.offset:m.offset + m.size]


def thin_eigh(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of ``F = GᵀG / N`` from ``G`` (``[N, D]``, N < D) without forming ``F``: the thin SVD
    ``G = U diag(σ) Vᵀ`` in float64 gives ``(σ²/N, V)`` (``[N]``, ``[D, N]``), ascending like `eigh_psd`."""
    g = torch.from_numpy(np.asarray(rows, dtype=np.float64))
    _u, sigma, vh = torch.linalg.svd(g, full_matrices=False)
    vals, vecs = (sigma * sigma / g.shape[0]).flip(0), vh.flip(0).T
    return vals.numpy(), np.ascontiguousarray(vecs.numpy())


def fit_kfac(store, spec: DampingSpec) -> list[ModuleCurvature]:
    """KFAC ``F ≈ S ⊗ A`` from the stored factors: eigenbases ``Q_S, Q_A`` and eigenvalues ``e_S e_Aᵀ``."""
    factors = load_kfac_factors(store)
    fitted = []
    for m in store.modules:
        s, a = factors[m.name]
        e_s, q_s = eigh_psd(s)
        e_a, q_a = eigh_psd(a)
        eigvals = np.outer(e_s, e_a)
        damping = resolve_damping(spec, float(e_s.mean() * e_a.mean()))
        fitted.append(
            ModuleCurvature(m.name, m.k_out, m.k_in, m.offset, damping, m.layout, eigvals=eigvals, q_s=q_s, q_a=q_a,
                            e_s=e_s, e_a=e_a)
        )
    return fitted


def fit_ekfac(store, spec: DampingSpec, block_rows: int = DEFAULT_BLOCK_ROWS, ctx: DistContext = SINGLE
              ) -> list[ModuleCurvature]:
    """EKFAC: KFAC eigenbasis, eigenvalues ``Λ = (1/N) Σ_n (Q_Sᵀ Ĝ_n Q_A)²`` re-fitted from the stored rows."""
    factors = load_kfac_factors(store)
    bases = []
    for m in store.modules:
        s, a = factors[m.name]
        bases.append((eigh_psd(s)[1], eigh_psd(a)[1]))
    eigvals, _n = kronecker_eigenvalue_fit(_row_blocks(store, block_rows, ctx), store.modules, bases, ctx)
    fitted = []
    for m, (q_s, q_a), lam in zip(store.modules, bases, eigvals):
        damping = resolve_damping(spec, float(lam.mean()))
        fitted.append(ModuleCurvature(m.name, m.k_out, m.k_in, m.offset, damping, m.layout, eigvals=lam, q_s=q_s,
                                      q_a=q_a))
    return fitted


def fit_curvature(store, kind: str, damping="auto", block_rows: int = DEFAULT_BLOCK_ROWS, *,
                  memory_budget_mb: float | None = None, dist: DistContext | None = None) -> Curvature:
    """Fit ``kind`` on an open store (no saving): see the module docstring for each formula.

    ``memory_budget_mb``: pick ``block_rows`` with `fit_block_rows` (overrides ``block_rows``); without it,
    ``block_rows`` is also capped by `DEFAULT_FIT_BUDGET_MB` (blocks change the order of float64 sums only,
    not what is summed). ``dist``: ranks
    that all call this stream only their own shards and all-reduce the sums (same result on every rank).
    """
    check_kind(kind)
    spec = parse_damping(damping)
    ctx = dist or SINGLE
    if memory_budget_mb is not None:
        block_rows = fit_block_rows(memory_budget_mb, store, kind)
    elif kind in ("raw", "ekfac"):
        try:
            block_rows = min(block_rows, fit_block_rows(DEFAULT_FIT_BUDGET_MB, store, kind))
        except InputError:  # even one row exceeds the default budget: stream row by row
            block_rows = 1
    if block_rows < 1:
        raise InputError(f"block_rows must be >= 1, got {block_rows}")
    started = time.perf_counter()
    if kind == "none":
        modules = fit_none(store, spec)
    elif kind == "raw":
        modules = fit_raw(store, spec, block_rows, ctx)
    elif kind == "kfac":
        modules = fit_kfac(store, spec)
    else:
        modules = fit_ekfac(store, spec, block_rows, ctx)
    return Curvature(
        kind=kind, damping_spec=spec, modules=tuple(modules), dim=store.dim, n_rows=store.rows,
        fit_seconds=time.perf_counter() - started,
    )


def curvature_tensors(curvature: Curvature) -> dict[str, torch.Tensor]:
    """The float64 tensors saved for ``curvature`` (names in the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    for m in curvature.modules:
        tensors[f"{m.name}.damping"] = torch.tensor([m.damping], dtype=torch.float64)
        named = {"eigvecs": m.eigvecs, "eigvals": m.eigvals, "Q_S": m.q_s, "Q_A": m.q_a, "e_S": m.e_s, "e_A": m.e_a}
        for suffix, array in named.items():
            if array is not None:
                tensors[f"{m.name}.{suffix}"] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
    return tensors


def save_curvature(store, curvature: Curvature) -> Path:
    """Write ``curvature/{kind}.safetensors`` into the store (atomically, by the store); return its path."""
    name = curvature_file(curvature.kind)
    store.save_tensors(name, curvature_tensors(curvature), {"dataworth": json.dumps(curvature.metadata())})
    return store.path / name


def fit(store_path, curvature: str = DEFAULT_CURVATURE, damping="auto",
        block_rows: int = DEFAULT_BLOCK_ROWS, *, memory_budget_mb: float | None = None) -> Curvature:
    """``dw.fit``: fit ``curvature`` (none|raw|kfac|ekfac) for the store at ``store_path``, save it, return it.

    ``damping``: a float > 0, ``"<f>x"`` (f × mean eigenvalue per module) or ``"auto"``. Fitting streams the store
    once (raw, ekfac) or reads the KFAC factors (kfac); it never runs the model. ``memory_budget_mb``:
    bound the block buffers (`fit_block_rows`). Launched by torchrun / accelerate (``WORLD_SIZE`` > 1):
    each rank streams its shards, sums are all-reduced, rank 0 saves.
    """
    ctx = init_distributed("cpu")
    check_agreement(ctx, {"store": str(store_path), "curvature": curvature, "damping": str(damping),
                          "block_rows": block_rows, "memory_budget_mb": memory_budget_mb}, "fit arguments")
    store = open_store(store_path, verify=ctx.is_main)
    lock, error = None, None
    if ctx.is_main:  # one writer per store: rank 0 holds the lock for the whole fit, the other ranks only read
        try:
            lock = acquire_directory_lock(store.path, "store")
        except InputError as exc:
            error = exc
    raise_together(ctx, error)
    try:
        fitted = fit_curvature(store, curvature, damping, block_rows, memory_budget_mb=memory_budget_mb, dist=ctx)
        path = save_curvature(store, fitted) if ctx.is_main else store.path / curvature_file(fitted.kind)
        barrier(ctx)
    finally:
        if lock is not None:
            release_directory_lock(store.path, lock)
    return replace(fitted, path=path)


def load_curvature(store, kind: str) -> Curvature:
    """Load the curvature ``kind`` fitted for ``store`` (an open Store or a path).

    ``none`` needs no file. A missing file → InputError naming the ``dataworth fit`` command to run;
    kfac/ekfac on a store without KFAC factors → InputError saying the store lacks them; a file fitted on a
    different number of rows or different modules → InputError asking to re-fit.
    """
    if not hasattr(store, "iter_blocks"):
        store = open_store(store)
    check_kind(kind)
    name = curvature_file(kind)
    if kind in ("kfac", "ekfac") and not store.has(KFAC_FILE):
        load_kfac_factors(store)  # raises the "store lacks KFAC factors" InputError
    if not store.has(name):
        if kind == "none":
            return fit_curvature(store, "none")
        raise InputError(
            f"{store.path}: no fitted {kind} curvature ({name}); run `dataworth fit --store {store.path} "
            f"--curvature {kind}` first"
        )
    tensors = store.load_tensors(name)
    meta = store.load_tensor_metadata(name)
    path = store.path / name
    try:
        info = json.loads(meta["dataworth"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise InputError(
            f"{path}: not a dataworth curvature file (missing 'dataworth' metadata); re-run dataworth fit"
        ) from None
    _check_fitted_matches_store(path, info, store, kind)
    modules = []
    for m in store.modules:
        def get(suffix: str) -> np.ndarray | None:
            value = tensors.get(f"{m.name}.{suffix}")
            return None if value is None else value.double().numpy()

        damping_tensor = get("damping")
        if damping_tensor is None:
            raise InputError(f"{path}: missing tensor '{m.name}.damping'; re-run dataworth fit")
        modules.append(
            ModuleCurvature(
                m.name, m.k_out, m.k_in, m.offset, float(damping_tensor[0]), m.layout, eigvecs=get("eigvecs"),
                eigvals=get("eigvals"), q_s=get("Q_S"), q_a=get("Q_A"), e_s=get("e_S"), e_a=get("e_A"),
            )
        )
        _check_module_tensors(path, kind, modules[-1])
    return Curvature(
        kind=kind, damping_spec=parse_damping(info.get("damping", "auto")), modules=tuple(modules), dim=store.dim,
        n_rows=int(info["n_rows"]), fit_seconds=float(info.get("fit_seconds", 0.0)), path=path,
    )


def _check_fitted_matches_store(path: Path, info: dict, store, kind: str) -> None:
    refit = f"re-run `dataworth fit --store {store.path} --curvature {kind}`"
    if info.get("format") != "dataworth-curvature" or info.get("version") != CURVATURE_FORMAT_VERSION:
        raise InputError(
            f"{path}: unknown curvature format/version {info.get('format')!r}/{info.get('version')!r}; {refit}"
        )
    if info.get("kind") != kind:
        raise InputError(f"{path}: holds curvature {info.get('kind')!r}, expected {kind!r}; {refit}")
    if int(info.get("n_rows", -1)) != store.rows:
        raise InputError(f"{path}: fitted on {info.get('n_rows')} rows but the store now has {store.rows}; {refit}")
    fitted_modules = [(d["name"], d["k_out"], d["k_in"], d["offset"], d.get("layout", "out_in"))
                      for d in info.get("modules", [])]
    store_modules = [(m.name, m.k_out, m.k_in, m.offset, m.layout) for m in store.modules]
    if fitted_modules != store_modules:
        raise InputError(f"{path}: fitted for different modules than the store's manifest lists; {refit}")


def _check_module_tensors(path: Path, kind: str, m: ModuleCurvature) -> None:
    expected = {
        "raw": {"eigvecs": (m.size, _raw_rank(m)), "eigvals": (_raw_rank(m),)},
        "kfac": {"q_s": (m.k_out, m.k_out), "q_a": (m.k_in, m.k_in), "eigvals": (m.k_out, m.k_in)},
        "ekfac": {"q_s": (m.k_out, m.k_out), "q_a": (m.k_in, m.k_in), "eigvals": (m.k_out, m.k_in)},
    }.get(kind, {})
    for attr, shape in expected.items():
        value = getattr(m, attr)
        if value is None or value.shape != shape:
            got = None if value is None else tuple(value.shape)
            raise InputError(
                f"{path}: module {m.name}: tensor {attr} has shape {got}, expected {shape}; re-run dataworth fit"
            )


def _raw_rank(m: ModuleCurvature) -> int:
    """Columns of a saved raw basis: ``D_m`` (full), or fewer for a thin fit (at most the rows fitted on)."""
    return m.eigvecs.shape[1] if m.eigvecs is not None and m.eigvecs.ndim == 2 and m.eigvecs.shape[1] <= m.size else m.size


def fitted_kinds(store) -> list[str]:
    """The curvature kinds fitted for ``store`` (a file in ``curvature/``), in `CURVATURE_KINDS` order; ``none``
    needs no fit and is not listed."""
    return [k for k in CURVATURE_KINDS if k != "none" and store.has(curvature_file(k))]


def choose_curvature(store, kind: str | None, *, quiet: bool = False) -> str:
    """The curvature to score with when ``kind`` may be unset (``score`` without ``--curvature``).

    Given: that kind. Unset: `DEFAULT_CURVATURE` when it is fitted (or when nothing is: `load_curvature` then
    names the fit command); else the only fitted kind, said on stderr; several fitted but not the default →
    InputError naming them, since which one was meant is a choice, not a guess.
    """
    if kind is not None:
        return check_kind(kind)
    fitted = fitted_kinds(store)
    if DEFAULT_CURVATURE in fitted or not fitted:
        return DEFAULT_CURVATURE
    if len(fitted) == 1:
        if not quiet:
            say(f"note: no --curvature given; using {fitted[0]}, the only curvature fitted for {store.path}")
        return fitted[0]
    raise InputError(f"--curvature: not given and {store.path} has no {DEFAULT_CURVATURE} fitted but "
                     f"{', '.join(fitted)}; pass --curvature {' or '.join(fitted)} (or none)")


def ensure_curvature(store_path, kind: str):
    """The fitted curvature of ``kind`` for the store, fitting it first when it is not there yet."""
    try:
        return load_curvature(open_store(store_path), kind)
    except InputError:
        return fit(store_path, kind)
