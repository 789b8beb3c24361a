"""Scale-out is exact: 2 gloo ranks under torchrun give the single-process store, curvature and scores;
a killed rank resumes without recomputing; ranks that disagree are refused; memory stays within a budget.

The torchrun tests launch real processes (``torchrun --standalone --nproc-per-node 2``) on CPU/gloo, with a
tiny Llama and 20 rows in shards of 3 rows (7 shards: rank 0 owns 0,2,4,6 and rank 1 owns 1,3,5).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_llama

from dataworth import distributed as D
from dataworth.errors import InputError

SHARD_ROWS = 3
N_ROWS = 20

# Launched under torchrun. mode "cli": run the CLI with argv. "kill": rank 1 SIGKILLs itself right after
# listing its first finished shard. "fitscore": first an extract where rank 1 asks for another rank (both
# ranks must refuse), then distributed fit, score and a PCA extract through the API.
WORKER = r'''
import json, os, signal, sys
import dataworth.gradients.extract as store_module  # where extraction looks write_fragment up
from dataworth.cli import cli

mode, args = sys.argv[1], sys.argv[2:]
rank = int(os.environ["RANK"])
if mode == "kill" and rank == 1:
    real = store_module.write_fragment
    def write_then_die(*a, **k):
        out = real(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    store_module.write_fragment = write_then_die
if mode == "fitscore":
    import dataworth as dw
    from dataworth.gradients.extract import ExtractConfig, extract
    from dataworth.errors import InputError
    spec = json.loads(args[0])
    try:
        extract(ExtractConfig(**{**spec["pca"], "out": spec["refused"], "rank_in": 2 + rank}), progress=False)
        refusal = "not refused"
    except InputError as exc:
        refusal = str(exc)
    open(f"{spec['refused']}.rank{rank}.txt", "w").write(refusal)
    for kind in ("raw", "ekfac"):
        dw.fit(spec["store"], kind)
    dw.score(spec["store"], spec["queries"], mode="cosine", curvature="ekfac", top_k=4, full=True,
             self_influence=True, out=spec["scores"], device="cpu", block_rows=2)
    extract(ExtractConfig(**spec["pca"]), progress=False)
else:
    cli.main(args, prog_name="dataworth", standalone_mode=True)
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama directory, 20 prompt/response rows, 3 queries, and the worker script."""
    root = tmp_path_factory.mktemp("dist")
    model = build_llama(len(tiny_tokenizer), seed=5)
    model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    rows = [{"id": f"r{i}", "prompt": f"Alice {i} was born in", "response": " Paris" + " and more" * (i % 4)}
            for i in range(N_ROWS)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    queries = [{"id": f"q{i}", "prompt": "Alice was born in", "response": " Paris" * (i + 1)} for i in range(3)]
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    (root / "worker.py").write_text(WORKER)
    return root


def extract_args(world: Path, out: Path, rank: str = "3") -> list[str]:
    return ["extract", "--model", str(world / "model"), "--data", str(world / "data.jsonl"), "--out", str(out),
            "--rank", rank, "--modules", "mlp", "--shard-rows", str(SHARD_ROWS), "--dtype", "float32",
            "--device", "cpu", "--batch-size", "2"]


def config(world: Path, out: Path, **kw):
    from dataworth.gradients.extract import ExtractConfig

    base = dict(model=str(world / "model"), data=str(world / "data.jsonl"), out=str(out), modules="mlp",
                rank_in=3, rank_out=3, shard_rows=SHARD_ROWS, dtype="float32", device="cpu", batch_size=2)
    return ExtractConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """The single-process store (no torch.distributed involved)."""
    from dataworth.gradients.extract import extract

    assert D.launched_world_size() == 1
    return extract(config(world, tmp_path_factory.mktemp("ref") / "store"), progress=False)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` on gloo (CPU), offline."""
    env = {k: v for k, v in os.environ.items() if k not in D.LAUNCH_ENV}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=600, env=env)


def assert_same_store(store, ref) -> None:
    """Same ids in the same order, same rows / losses / KFAC factors up to float round-off."""
    assert store.ids == ref.ids
    assert [s["rows"] for s in store.manifest["shards"]] == [s["rows"] for s in ref.manifest["shards"]]
    np.testing.assert_allclose(store.matrix(), ref.matrix(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(store.loss, ref.loss, rtol=1e-6)
    got, want = (s.load_tensors("curvature/kfac_factors.safetensors") for s in (store, ref))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-9)
    assert not list(Path(store.path).glob("manifest.rank-*.json"))  # fragments are merged away


def listed_shards(store_dir: Path) -> dict[str, int]:
    """Shard files listed in the fragments of a partial distributed store → their mtimes (ns)."""
    out = {}
    for frag in store_dir.glob("manifest.rank-*.json"):
        for entry in json.loads(frag.read_text())["shards"]:
            out[entry["file"]] = (store_dir / entry["file"]).stat().st_mtime_ns
    return out


# ------------------------------------------------------------------------------------------- torchrun

def test_killed_rank_resumes_with_the_same_command_and_equals_the_single_process_store(world, reference, tmp_path):
    from dataworth.gradients.extract import extract
    from dataworth.store.reader import open_store

    out = tmp_path / "store"
    killed = torchrun(str(world / "worker.py"), "kill", *extract_args(world, out))
    assert killed.returncode != 0, killed.stderr[-3000:]
    finished = listed_shards(out)
    assert 0 < len(finished) < 7 and "shards/00001.npy" in finished  # rank 1 died after its first shard
    shutil.copytree(out, tmp_path / "mixed")  # the same partial store, resumed below by ONE process

    resumed = torchrun("-m", "dataworth", *extract_args(world, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "store:" in resumed.stdout
    assert_same_store(open_store(out), reference)
    assert {f: (out / f).stat().st_mtime_ns for f in finished} == finished  # finished shards not recomputed

    # mixed world sizes: a 2-rank partial store completed by a single process
    mixed = extract(config(world, tmp_path / "mixed"), progress=False)
    assert_same_store(mixed, reference)
    assert {f: (tmp_path / "mixed" / f).stat().st_mtime_ns for f in finished} == finished


def test_fewer_shards_than_ranks_is_said_and_the_store_is_still_complete(world, tmp_path):
    """One shard for two ranks: rank 1 has no work; extraction says so (with the --shard-rows that would give
    every rank a shard) instead of leaving it idle without a word, and the store is whole."""
    from dataworth.store.reader import open_store

    args = extract_args(world, tmp_path / "store")
    args[args.index("--shard-rows") + 1] = str(N_ROWS)
    run = torchrun("-m", "dataworth", *args)
    assert run.returncode == 0, run.stderr[-3000:]
    said = run.stdout + run.stderr
    assert "1 shard(s) of 20 rows for 2 ranks" in said and f"--shard-rows {N_ROWS // 2}" in said, said[-2000:]
    assert open_store(tmp_path / "store").rows == N_ROWS


def test_disagreeing_ranks_are_refused_then_distributed_fit_score_and_pca_equal_single_process(
        world, reference, tmp_path):
    import dataworth as dw
    from dataworth.gradients.extract import extract
    from dataworth.influence.curvature import load_curvature
    from dataworth.influence.scores import load_scores
    from dataworth.store.reader import open_store

    dist_store, single_store = tmp_path / "dist", tmp_path / "single"
    shutil.copytree(reference.path, dist_store)
    shutil.copytree(reference.path, single_store)
    pca = {**config(world, tmp_path / "pca_dist", projection="pca", rank_in=2, rank_out=3).__dict__}
    spec = {"store": str(dist_store), "queries": str(world / "queries.jsonl"), "scores": str(tmp_path / "scores"),
            "pca": pca, "refused": str(tmp_path / "refused")}
    res = torchrun(str(world / "worker.py"), "fitscore", json.dumps(spec))
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):  # both ranks refuse, naming the rank and the key, before anything is written
        assert (tmp_path / f"refused.rank{rank}.txt").read_text().startswith(
            "rank 1 disagrees with rank 0 on configuration key 'rank_in': 3 != 2")
    assert not (tmp_path / "refused").exists()

    for kind in ("raw", "ekfac"):
        want = dw.fit(single_store, kind)
        got = load_curvature(open_store(dist_store), kind)
        for g, w in zip(got.modules, want.modules):
            np.testing.assert_allclose(g.eigvals, w.eigvals, rtol=1e-6, atol=1e-12)
            assert g.damping == pytest.approx(w.damping, rel=1e-6)
    want = dw.score(single_store, world / "queries.jsonl", mode="cosine", curvature="ekfac", top_k=4, full=True,
                    self_influence=True, device="cpu", out=tmp_path / "scores_single")
    got = load_scores(tmp_path / "scores")
    np.testing.assert_allclose(np.asarray(got.matrix), np.asarray(want.matrix), rtol=1e-4, atol=1e-6)
    cols = ["query_id", "direction", "rank", "train_id", "train_row"]
    assert got.table[cols].equals(want.table[cols])  # exact top-k merge, ties by row order
    np.testing.assert_allclose(got.table["score"], want.table["score"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.self_influence["self_influence"], want.self_influence["self_influence"], rtol=1e-6)

    # PCA: covariances of the first pass all-reduced over ranks = the single-process covariances
    single_pca = extract(config(world, tmp_path / "pca_single", projection="pca", rank_in=2, rank_out=3),
                         progress=False)
    dist_pca = open_store(tmp_path / "pca_dist")
    full_d, full_s = (s.load_tensors("covariance/full.safetensors") for s in (dist_pca, single_pca))
    for key in full_s:
        # Each rank batches only its own shards, so batch shapes (padding) differ from the single process and
        # the float32 forward/backward rounds differently: equal to float32 precision of the largest entry
        # (an absolute 1e-12 failed on entries near zero: 1.1e-12 off in a matrix of scale 1e-3).
        scale = float(full_s[key].abs().max())
        torch.testing.assert_close(full_d[key], full_s[key], rtol=1e-5, atol=1e-6 * scale)
    assert dist_pca.ids == single_pca.ids
    np.testing.assert_allclose(np.abs(dist_pca.matrix()), np.abs(single_pca.matrix()), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------- in process

def test_merge_of_per_rank_topk_equals_one_process_topk_with_ties_by_row():
    from dataworth.influence.scores import StreamingTopK, top_k_reference

    rng = np.random.default_rng(0)
    for trial in range(30):
        n_rows, world, k = int(rng.integers(1, 40)), int(rng.integers(1, 5)), int(rng.integers(1, 8))
        shard_rows = int(rng.integers(1, 6))
        values = rng.integers(-3, 4, size=(3, n_rows)).astype(np.float32)  # many ties
        k = min(k, n_rows)
        for descending in (True, False):
            parts_v, parts_r = [], []
            for rank in range(world):
                state = StreamingTopK(3, k, descending, allow_gaps=True)
                for shard in range(rank, -(-n_rows // shard_rows), world):
                    lo, hi = shard * shard_rows, min(n_rows, (shard + 1) * shard_rows)
                    state.update(values[:, lo:hi], lo)
                parts_v.append(state.values)
                parts_r.append(state.rows)
            got_v, got_r = D.merge_topk(parts_v, parts_r, k, descending)
            want_r, want_v = top_k_reference(values, k, descending)
            np.testing.assert_array_equal(got_r, want_r, err_msg=f"trial {trial}")
            np.testing.assert_array_equal(got_v, want_v)


def test_shard_ownership_is_round_robin_and_covers_every_shard_once():
    for world in (1, 2, 3, 5):
        owned = [list(D.owned_shards(11, D.DistContext(rank, world))) for rank in range(world)]
        assert sorted(i for part in owned for i in part) == list(range(11))
        assert all(i % world == rank for rank, part in enumerate(owned) for i in part)


def test_first_difference_names_the_differing_key():
    assert D.first_difference({"a": 1, "b": {"c": [1, 2]}}, {"a": 1, "b": {"c": [1, 3]}}) == ("b.c[1]", 2, 3)
    assert D.first_difference({"a": 1}, {"a": 1}) is None
    assert D.first_difference({"a": 1}, {"a": 1, "z": 0}) == ("z", "<missing>", 0)


def test_single_process_needs_no_torch_distributed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.init_distributed("cpu") == D.SINGLE and not D.SINGLE.active
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(InputError, match="WORLD_SIZE"):
        D.init_distributed("cpu")


def synthetic_store(path: Path, n: int, shard_rows: int = 256, seed: int = 0):
    """A store of ``n`` random float32 rows of 2 modules (8×8 each), with KFAC factors for ekfac."""
    from dataworth.store.format import ModuleSpec
    from dataworth.store.writer import StoreWriter

    rng = np.random.default_rng(seed)
    modules = [ModuleSpec("a", 8, 8, 0, 64), ModuleSpec("b", 8, 8, 64, 64)]
    header = {"projection": {"kind": "random"}, "model": {"fingerprint": "x"}, "data": {}, "config": {}}
    writer = StoreWriter(path, modules=modules, dtype="float32", shard_rows=shard_rows, header=header)
    for i, lo in enumerate(range(0, n, shard_rows)):
        hi = min(n, lo + shard_rows)
        writer.write_shard(i, rng.normal(size=(hi - lo, 128)).astype(np.float32), [f"t{j}" for j in range(lo, hi)],
                           np.zeros(hi - lo), np.ones(hi - lo, dtype=np.int64))
    factors = {}
    for m in modules:
        for side in ("S", "A"):
            x = rng.normal(size=(8, 8))
            factors[f"{m.name}.{side}"] = torch.from_numpy(x @ x.T / 8)
    writer.save_tensors("curvature/kfac_factors.safetensors", factors)
    return writer.finalize()


def peak_traced(fn):
    """``(result, peak bytes)`` of Python/numpy allocations while ``fn`` runs."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_score_and_fit_under_a_memory_budget_equal_unbounded_results(tmp_path):
    from dataworth.influence.curvature import fit_curvature
    from dataworth.influence.scores import score_rows

    store = synthetic_store(tmp_path / "s", n=3000)
    budget_mb = 0.25
    assert store.rows * store.dim * 4 > 5 * budget_mb * 2**20  # the rows are several times the budget
    q = np.random.default_rng(1).normal(size=(8, 128)).astype(np.float32)
    ids = [f"q{i}" for i in range(8)]
    for kind in ("raw", "ekfac"):
        unbounded = fit_curvature(store, kind, block_rows=store.rows)
        fit_curvature(store, kind, memory_budget_mb=budget_mb)  # warm-up: imports are not the budget's business
        bounded, peak = peak_traced(lambda: fit_curvature(store, kind, memory_budget_mb=budget_mb))
        assert peak < budget_mb * 2**20, (kind, peak)
        for b, u in zip(bounded.modules, unbounded.modules):
            np.testing.assert_allclose(b.eigvals, u.eigvals, rtol=1e-9, atol=1e-12)
    curv = fit_curvature(store, "ekfac")
    for mode in ("dot", "cosine", "relative"):
        # Scoring reads shard views and widens 256-row pieces, so even block_rows=rows stays small here; the
        # budget must hold whatever the mode (relative adds self-influence on whole blocks).
        want = score_rows(store, q, ids, curv, mode, top_k=10, block_rows=store.rows)
        score_rows(store, q, ids, curv, mode, top_k=10, memory_budget_mb=budget_mb)
        got, peak = peak_traced(lambda: score_rows(store, q, ids, curv, mode, top_k=10, memory_budget_mb=budget_mb))
        assert peak < budget_mb * 2**20, (mode, peak)
        assert got.table[["query_id", "direction", "rank", "train_row", "train_id"]].equals(
            want.table[["query_id", "direction", "rank", "train_row", "train_id"]])
        np.testing.assert_allclose(got.table["score"], want.table["score"], rtol=1e-5, atol=1e-6)
        assert got.summary["store_passes"] == 1 and got.summary["block_rows"] < store.rows


def test_tight_budget_splits_queries_into_batches_one_store_pass_each(tmp_path):
    from dataworth.influence.curvature import fit_curvature
    from dataworth.influence.scores import score_rows

    store = synthetic_store(tmp_path / "s", n=300, shard_rows=64)
    curv = fit_curvature(store, "none")
    q = np.random.default_rng(2).normal(size=(50, 128)).astype(np.float32)
    ids = [f"q{i}" for i in range(50)]
    reads = []
    real = store.iter_row_ranges

    def counting(ranges, **kw):
        for start, block in real(ranges, **kw):
            reads.append(len(block))
            yield start, block

    store.iter_row_ranges = counting
    got = score_rows(store, q, ids, curv, "dot", top_k=5, full=True, memory_budget_mb=0.1)
    batch = got.summary["query_batch"]
    assert batch < 50 and got.summary["store_passes"] == -(-50 // batch)
    assert sum(reads) == store.rows * got.summary["store_passes"]  # each pass reads every row exactly once
    np.testing.assert_allclose(got.matrix, q @ store.matrix().T, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="--memory-budget"):
        score_rows(store, q, ids, curv, "dot", memory_budget_mb=1e-4)


# ------------------------------------------------------------------------------------------- GPU paths, on CPU

def test_autocast_bf16_keeps_projections_float32_and_rows_close(tiny_tokenizer):
    from dataworth.data.batching import Encoded, collate
    from dataworth.gradients.extract import Extractor, encoded_rows_for
    from dataworth.gradients.modules import select_modules
    from dataworth.gradients.projection import build_projections

    model = build_llama(len(tiny_tokenizer), seed=3)
    g = torch.Generator().manual_seed(0)
    rows = [Encoded(f"r{i}", torch.randint(3, 200, (9,), generator=g).tolist(), [0, 0] + [1] * 7) for i in range(4)]
    chosen = select_modules(model, "mlp")
    projs = build_projections(chosen, "random", 4, 4, 0)
    with Extractor(model, chosen, projs, torch.device("cpu"), kind="random") as ex:
        exact, _, _ = encoded_rows_for(ex, rows, 0, 4, None)
    with Extractor(model, chosen, projs, torch.device("cpu"), kind="random", autocast="bf16",
                   keep_tokens=True) as ex:
        approx, _, _ = encoded_rows_for(ex, rows, 0, 4, None)
        ex.run(collate(rows[:1], [0], 0))
        name = chosen[0][0]
        assert ex.last.token_acts[name].dtype == torch.float32 and ex.last.token_grads[name].dtype == torch.float32
    assert approx.dtype == np.float32
    rel = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    assert 0 < rel < 0.05  # bf16 forward: close to, not equal to, the float32 rows
    assert all(not m._forward_hooks and not m._forward_pre_hooks for _, m in chosen)  # all removed on close


def test_background_shard_writer_gives_the_same_store_bytes(world, reference, tmp_path):
    from dataworth.gradients.extract import extract

    store = extract(config(world, tmp_path / "async", async_write=True), progress=False)

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}

    a, b = files(store.path), files(reference.path)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_background_writer_reports_a_failed_write_and_keeps_order():
    from dataworth.gradients.extract import ShardWriteQueue

    done = []
    with ShardWriteQueue(enabled=True, depth=2) as queue:
        for i in range(5):
            queue.submit(done.append, i)
    assert done == [0, 1, 2, 3, 4]

    def boom(i):
        raise OSError(f"disk full at {i}")

    with pytest.raises(OSError, match="disk full at 0"):
        with ShardWriteQueue(enabled=True, depth=1) as queue:
            queue.submit(boom, 0)
            queue.submit(done.append, 9)
            queue.drain()


# ------------------------------------------------------------------------------------------- FAISS (optional)

def test_recall_at_k_counts_shared_rows_per_query():
    from dataworth.influence.index import recall_at_k

    assert recall_at_k([[1, 2, 3], [4, 5, -1]], [[3, 2, 9], [7, 8, 9]]) == pytest.approx((2 / 3 + 0) / 2)
    assert recall_at_k([[0, 1]], [[1, 0]]) == 1.0


def test_faiss_flat_index_is_exact_and_ivf_recall_is_reported(tmp_path):
    pytest.importorskip("faiss")
    from click.testing import CliRunner

    from dataworth.cli import cli
    from dataworth.influence.index import build_index, index_recall, load_index, search

    store = synthetic_store(tmp_path / "s", n=1200)
    build_index(store.path, "Flat")
    index, _ = load_index(store)
    q = np.random.default_rng(3).normal(size=(4, 128)).astype(np.float32)
    pos_v, pos_r, neg_v, neg_r = search(index, q, 5)
    exact = q @ store.matrix().T
    np.testing.assert_allclose(pos_v, -np.sort(-exact, axis=1)[:, :5], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.take_along_axis(exact, pos_r, 1), pos_v, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(neg_v, np.sort(exact, axis=1)[:, :5], rtol=1e-4, atol=1e-4)
    assert index_recall(store.path, k=10, sample=20)["recall@10"] == 1.0

    build_index(store.path, "IVF16,Flat")
    assert index_recall(store.path, k=10, sample=20, nprobe=16)["recall@10"] == 1.0  # every list probed: exact
    res = CliRunner().invoke(cli, ["index", "recall", "--store", str(store.path), "--k", "10", "--nprobe", "1",
                                   "--sample", "20", "--json", str(tmp_path / "recall.json")])
    assert res.exit_code == 0, res.output
    figures = json.loads((tmp_path / "recall.json").read_text())
    assert 0 < figures["recall@10"] < 1 and f"recall@10: {figures['recall@10']}" in res.output


@pytest.mark.parametrize("factory, train_size, expected", [
    ("IVF50,Flat", None, "50 clusters need at least 50 training rows and the store has 30; use at most 30 clusters"),
    ("PCA16,IVF40,Flat", None, "40 clusters need at least 40 training rows and the store has 30"),
    ("IVF20,Flat", 10, "20 clusters need at least 20 training rows and --train-size is 10"),
    ("IVF2,PQ8", None, "FAISS cannot train it on 30 rows (Number of training points (30) should be at least"),
])
def test_faiss_index_with_more_clusters_than_rows_is_one_line(tmp_path, factory, train_size, expected):
    """FAISS asserts in C++ (a RuntimeError traceback): say how many rows there are and the most clusters."""
    pytest.importorskip("faiss")
    from click.testing import CliRunner

    from dataworth.cli import cli

    store = synthetic_store(tmp_path / "s", n=30)
    args = ["index", "build", "--store", str(store.path), "--factory", factory]
    res = CliRunner().invoke(cli, args + (["--train-size", str(train_size)] if train_size else []))
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith(f"error: --factory {factory!r}: ") and expected in line
    assert not (store.path / "index").exists()
