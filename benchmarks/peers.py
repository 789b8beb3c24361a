"""dataworth against its peers — Kronfluence (EK-FAC, identity), LogIX and TRAK — on one tiny task, one run.

    .venv/bin/python benchmarks/peers.py [--quick] [--json FILE] [--out DIR] [--methods a,b,...]

What it does, in order:

1. ``bash benchmarks/peers_setup.sh``: builds ``benchmarks/_peers_venv`` (git-ignored) holding the peers and
   dataworth (editable). Peers are never dependencies of dataworth and never imported by it.
2. The task is ``benchmarks/lds.py``'s (same ``LdsConfig`` → same cache directory → the SAME retrains): the
   ``tiny-test`` Llama trained from scratch on a small ``builtin:bios`` world, whose training rows and fact
   queries go to JSONL files.
3. Each method runs in its own subprocess (``benchmarks/peers/run_<method>.py``; peers inside the peers'
   venv, dataworth in this interpreter), with the same model, token ids, loss masks, summed per-example
   loss, watched layers (every linear layer of the blocks, not the head) and torch thread count, and writes
   ``scores.npy`` ([Q, N], positive = the training row lowers the query's loss) and ``timing.json``
   (extraction + fit seconds, scoring seconds, peak RSS of its own process).
4. One Markdown table: LDS (``dataworth.evaluation.metrics.lds_summary`` against the cached retrains: Spearman of the
   summed scores of each subset vs. the negated retrained query loss, mean over queries), recall@10 of the
   documents that state each fact (``dataworth.evaluation.metrics.fact_tracing_metrics``), seconds, peak RSS, and the
   ratios dataworth ÷ peer (time: extract + fit + score; memory: peak RSS; below 1 = dataworth cheaper).
   Below it, a sign check: every method's scores must correlate positively with the one-step ground truth
   ``L_q(θ) − L_q(θ − η∇L_n)`` (training on n alone lowers q's loss).

Missing retrains are trained first (that is most of a first run's time; ``benchmarks/lds.py`` shares them);
``--no-retrain`` prints LDS as n/a instead while the cache is incomplete.
A method that cannot be installed or run is reported with its error; the others still run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ADAPTERS = HERE / "peers"
PEERS_VENV = HERE / "_peers_venv"
REFERENCE = "dataworth"
DOWN_PROJ = r"mlp\.down_proj"  # dataworth.gradients.modules.select_modules regex: the MLP output projections


# --------------------------------------------------------------------------------------------- the methods

@dataclass(frozen=True)
class Method:
    """One row of the table: which adapter runs, in which environment, with which extra flags."""

    name: str
    script: str
    flags: tuple[str, ...] = ()
    peer: bool = True  # True: runs in the peers' venv

    def command(self, python: str, common: Sequence[str]) -> list[str]:
        return [python, str(ADAPTERS / self.script), *common, *self.flags]


def methods(rank: int, trak_dim: int) -> list[Method]:
    """The compared methods: dataworth (LoGra EK-FAC = the reference of the ratios; also plain dot products,
    the exact projected Fisher ``raw`` (LogIX's default), EK-FAC on exact gradients like Kronfluence's, and the
    most accurate option of ``benchmarks/lds.py``: TrackStar scoring averaged over the kept checkpoints),
    Kronfluence EK-FAC and identity (unprojected), LogIX (LoGra at the same rank as dataworth), TRAK
    (projection capped below N, see `trak_dim_for`)."""
    return [
        Method(REFERENCE, "run_dataworth.py", ("--rank", str(rank), "--curvature", "ekfac"), peer=False),
        Method("dataworth (raw)", "run_dataworth.py", ("--rank", str(rank), "--curvature", "raw"), peer=False),
        Method("dataworth (none)", "run_dataworth.py", ("--rank", str(rank), "--curvature", "none"), peer=False),
        Method("dataworth (exact ekfac)", "run_dataworth.py", ("--projection", "identity", "--curvature", "ekfac"),
               peer=False),
        Method("dataworth (trackstar ensemble)", "run_dataworth.py",
               ("--projection", "identity", "--rank", "0", "--optimizer", "adam", "--checkpoints", "ensemble"),
               peer=False),
        # The same layers for dataworth and Kronfluence: the MLP output projections (dataworth's demo default)
        # and every MLP layer.
        Method("dataworth (exact ekfac, down_proj)", "run_dataworth.py",
               ("--projection", "identity", "--curvature", "ekfac", "--modules", DOWN_PROJ), peer=False),
        Method("dataworth (trackstar ensemble, mlp)", "run_dataworth.py",
               ("--projection", "identity", "--rank", "0", "--optimizer", "adam", "--checkpoints", "ensemble",
                "--modules", "mlp"), peer=False),
        Method("kronfluence-ekfac", "run_kronfluence.py", ("--strategy", "ekfac")),
        Method("kronfluence-identity", "run_kronfluence.py", ("--strategy", "identity")),
        Method("kronfluence-ekfac (down_proj)", "run_kronfluence.py", ("--strategy", "ekfac", "--modules", DOWN_PROJ)),
        Method("kronfluence-ekfac (mlp)", "run_kronfluence.py", ("--strategy", "ekfac", "--modules", "mlp")),
        Method("logix", "run_logix.py", ("--rank", str(rank))),
        Method("trak", "run_trak.py", ("--proj-dim", str(trak_dim))),
    ]


# ------------------------------------------------------------------------------------------- pure helpers

def ratio(ours: float | None, theirs: float | None) -> float | None:
    """``ours / theirs`` or None when either is missing or ``theirs`` is 0 (below 1: dataworth is cheaper)."""
    if ours is None or theirs is None or theirs == 0 or not (math.isfinite(ours) and math.isfinite(theirs)):
        return None
    return ours / theirs


def lds_fallback(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> float:
    """LDS (Park et al. 2023, §2.2), used only when ``dataworth.evaluation.metrics`` has no LDS yet.

    ``scores [Q, N]``, ``masks [M, N]`` bool, ``losses [M, Q]`` (mean over replicates). Per query:
    Spearman correlation over subsets of ``Σ_{n∈S_m} s(q, n)`` with ``−loss_m(q)`` (positive score = lowers
    the loss); mean over queries whose correlation is defined.
    """
    from scipy.stats import spearmanr

    predicted = np.asarray(masks, dtype=np.float64) @ np.asarray(scores, dtype=np.float64).T  # [M, Q]
    values = []
    for q in range(predicted.shape[1]):
        if np.ptp(predicted[:, q]) == 0 or np.ptp(losses[:, q]) == 0:
            continue
        values.append(spearmanr(predicted[:, q], -losses[:, q]).statistic)
    return float(np.mean(values)) if values else float("nan")


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}"


TABLE_COLUMNS = ("method", "LDS", "recall@10", "extract+fit s", "score s", "peak RSS MiB",
                 "dataworth÷peer time", "dataworth÷peer memory")


def with_ratios(rows: list[dict], reference: str = REFERENCE) -> list[dict]:
    """Adds ``time_ratio`` (reference (fit+score) ÷ row's) and ``memory_ratio`` (peak RSS) to every row."""
    ref = next((r for r in rows if r["method"] == reference and r.get("error") is None), None)
    out = []
    for r in rows:
        total = None if r.get("fit_s") is None else r["fit_s"] + r["score_s"]
        ref_total = None if ref is None else ref["fit_s"] + ref["score_s"]
        out.append({**r, "time_ratio": ratio(ref_total, total),
                    "memory_ratio": ratio(None if ref is None else ref["peak_rss_mib"], r.get("peak_rss_mib"))})
    return out


def format_table(rows: list[dict]) -> str:
    """The Markdown table of ``rows`` (dicts with method, lds [+ lds_ci_low/high: shown as a bootstrap 95%
    interval], recall@10, fit_s, score_s, peak_rss_mib, time_ratio, memory_ratio; a row with ``error`` shows
    it instead of figures)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        if r.get("error"):
            cells = [r["method"], f"failed: {r['error']}"] + [""] * (len(TABLE_COLUMNS) - 2)
        else:
            lds = _fmt(r.get("lds"))
            if r.get("lds_ci_low") is not None and lds != "n/a":
                lds += f" [{_fmt(r['lds_ci_low'], 2)}, {_fmt(r['lds_ci_high'], 2)}]"
            cells = [r["method"], lds, _fmt(r.get("recall@10")), _fmt(r.get("fit_s"), 1),
                     _fmt(r.get("score_s"), 1), _fmt(r.get("peak_rss_mib"), 0), _fmt(r.get("time_ratio"), 2),
                     _fmt(r.get("memory_ratio"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- the task

def lds_benchmark():
    """``benchmarks/lds.py`` as a module: its task (same config → same cache → the SAME retrains)."""
    import importlib.util

    if "benchmarks_lds" not in sys.modules:
        spec = importlib.util.spec_from_file_location("benchmarks_lds", HERE / "lds.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks_lds"] = module
        spec.loader.exec_module(module)
    return sys.modules["benchmarks_lds"]


def lds_task_config(quick: bool, measure: str = "answer"):
    """The LDS task of ``benchmarks/lds.py`` for ``measure`` (``dataworth.data.encode.MEASURES``)."""
    return lds_benchmark().task_config(quick, measure)


@dataclass(frozen=True)
class Sizes:
    """Row sizes: LoGra rank for dataworth and LogIX; TRAK's projection is capped below N (see run_trak.py)."""

    rank: int
    trak_dim: int


SIZES = {"full": Sizes(rank=32, trak_dim=1024), "quick": Sizes(rank=8, trak_dim=1024)}


def trak_dim_for(requested: int, n_rows: int) -> int:
    """TRAK's ``ΦᵀΦ`` (proj_dim²) has rank ≤ N and TRAK's default ridge is 0: keep proj_dim ≤ N / 2."""
    return max(1, min(requested, n_rows // 2))


def write_jsonl(path: Path, rows) -> None:
    """Rows (``dataworth.data.rows.Row``) as JSONL with their ids, atomically."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        for r in rows:
            fh.write(json.dumps({**r.data, "id": r.id}) + "\n")
    os.replace(tmp, path)


def gold_positions(query_rows, train_ids: list[str]) -> list[list[int]]:
    where = {t: i for i, t in enumerate(train_ids)}
    return [[where[g] for g in q.data["gold"]] for q in query_rows]


def lds_of(task, scores: np.ndarray) -> dict:
    """LDS figures by ``dataworth.evaluation.metrics.lds_summary`` (the function every dataworth benchmark uses)."""
    try:
        from dataworth.evaluation.metrics import lds_summary
    except ImportError:
        return {"lds": lds_fallback(scores, task.masks, task.mean_losses)}
    return lds_summary(scores, task.masks, task.losses, seed=task.config.seed)


def one_step_effects(model_dir: str, train_spec: str, queries_spec: str, modules: str, max_length: int,
                     measure: str = "answer", step_norm: float = 1e-3) -> np.ndarray:
    """Ground truth for the sign check: ``[Q, N]`` decrease of each query's loss after one gradient step on
    training row n alone, ``L_q(θ) − L_q(θ − η ∇L_n(θ))`` (float64), over the watched layers' weights —
    ``dataworth.evaluation.effects.one_step_effects`` (plain SGD, ``params`` = those weights) in float64.

    ``η = step_norm / median_n ‖∇L_n‖`` (one η for every row, so the ranking over rows is that of the true
    effect). To first order this is ``η ∇L_qᵀ ∇L_n``: positive ⇔ training on n lowers the query loss — the
    sign every method's scores must share (checked by `sign_agreement`). The norms take one extra backward
    pass per row.
    """
    import torch

    from dataworth.data.encode import encode_rows
    from dataworth.data.rows import load_rows
    from dataworth.gradients.modules import select_modules
    from dataworth.model.load import load_model
    from dataworth.data.encode import measured_queries
    from dataworth.evaluation.effects import row_gradients
    from dataworth.evaluation.effects import one_step_effects as effects_of_one_step

    loaded = load_model(model_dir, device="cpu")
    model = loaded.model.double().eval()
    train, _ = encode_rows(load_rows(train_spec), loaded.tokenizer, max_length=max_length)
    queries, _ = encode_rows(load_rows(queries_spec), loaded.tokenizer, max_length=max_length)
    queries = measured_queries(queries, loaded.tokenizer, measure)
    names = [f"{name}.weight" for name, _ in select_modules(model, modules)]
    weights = [dict(model.named_parameters())[n] for n in names]
    norms = [float(torch.sqrt(sum((g * g).sum() for g in gs)))
             for gs in row_gradients(model, train, loaded.tokenizer.pad_token_id, weights)]
    eta = step_norm / float(np.median(norms))
    return effects_of_one_step(model, loaded.tokenizer, train, queries, lr=eta, params=names,
                               batch_size=max(1, len(queries)))


def sign_agreement(scores: np.ndarray, reference: np.ndarray) -> float:
    """Mean over queries of the Spearman correlation between ``scores[q]`` and ``reference[q]`` (``[Q, N]``
    each); queries where either row is constant are skipped. Positive: same sign convention."""
    from scipy.stats import spearmanr

    scores, reference = np.asarray(scores, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if scores.shape != reference.shape:
        raise ValueError(f"scores {scores.shape} vs reference {reference.shape}")
    values = [spearmanr(a, b).statistic for a, b in zip(scores, reference) if np.ptp(a) > 0 and np.ptp(b) > 0]
    return float(np.mean(values)) if values else float("nan")


# -------------------------------------------------------------------------------------------- running

def setup_peers(skip: bool) -> str | None:
    """Run the setup script; returns the peers' python, or None (with the reason printed) when it failed."""
    python = PEERS_VENV / "bin" / "python"
    if not skip:
        done = subprocess.run(["bash", str(HERE / "peers_setup.sh")], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"peers setup failed (rc {done.returncode}): {last_line(done.stderr)}", file=sys.stderr)
            return None
        print(done.stdout.strip().replace("\n", ", "), file=sys.stderr)
    return str(python) if python.exists() else None


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def run_method(method: Method, python: str | None, common: list[str], out: Path, timeout: float) -> dict:
    """Run one adapter; returns its timing.json plus scores path, or ``{"error": ...}``."""
    out.mkdir(parents=True, exist_ok=True)
    if python is None:
        return {"method": method.name, "error": "peers' virtual environment is missing (setup failed)"}
    log = out / "log.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}
    started = time.perf_counter()
    try:
        with open(log, "w") as fh:
            done = subprocess.run(method.command(python, [*common, "--out", str(out)]), stdout=fh, stderr=subprocess.STDOUT,
                                  env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"method": method.name, "error": f"timed out after {timeout:.0f} s (log: {log})"}
    if done.returncode != 0:
        return {"method": method.name, "error": f"rc {done.returncode}: {last_line(log.read_text())}"}
    timing = json.loads((out / "timing.json").read_text())
    return {**timing, "method": method.name, "wall_s": time.perf_counter() - started, "scores": str(out / "scores.npy")}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run on benchmarks/lds.py's quick task (11 rows)")
    ap.add_argument("--task-dir", default=None, help="LDS task cache, shared with benchmarks/lds.py "
                                                     "(default out/lds, or out/lds-quick with --quick)")
    ap.add_argument("--out", default=None, help="method runs (default out/peers, or out/peers-quick)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods to run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every method")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per method")
    ap.add_argument("--no-retrain", action="store_true",
                    help="never train missing LDS retrains; LDS is n/a unless the cache is complete")
    ap.add_argument("--skip-setup", action="store_true", help="do not (re)run peers_setup.sh")
    ap.add_argument("--measure", default="answer", choices=("answer", "answer+end"),
                    help="query loss every method attributes and every retrain measures (default: the answer)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    kind = "quick" if args.quick else "full"
    size = SIZES[kind]
    task_dir = Path(args.task_dir or ROOT / "out" / lds_benchmark().task_dir_name(args.quick, args.measure))
    work = Path(args.out or ROOT / "out" / ("peers-quick" if args.quick else "peers")
                / ("" if args.measure == "answer" else "end-token"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    python = setup_peers(args.skip_setup)

    from dataworth.data.rows import load_rows
    from dataworth.errors import InputError
    from dataworth.evaluation.metrics import fact_tracing_metrics
    from dataworth.evaluation.retrain import build_lds_task

    config = lds_task_config(args.quick, args.measure)
    # stop_after=0: train (or reuse) the attributed model only; the retrains are only needed for the LDS.
    try:
        build_lds_task(task_dir, config, progress=True, stop_after=0)
    except InputError as exc:  # e.g. a cache made with another configuration: one line, exit 2
        print(f"error: {exc} (or pass --task-dir)", file=sys.stderr)
        raise SystemExit(2) from None
    model_dir = task_dir / "model"
    train_rows, query_rows = load_rows(config.data), load_rows(config.queries)
    train_ids = [r.id for r in train_rows]
    write_jsonl(work / "train.jsonl", train_rows)
    write_jsonl(work / "queries.jsonl", query_rows)
    gold = gold_positions(query_rows, train_ids)
    max_length = config.train.max_length or 512
    trak_dim = trak_dim_for(size.trak_dim, len(train_rows))

    chosen = methods(size.rank, trak_dim)
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(wanted) - {m.name for m in chosen})
        if unknown:
            ap.error(f"--methods: unknown {', '.join(unknown)} (known: {', '.join(m.name for m in chosen)})")
        chosen = [m for m in chosen if m.name in wanted]
    common = ["--model", str(model_dir), "--train", str(work / "train.jsonl"), "--queries",
              str(work / "queries.jsonl"), "--max-length", str(max_length), "--threads", str(args.threads),
              "--measure", config.measure]
    rows = []
    for method in chosen:
        print(f"[peers] {method.name} …", file=sys.stderr, flush=True)
        slug = method.name.replace(" ", "_").replace("(", "").replace(")", "")
        result = run_method(method, python if method.peer else sys.executable, common, work / "runs" / slug,
                            args.timeout)
        if result.get("error") is None:
            print(f"[peers] {method.name}: fit {result['fit_s']:.1f}s score {result['score_s']:.1f}s "
                  f"peak {result['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
        else:
            print(f"[peers] {method.name} failed: {result['error']}", file=sys.stderr, flush=True)
        rows.append(result)

    print("[peers] sign check: one-step ground truth …", file=sys.stderr, flush=True)
    truth = one_step_effects(str(model_dir), str(work / "train.jsonl"), str(work / "queries.jsonl"), "all", max_length,
                             config.measure)
    task, lds_note = None, ""
    try:
        task = build_lds_task(task_dir, config, progress=True, stop_after=0 if args.no_retrain else None)
    except Exception as exc:  # noqa: BLE001 - the table is still worth printing without LDS
        lds_note = f"LDS n/a: {type(exc).__name__}: {exc}"
    if task is None and not lds_note:
        done = len(list((task_dir / "retrains").glob("subset-*.json")))
        lds_note = (f"LDS n/a: retrain cache {task_dir} incomplete ({done}/{config.subsets * config.replicates}); "
                    "run without --no-retrain (or benchmarks/lds.py) to finish it")
    for r in rows:
        if r.get("error") is not None:
            continue
        scores = np.load(r["scores"])
        r["recall@10"] = fact_tracing_metrics(scores, gold, ks=(10,))["recall@10"]
        r["sign_agreement"] = sign_agreement(scores, truth)
        if task is not None:
            summary = lds_of(task, scores)
            r["lds"] = summary["lds"]
            r["lds_ci_low"], r["lds_ci_high"] = summary.get("lds_ci_low"), summary.get("lds_ci_high")
            r["lds_summary"] = summary
    rows = with_ratios(rows)

    print(f"\n{len(train_rows)} training documents, {len(query_rows)} fact queries ({config.data}); LDS against "
          f"{config.subsets} subsets (α = {config.alpha}) × {config.replicates} retrains from {task_dir}; "
          f"torch threads {args.threads}; peak RSS of each method's own process (Python + torch included).\n")
    print(format_table(rows))
    ceiling = next((r["lds_summary"].get("noise_ceiling") for r in rows if r.get("lds_summary")), None)
    if ceiling is not None:
        print(f"\nLDS: mean over queries [bootstrap 95% interval]; noise ceiling (retrain seed 0 vs 1) {_fmt(ceiling)}.")
    if lds_note:
        print(f"\n{lds_note}")
    print("\nSign check — mean Spearman with the one-step ground truth L_q(θ) − L_q(θ − η∇L_n) "
          "(must be > 0): " + ", ".join(f"{r['method']} {r['sign_agreement']:+.2f}"
                                       for r in rows if r.get("error") is None))
    for r in rows:
        if r.get("error") is None:
            print(f"- {r['method']}: {r.get('notes', '')}")
    figures = {"task": {"data": config.data, "queries": config.queries, "rows": len(train_rows),
                        "queries_n": len(query_rows), "subsets": config.subsets, "replicates": config.replicates,
                        "task_dir": str(task_dir), "lds_note": lds_note, "rank": size.rank, "trak_dim": trak_dim},
               "methods": [{k: v for k, v in r.items() if k != "scores"} for r in rows],
               "total_s": round(time.perf_counter() - started, 1)}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main()
