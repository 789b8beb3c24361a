"""LoGra extraction is exact: store rows equal torch.func per-sample gradients (projected where asked)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import build_gpt2, build_llama, build_neox, lock_held_by_another_process
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.func import functional_call, grad

from dataworth.data.batching import Encoded, collate, example_losses
from dataworth.gradients.extract import (
    ExtractConfig,
    Extractor,
    encoded_rows_for,
    extract,
    nonfinite_rows,
)
from dataworth.gradients.modules import select_modules
from dataworth.gradients.projection import build_projections, random_projection
from dataworth.store.reader import open_store


def mixed_rows(vocab: int, n: int = 6, seed: int = 0) -> list[Encoded]:
    """Rows of different lengths with a prompt part (no loss) and a response part."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(4, 14, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        mask = [0] * prompt + [1] * (length - prompt)
        rows.append(Encoded(f"r{i}", ids, mask))
    return rows


def per_sample_grads(model, rows: list[Encoded], names: list[str]) -> dict[str, torch.Tensor]:
    """Reference: ``torch.func.grad`` of each example's summed loss w.r.t. the watched weights, one at a time."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    keys = [f"{n}.weight" for n in names]

    def loss_fn(watched, row):
        batch = collate([row], [0], pad_id=0)
        out = functional_call(model, {**params, **watched}, (batch.input_ids,), {"attention_mask": batch.attention_mask})
        return example_losses(out.logits, batch).sum()

    out = {k: [] for k in keys}
    for row in rows:
        g = grad(loss_fn)({k: params[k] for k in keys}, row)
        for k in keys:
            out[k].append(g[k])
    return {k: torch.stack(v) for k, v in out.items()}


def as_out_in(model, name: str, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradient in (d_out × d_in) layout (Conv1D stores its weight transposed)."""
    module = dict(model.named_modules())[name]
    return g if isinstance(module, torch.nn.Linear) else g.transpose(-1, -2)


def rows_for(model, rows, kind="identity", modules="all", batch_size=4, rank=4, seed=0):
    chosen = select_modules(model, modules)
    projs = build_projections(chosen, kind, rank, rank, seed)
    with Extractor(model, chosen, projs, torch.device("cpu"), kind=kind) as ex:
        out, losses, _ = encoded_rows_for(ex, rows, pad_id=0, batch_size=batch_size, token_budget=None)
    return chosen, projs, out, losses


@pytest.mark.parametrize("builder", [build_llama, build_gpt2, build_neox], ids=["llama", "gpt2", "neox"])
def test_identity_rows_equal_torch_func_per_sample_gradients(builder):
    model = builder(60)
    rows = mixed_rows(60)
    chosen, _, got, losses = rows_for(model, rows, "identity", batch_size=4)
    names = [n for n, _ in chosen]
    ref = per_sample_grads(model, rows, names)
    offset = 0
    for name in names:
        g = as_out_in(model, name, ref[f"{name}.weight"])
        size = g[0].numel()
        np.testing.assert_allclose(got[:, offset:offset + size], g.reshape(len(rows), -1).numpy(), rtol=1e-4, atol=1e-6)
        offset += size
    assert offset == got.shape[1]
    # weights are untouched and requires_grad restored
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_random_rows_equal_projected_exact_gradient():
    model = build_llama(60)
    rows = mixed_rows(60, seed=1)
    chosen, projs, got, _ = rows_for(model, rows, "random", modules="mlp", rank=5, seed=7)
    names = [n for n, _ in chosen]
    ref = per_sample_grads(model, rows, names)
    offset = 0
    for name in names:
        p = projs[name]
        want = p.p_out @ ref[f"{name}.weight"] @ p.p_in.T  # P_out G P_inᵀ
        size = p.k_out * p.k_in
        np.testing.assert_allclose(got[:, offset:offset + size], want.reshape(len(rows), -1).numpy(), rtol=1e-4, atol=1e-6)
        offset += size


def test_rows_do_not_depend_on_batch_size_or_neighbours():
    """Eager attention with right padding is batch-invariant; rows of batch size 1 and 8 agree."""
    model = build_llama(60)
    rows = mixed_rows(60, n=8, seed=2)
    _, _, one, l1 = rows_for(model, rows, "random", batch_size=1)
    _, _, eight, l8 = rows_for(model, rows, "random", batch_size=8)
    np.testing.assert_allclose(one, eight, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(l1, l8, rtol=1e-5)


def test_padding_tokens_contribute_exactly_zero():
    model = build_llama(60)
    row = mixed_rows(60, n=1, seed=3)[0]
    long = Encoded("long", [5] * 20, [1] * 20)
    _, _, alone, _ = rows_for(model, [row], "identity", batch_size=1)
    _, _, padded, _ = rows_for(model, [row, long], "identity", batch_size=2)
    np.testing.assert_allclose(alone[0], padded[0], rtol=1e-4, atol=1e-6)


def test_random_projection_is_regenerated_deterministically():
    a = random_projection("model.layers.0.mlp.up_proj", 32, 64, 8, 8, seed=3)
    b = random_projection("model.layers.0.mlp.up_proj", 32, 64, 8, 8, seed=3)
    c = random_projection("model.layers.1.mlp.up_proj", 32, 64, 8, 8, seed=3)
    assert torch.equal(a.p_in, b.p_in) and torch.equal(a.p_out, b.p_out)
    assert not torch.equal(a.p_in, c.p_in)


def test_rank_above_layer_size_is_clamped():
    p = random_projection("m", 16, 8, 64, 64, seed=0)
    assert (p.k_in, p.k_out) == (16, 8)


def test_unknown_module_spec_lists_available_names():
    from dataworth.errors import InputError

    with pytest.raises(InputError, match="available: .*q_proj"):
        select_modules(build_llama(60), "no_such_layer")


# ---------------------------------------------------------------------------------------------- the store

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama saved as a normal HF directory, plus a JSONL dataset of prompt/response rows."""
    root = tmp_path_factory.mktemp("extract")
    model = build_llama(len(tiny_tokenizer), seed=5)
    model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    lines = [
        '{"id": "a%d", "prompt": "Alice Smith was born in", "response": " Paris number %d."}' % (i, i)
        if i % 2 else '{"id": "b%d", "text": "Bob Jones studied physics at Oxford %s"}' % (i, "and more " * (i % 5))
        for i in range(23)
    ]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _config(root, out, **kw):
    base = dict(model=str(root / "model"), data=str(root / "data.jsonl"), out=str(out), modules="mlp",
                projection="random", rank_in=4, rank_out=3, seed=1, dtype="float32", batch_size=4, shard_rows=5,
                device="cpu")
    base.update(kw)
    return ExtractConfig(**base)


def test_store_rows_equal_in_memory_rows_and_kfac_factors_match_formula(model_dir, tmp_path):
    from dataworth.data.encode import encode_rows
    from dataworth.data.rows import load_rows
    from dataworth.model.load import load_model

    store = extract(_config(model_dir, tmp_path / "s"), progress=False)
    loaded = load_model(str(model_dir / "model"), device="cpu")
    encoded, _ = encode_rows(load_rows(str(model_dir / "data.jsonl")), loaded.tokenizer, max_length=512)
    chosen, projs, want, losses = rows_for(loaded.model, encoded, "random", modules="mlp", batch_size=3, rank=4, seed=1)
    # rank_out differs from rank_in in the config: rebuild with the store's own projections
    from dataworth.gradients.queries import store_extractor

    with store_extractor(store, loaded.model) as ex:
        want, losses, _ = encoded_rows_for(ex, encoded, pad_id=0, batch_size=3, token_budget=None)
    np.testing.assert_allclose(store.matrix(), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(store.loss, losses, rtol=1e-6)
    assert store.ids == [e.id for e in encoded]
    assert len(store.manifest["shards"]) == 5  # 23 rows / 5 per shard
    # KFAC factors: A = (1/T) Σ_t a aᵀ over real tokens, S = (1/N) Σ_n Σ_t s sᵀ — recompute by hand
    factors = store.load_tensors("curvature/kfac_factors.safetensors")
    name = store.modules[0].name
    module = dict(loaded.model.named_modules())[name]
    p = ex.projections[name]
    acts, outs = [], []

    def keep(m, inputs, output):
        acts.append(inputs[0].detach())
        output.register_hook(outs.append)

    h1 = module.register_forward_hook(keep)
    try:
        for e in encoded:
            batch = collate([e], [0], pad_id=0)
            out = loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            example_losses(out.logits, batch).sum().backward()
    finally:
        h1.remove()
    a = torch.cat([x[0] @ p.p_in.T for x in acts]).double()
    s = torch.cat([d[0] @ p.p_out.T for d in outs]).double()
    torch.testing.assert_close(factors[f"{name}.A"], a.T @ a / a.shape[0], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(factors[f"{name}.S"], s.T @ s / len(encoded), rtol=1e-5, atol=1e-9)


KILL_SCRIPT = """
import os, signal, sys
import dataworth.store.writer as st
from dataworth.gradients.extract import ExtractConfig, extract
calls = {"n": 0}
real = st._write_parquet
def killing(path, table):
    calls["n"] += 1
    if calls["n"] == int(sys.argv[2]):  # shard .npy of this shard is on disk, its meta and manifest are not
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, table)
st._write_parquet = killing
cfg = ExtractConfig(**__import__("json").loads(sys.argv[1]))
extract(cfg, progress=False)
"""


def test_sigkill_mid_run_then_resume_is_byte_identical(model_dir, tmp_path):
    import json

    def run(out, kill_at):
        cfg = _config(model_dir, out, dtype="bfloat16").__dict__
        return subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg), str(kill_at)],
                              capture_output=True, text=True, timeout=300)

    killed = run(tmp_path / "killed", kill_at=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (tmp_path / "killed" / "shards" / "00002.npy").exists()  # half-written shard left behind
    assert run(tmp_path / "killed", kill_at=10**6).returncode == 0  # resume with the same command
    assert run(tmp_path / "clean", kill_at=10**6).returncode == 0

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a, b = files(tmp_path / "killed"), files(tmp_path / "clean")
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


def test_pca_projection_is_orthonormal_top_eigenvectors_of_stored_covariances(model_dir, tmp_path):
    from dataworth.gradients.queries import store_extractor
    from dataworth.model.load import load_model

    store = extract(_config(model_dir, tmp_path / "pca", projection="pca", rank_in=3, rank_out=2), progress=False)
    full = store.load_tensors("covariance/full.safetensors")
    model = load_model(str(model_dir / "model"), device="cpu").model
    with store_extractor(store, model) as ex:
        projections = ex.projections
    for name, p in projections.items():
        for mat, cov in ((p.p_in, full[f"{name}.A"]), (p.p_out, full[f"{name}.S"])):
            mat = mat.double()
            k = mat.shape[0]
            torch.testing.assert_close(mat @ mat.T, torch.eye(k, dtype=torch.float64), atol=1e-5, rtol=0)
            top = torch.linalg.eigvalsh(cov).flip(0)[:k]
            # rows are eigenvectors with the top-k eigenvalues: cov Pᵀ = Pᵀ diag(top)
            torch.testing.assert_close(cov @ mat.T, mat.T * top, atol=1e-5 * float(top[0]), rtol=1e-4)
    # and the stored rows equal the in-memory rows under that projection
    assert store.manifest["projection"]["kind"] == "pca"


def test_whitened_projection_rows_are_the_exact_gradients_under_a_kfac_whitened_random_map(model_dir, tmp_path):
    """``whitened``: ``P (C + λI) Pᵀ = R Rᵀ`` for the stored full covariances (so ``P = R (C + λI)^{-1/2}``),
    and every stored row is ``P_out G P_inᵀ`` of the exact per-example gradient (from an identity store)."""
    from dataworth.gradients.projection import (
        WHITEN_DAMPING_FRACTION,
        random_matrix,
        seed_for,
    )
    from dataworth.gradients.queries import store_extractor
    from dataworth.model.load import load_model

    store = extract(_config(model_dir, tmp_path / "w", projection="whitened", rank_in=3, rank_out=2), progress=False)
    exact = extract(_config(model_dir, tmp_path / "x", projection="identity"), progress=False)
    assert store.manifest["projection"]["whiten_damping"] == WHITEN_DAMPING_FRACTION
    full = store.load_tensors("covariance/full.safetensors")
    model = load_model(str(model_dir / "model"), device="cpu").model
    with store_extractor(store, model) as ex:  # regenerated from the manifest: digest must match
        projections = ex.projections
    rows = store.read_rows(0, store.rows).astype(np.float64)
    exact_rows = exact.read_rows(0, exact.rows).astype(np.float64)
    for spec, xspec in zip(store.modules, exact.modules):
        p = projections[spec.name]
        for side, mat, cov in (("in", p.p_in, full[f"{spec.name}.A"]), ("out", p.p_out, full[f"{spec.name}.S"])):
            cov = cov.double()
            lam = WHITEN_DAMPING_FRACTION * float(torch.linalg.eigvalsh(cov).clamp_min(0).mean())
            r = random_matrix(mat.shape[0], cov.shape[0], seed_for(1, spec.name, side)).double()
            lhs = mat.double() @ (cov + lam * torch.eye(cov.shape[0], dtype=torch.float64)) @ mat.double().T
            torch.testing.assert_close(lhs, r @ r.T, atol=1e-4 * float((r @ r.T).abs().max()), rtol=1e-4)
        g = torch.from_numpy(exact_rows[:, xspec.offset:xspec.offset + xspec.size]).reshape(-1, p.d_out, p.d_in)
        want = (p.p_out.double() @ g @ p.p_in.double().T).reshape(g.shape[0], -1)
        got = torch.from_numpy(rows[:, spec.offset:spec.offset + spec.size])
        torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=1e-3)


def test_store_for_another_configuration_is_refused(model_dir, tmp_path):
    from dataworth.errors import InputError

    extract(_config(model_dir, tmp_path / "s"), progress=False)
    with pytest.raises(InputError, match="overwrite"):
        extract(_config(model_dir, tmp_path / "s", rank_in=5), progress=False)
    store = extract(_config(model_dir, tmp_path / "s", rank_in=5), progress=False, overwrite=True)
    assert store.modules[0].k_in == 5


def _plan_and_peak(args: list[str]) -> tuple[float, float]:
    """Run ``dataworth extract ARGS`` in a child: (the plan's est. peak up to its printed rounding, the measured
    peak), in MiB."""
    import re
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    run = subprocess.run([sys.executable, "-m", "dataworth", "extract", *args], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak > before, "another child peaked higher: run this test on its own"
    value, unit = re.search(r"est\. peak memory ([0-9.]+) (MiB|GiB)", run.stdout + run.stderr).groups()
    scale = 1024 if unit == "GiB" else 1
    return (float(value) + 0.05) * scale, peak / 1024  # + half the printed digit: the plan is rounded


def test_memory_plan_bounds_the_measured_peak_of_an_extraction(model_dir, tmp_path):
    plan, peak = _plan_and_peak(["--model", str(model_dir / "model"), "--data", str(model_dir / "data.jsonl"),
                                 "--out", str(tmp_path / "s"), "--projection", "identity", "--modules", "mlp",
                                 "--shard-rows", "23", "--device", "cpu"])
    assert peak <= plan, (peak, plan)


@pytest.mark.slow
def test_memory_plan_bounds_the_measured_peak_at_smollm2_135m(tmp_path):
    """The issue's case: MLP LoGra-64 of SmolLM2-135M (planned 741 MiB, peaked at 1,903 MiB before the plan
    counted activations, logits and the loaded model)."""
    rows = [{"id": f"d{i}", "text": "The birthplace of Marta Kowalczyk is Tallinn, where she spent her early "
             "childhood. " * (1 + i % 4)} for i in range(24)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    plan, peak = _plan_and_peak(["--model", "smollm2", "--data", str(tmp_path / "rows.jsonl"), "--out",
                                 str(tmp_path / "s"), "--modules", "mlp", "--rank", "64", "--shard-rows", "64",
                                 "--device", "cpu"])
    assert peak <= plan, (peak, plan)


def test_cli_extract_writes_a_store_and_reports_bad_input(model_dir, tmp_path):
    from click.testing import CliRunner

    from dataworth.cli import cli

    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(cli, ["extract", "--model", str(model_dir / "model"), "--data", str(model_dir / "data.jsonl"),
                              "--out", str(out), "--rank", "2", "--modules", "mlp", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (out / "manifest.json").exists() and (out / "ids.parquet").exists()
    res = runner.invoke(cli, ["extract", "--model", str(model_dir / "model"), "--data", str(model_dir / "data.jsonl"),
                              "--out", str(tmp_path / "x"), "--modules", "nothing_matches"])
    assert res.exit_code == 2 and "available" in res.output
    assert "Example" in runner.invoke(cli, ["extract", "--help"]).output


def test_per_token_contributions_sum_to_the_row_score(model_dir, tmp_path):
    from dataworth.data.encode import encode_rows
    from dataworth.data.rows import load_rows
    from dataworth.gradients.queries import token_contributions
    from dataworth.model.load import load_model

    store = extract(_config(model_dir, tmp_path / "tok", dtype="float32"), progress=False)
    loaded = load_model(str(model_dir / "model"), device="cpu")
    encoded, _ = encode_rows(load_rows(str(model_dir / "data.jsonl")), loaded.tokenizer, max_length=512)
    queries = np.random.default_rng(0).standard_normal((3, store.dim)).astype(np.float32)
    contrib = token_contributions(store, loaded.model, loaded.tokenizer, encoded[:4], queries)
    rows = store.matrix()[:4]
    for n, c in enumerate(contrib):
        assert c.shape == (3, len(encoded[n].input_ids))
        np.testing.assert_allclose(c.sum(axis=1), queries @ rows[n], rtol=1e-4, atol=1e-6)


def test_manifest_records_which_tokens_framed_text_rows(model_dir, tmp_path):
    store = extract(_config(model_dir, tmp_path / "s"), progress=False)
    assert store.manifest["config"]["text_format"] == {"start": ["<s>"], "end": ["</s>"]}


def test_chat_model_text_rows_are_extracted_and_re_encoded_with_the_document_delimiter(chatml_tokenizer, tmp_path):
    """bos/eos are <|im_start|>/<|im_end|> (SmolLM2-Instruct's layout): the store's rows use <|endoftext|>, the
    manifest says so, and query gradients of the same rows (re-encoded by gradients.queries) equal the rows."""
    from dataworth.data.encode import data_fingerprint, encode_rows
    from dataworth.data.rows import load_rows
    from dataworth.gradients.queries import query_gradients

    data = tmp_path / "docs.jsonl"
    data.write_text("".join('{"id": "d%d", "text": "Bob Jones studied physics %s"}\n' % (i, "at Oxford " * i)
                            for i in range(5)))
    model = build_llama(len(chatml_tokenizer), seed=3)
    cfg = ExtractConfig(data=str(data), out=str(tmp_path / "s"), modules="mlp", projection="random", rank_in=4,
                        rank_out=3, seed=1, dtype="float32", batch_size=2, shard_rows=4, device="cpu")
    store = extract(cfg, model=model, tokenizer=chatml_tokenizer, progress=False)
    assert store.manifest["config"]["text_format"] == {"start": ["<|endoftext|>"], "end": ["<|endoftext|>"]}
    encoded, _ = encode_rows(load_rows(str(data)), chatml_tokenizer, max_length=512)
    assert store.manifest["data"]["fingerprint"] == data_fingerprint(encoded)
    assert all(e.input_ids[0] == e.input_ids[-1] == chatml_tokenizer.convert_tokens_to_ids("<|endoftext|>")
               for e in encoded)
    again = query_gradients(store, model, chatml_tokenizer, load_rows(str(data)), measure_end_token=True)
    np.testing.assert_allclose(again, store.matrix(), rtol=1e-4, atol=1e-6)


def test_query_measurement_leaves_out_the_appended_end_token(tiny_tokenizer):
    from dataworth.data.encode import without_end_token

    eos = tiny_tokenizer.eos_token_id
    row = Encoded("q", [1, 5, 6, 7, eos], [0, 0, 1, 1, 1])
    assert without_end_token(row, tiny_tokenizer).loss_mask == [0, 0, 1, 1, 0]
    only_eos = Encoded("q", [1, 5, eos], [0, 0, 1])  # nothing else to measure: keep it
    assert without_end_token(only_eos, tiny_tokenizer).loss_mask == [0, 0, 1]




def test_a_second_extract_on_a_store_being_written_is_refused_and_touches_nothing(model_dir, tmp_path):
    """Issue 16: two extracts on one ``--out`` raced (the second deleted the first's tmp files and unlisted
    shards). While another process holds the store's writer lock, extract — even with ``--overwrite`` — is
    refused with one line naming that process; once it is gone, its lock is taken over."""
    from click.testing import CliRunner

    from dataworth.cli import cli

    out = tmp_path / "s"
    extract(_config(model_dir, out), progress=False, stop_after_shards=2)  # a partial store, as if still running
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    with lock_held_by_another_process(out) as pid:
        args = ["extract", "--model", str(model_dir / "model"), "--data", str(model_dir / "data.jsonl"), "--out",
                str(out), "--rank", "2", "--modules", "mlp", "--device", "cpu", "--overwrite"]
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2 and f"pid {pid}" in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
        after = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        assert after == {**before, ".dataworth.lock": f"{pid}\n".encode()}
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert not (out / ".dataworth.lock").exists() and open_store(out).rows == 23


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
                  elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_nonfinite_rows_are_exactly_the_rows_np_isfinite_rejects(rows):
    # float32 extremes (±3.4e38 in every column) must not overflow into a false alarm
    assert np.array_equal(nonfinite_rows(rows), ~np.isfinite(rows).all(axis=1))
    big = np.full((2, 5000), np.finfo(np.float32).max, dtype=np.float32)
    big[1, 7] = np.inf
    assert nonfinite_rows(big).tolist() == [False, True]
