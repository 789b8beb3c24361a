"""The report's figures (matplotlib, Agg): score distributions, curvature spectra, KFAC factors, self-influence.

Each function returns PNG bytes without timestamps or software metadata, so a report is reproducible.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from dataworth.influence.curvature import load_curvature, load_kfac_factors
from dataworth.store.format import KFAC_FILE


def _png(fig, tight: bool = False) -> bytes:
    """PNG bytes of a figure (no timestamp/software metadata). ``tight`` crops to the drawn area (slower: it
    draws twice), used only where colour bars make fixed margins awkward."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None}, pil_kwargs={"compress_level": 3},
                **({"bbox_inches": "tight"} if tight else {}))
    return buf.getvalue()


class ScoreDistributionPlotter:
    """Per-query score histograms drawn on one reused figure (a report may hold thousands of queries; creating
    a figure per query costs more than drawing it)."""

    def __init__(self) -> None:
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=(5.6, 2.1))
        self.fig.subplots_adjust(left=0.11, right=0.98, bottom=0.26, top=0.88)
        self.ax = self.fig.subplots()

    def __call__(self, scores: np.ndarray, shown: pd.DataFrame, full: bool, title: str) -> bytes:
        """Histogram of one query's scores (all N rows when ``full``, else its top-k rows), shown rows marked
        (blue: helps, orange: hurts), zero marked black."""
        ax = self.ax
        ax.cla()
        values = np.asarray(scores, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            counts, edges = np.histogram(values, bins=min(60, max(10, values.size // 4)))
            ax.stairs(counts, edges, fill=True, color="#94a3b8")
        transform = ax.get_xaxis_transform()
        for direction, colour in (("positive", "#2563eb"), ("negative", "#ea580c")):
            marks = shown.loc[shown["direction"] == direction, "score"].to_numpy(dtype=np.float64)
            if marks.size:
                ax.vlines(marks, 0, 1, transform=transform, colors=colour, lw=0.8, alpha=0.7)
        ax.axvline(0.0, color="black", lw=0.6)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("influence score" + ("" if full else " (top-k rows only; score --full for all)"), fontsize=8)
        ax.set_ylabel("rows", fontsize=8)
        ax.tick_params(labelsize=7)
        return _png(self.fig)


def plot_score_distribution(scores: np.ndarray, shown: pd.DataFrame, full: bool, title: str) -> bytes:
    """One query's score histogram as PNG bytes (see :class:`ScoreDistributionPlotter`)."""
    return ScoreDistributionPlotter()(scores, shown, full, title)


def plot_spectra(spectra: dict[str, np.ndarray], title: str) -> bytes:
    """Per-module eigenvalues, sorted descending, on a log scale (zeros are left out of the log axis)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.2))
    fig.subplots_adjust(left=0.11, right=0.98, bottom=0.15, top=0.9)
    ax = fig.subplots()
    for name, values in spectra.items():
        values = np.sort(np.asarray(values, dtype=np.float64).ravel())[::-1]
        values = values[values > 0]
        if values.size:
            ax.plot(np.arange(1, values.size + 1), values, lw=1, label=name)
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("eigenvalue index", fontsize=8)
    ax.set_ylabel("eigenvalue", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    if 0 < len(spectra) <= 12:
        ax.legend(fontsize=6, frameon=False)
    return _png(fig)


def plot_factors(module: str, a: np.ndarray, s: np.ndarray) -> bytes:
    """Heatmaps of one module's activation factor ``A`` and gradient factor ``S`` (diverging, centred at 0)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.0, 3.0))
    axes = fig.subplots(1, 2)
    for ax, matrix, name in ((axes[0], a, "A = E[(P_in x)(P_in x)ᵀ]"), (axes[1], s, "S = E[(P_out δ)(P_out δ)ᵀ]")):
        bound = float(np.max(np.abs(matrix))) or 1.0
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
        ax.set_title(f"{name}  {matrix.shape[0]}×{matrix.shape[1]}", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.tick_params(labelsize=6)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.suptitle(module, fontsize=9)
    return _png(fig, tight=True)


def plot_self_influence(values: np.ndarray) -> bytes:
    """Histogram of ``log10 s(n, n)`` over the rows with positive self-influence (zeros counted in the title)."""
    from matplotlib.figure import Figure

    values = np.asarray(values, dtype=np.float64)
    positive = values[values > 0]
    fig = Figure(figsize=(5.6, 2.3))
    fig.subplots_adjust(left=0.11, right=0.98, bottom=0.22, top=0.88)
    ax = fig.subplots()
    if positive.size:
        ax.hist(np.log10(positive), bins=min(60, max(10, positive.size // 4)), color="#64748b")
    ax.set_xlabel("log10 self-influence s(n, n)", fontsize=8)
    ax.set_ylabel("rows", fontsize=8)
    ax.set_title(f"self-influence of {values.size} rows ({values.size - positive.size} zero)", fontsize=8)
    ax.tick_params(labelsize=7)
    return _png(fig)


def module_spectra(store, kind: str) -> tuple[str, dict[str, np.ndarray]] | None:
    """``(title, {module: eigenvalues})`` of the curvature the scores used; for ``none``, of the KFAC factors
    when the store has them; None when there is nothing to show."""
    if kind != "none":
        curvature = load_curvature(store, kind)
        return (f"{kind} curvature eigenvalues per module (log scale)",
                {m.name: m.eigvals for m in curvature.modules if m.eigvals is not None})
    if store.has(KFAC_FILE):
        spectra = {}
        for name, (s, a) in load_kfac_factors(store).items():
            spectra[name] = np.outer(np.linalg.eigvalsh(s), np.linalg.eigvalsh(a))
        return "KFAC (S ⊗ A) eigenvalues per module (the scores used no curvature)", spectra
    return None
