"""The CUDA paths give what the CPU paths give: exact per-example gradients, the same store (bit-identical
between CUDA runs, whether shards are written in the background or not), the same scores, and a working
train → generate → extract → score run.

Skipped without a GPU (CI has none); on a GPU machine: ``python -m pytest tests/test_cuda.py``.
Float32 matmuls on CUDA may differ from CPU in the last bits (other kernels and summation orders), so CPU
comparisons use rtol 1e-4; runs on the same device are compared byte for byte (DESIGN: determinism).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORPUS, build_gpt2, build_llama
from test_extract import as_out_in, mixed_rows, per_sample_grads

from dataworth.gradients.extract import (
    ExtractConfig,
    Extractor,
    encoded_rows_for,
    extract,
)
from dataworth.gradients.modules import select_modules
from dataworth.gradients.projection import build_projections

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("builder", [build_llama, build_gpt2], ids=["llama", "gpt2"])
def test_cuda_identity_rows_equal_torch_func_per_sample_gradients(builder):
    model = builder(60)
    rows = mixed_rows(60)
    on_gpu = copy.deepcopy(model).cuda()
    chosen = select_modules(on_gpu, "all")
    projs = build_projections(chosen, "identity", 4, 4, 0)
    with Extractor(on_gpu, chosen, projs, torch.device("cuda"), kind="identity") as ex:
        got, _, _ = encoded_rows_for(ex, rows, pad_id=0, batch_size=4, token_budget=None)
    names = [n for n, _ in chosen]
    ref = per_sample_grads(model, rows, names)  # on CPU
    offset = 0
    for name in names:
        g = as_out_in(model, name, ref[f"{name}.weight"])
        size = g[0].numel()
        np.testing.assert_allclose(got[:, offset:offset + size], g.reshape(len(rows), -1).numpy(),
                                   rtol=1e-4, atol=1e-5)
        offset += size
    assert offset == got.shape[1]


def test_cuda_bf16_autocast_rows_are_close_to_float32_rows():
    model = build_llama(60, seed=3).cuda()
    rows = mixed_rows(60, n=8, seed=4)
    chosen = select_modules(model, "mlp")
    projs = build_projections(chosen, "random", 8, 8, 0)
    out = {}
    for autocast in ("none", "bf16"):
        with Extractor(model, chosen, projs, torch.device("cuda"), kind="random", autocast=autocast) as ex:
            out[autocast], _, _ = encoded_rows_for(ex, rows, 0, 4, None)
    rel = np.linalg.norm(out["bf16"] - out["none"]) / np.linalg.norm(out["none"])
    assert 0 < rel < 0.05


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama directory, 23 mixed training rows and 3 prompt/response queries."""
    root = tmp_path_factory.mktemp("cuda")
    build_llama(len(tiny_tokenizer), seed=5).save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    rows = [{"id": f"r{i}", "text": f"{CORPUS[i % len(CORPUS)]} Row {i}."} if i % 2 else
            {"id": f"r{i}", "prompt": f"Alice {i} was born in", "response": " Paris" + " again" * (i % 3)}
            for i in range(23)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    queries = [{"id": f"q{i}", "prompt": "Alice Smith was born in", "response": " Paris" * (i + 1)} for i in range(3)]
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    return root


def _config(root: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(model=str(root / "model"), data=str(root / "data.jsonl"), out=str(out), modules="mlp",
                projection="random", rank_in=4, rank_out=3, seed=1, dtype="float32", batch_size=4, shard_rows=5)
    return ExtractConfig(**{**base, **kw})


def test_cuda_store_is_bit_identical_across_runs_and_writers_and_equals_the_cpu_store(world, tmp_path):
    background = extract(_config(world, tmp_path / "bg", device="cuda"), progress=False)  # async on CUDA
    inline = extract(_config(world, tmp_path / "inline", device="cuda", async_write=False), progress=False)
    a, b = _files(background.path), _files(inline.path)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    cpu = extract(_config(world, tmp_path / "cpu", device="cpu"), progress=False)
    assert background.ids == cpu.ids
    np.testing.assert_allclose(background.matrix(), cpu.matrix(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(background.loss, cpu.loss, rtol=1e-5)
    got, want = (s.load_tensors("curvature/kfac_factors.safetensors") for s in (background, cpu))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("mode", ["dot", "cosine"])
def test_cuda_query_gradients_give_the_cpu_scores(world, tmp_path, mode):
    import dataworth as dw

    store = extract(_config(world, tmp_path / "s", device="cpu"), progress=False)
    dw.fit(store.path, "ekfac")
    got = dw.score(store.path, world / "queries.jsonl", mode=mode, curvature="ekfac", top_k=5, full=True,
                   device="cuda")
    want = dw.score(store.path, world / "queries.jsonl", mode=mode, curvature="ekfac", top_k=5, full=True,
                    device="cpu")
    scale = np.abs(want.matrix).max()
    np.testing.assert_allclose(got.matrix, want.matrix, rtol=1e-3, atol=1e-5 * scale)


def test_cuda_train_generate_extract_score_runs_end_to_end(tmp_path):
    """The CLI on CUDA through every stage of a small bios world, and training is repeatable on the device."""
    from click.testing import CliRunner
    from safetensors.numpy import load_file

    import dataworth as dw
    from dataworth.cli import cli
    from dataworth.data.worlds import builtin_rows

    def run(*args: str):
        result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    world = "builtin:bios?people=4&distractors=2"
    for name in ("m1", "m2"):
        run("train", "--data", world, "--out", str(tmp_path / name), "--preset", "tiny-test", "--epochs", "2",
            "--device", "cuda")
    first, second = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("m1", "m2"))
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)
    prompts = [{"id": q["id"], "prompt": q["prompt"]} for q in builtin_rows("bios", "queries", {"people": "4"})]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in prompts) + "\n")
    run("generate", "--model", str(tmp_path / "m1"), "--prompts", str(tmp_path / "prompts.jsonl"),
        "--out", str(tmp_path / "gen.jsonl"), "--max-new-tokens", "8", "--device", "cuda")
    run("extract", "--model", str(tmp_path / "m1"), "--data", world, "--out", str(tmp_path / "store"),
        "--modules", "mlp", "--rank", "8", "--device", "cuda")
    run("fit", "--store", str(tmp_path / "store"), "--curvature", "ekfac")
    run("score", "--store", str(tmp_path / "store"), "--queries", str(tmp_path / "gen.jsonl"),
        "--out", str(tmp_path / "scores"), "--device", "cuda")
    scores = dw.load_scores(tmp_path / "scores")
    assert len(scores.query_ids) == len(prompts) == 20
    assert set(scores.top_k()["train_row"]) <= set(range(4 * 3 + 2))
