"""LESS selection and the learned pre-filter: each formula against a hand computation, every bad input, and a
tiny end-to-end run of `dataworth select run` (base = the conftest tiny Llama, pool = 200 instruct rows)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dataworth.errors import InputError
from dataworth.gradients.projection import DenseProjector
from dataworth.model.optimizer import AdamState, adam_update
from dataworth.selection.less import (
    SelectConfig,
    aggregate_scores,
    check_checkpoints,
    cosine_matrix,
    list_tasks,
    load_task_rows,
    rank_rows,
    selection_size,
    subtask_labels,
    weighted_cosine,
    write_selection,
)
from dataworth.selection.prefilter import keep_mask, prefilter_metrics, quantile_buckets


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- Adam transform

def _state(m, v, step, betas=(0.9, 0.999), eps=1e-8) -> AdamState:
    return AdamState(torch.tensor(m), torch.tensor(v), torch.full((len(m),), float(step), dtype=torch.float64),
                     betas, eps)


def test_adam_update_paper_convention_equals_hand_computation():
    g, m, v, step = [0.5, -2.0, 0.0], [0.1, 0.2, -0.3], [0.01, 0.04, 0.09], 3
    b1, b2, eps = 0.9, 0.999, 1e-8
    t = step + 1  # the step this gradient would make
    expected = []
    for gi, mi, vi in zip(g, m, v):
        m1 = b1 * mi + (1 - b1) * gi
        v1 = b2 * vi + (1 - b2) * gi * gi
        expected.append((m1 / (1 - b1 ** t)) / (math.sqrt(v1 / (1 - b2 ** t)) + eps))
    got = adam_update(torch.tensor([g]), _state(m, v, step), "paper")
    assert got.shape == (1, 3)
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=1e-6)
    # first element worked out by hand: m' = 0.14, v' = 0.01024, t = 4
    assert got[0, 0].item() == pytest.approx((0.14 / 0.3439) / math.sqrt(0.01024 / (1 - 0.999 ** 4)), rel=1e-6)


def test_adam_update_less_code_convention_equals_hand_computation():
    # LESS repository: m' / sqrt(v' + eps), no bias correction
    got = adam_update(torch.tensor([[0.5, -2.0]]), _state([0.1, 0.2], [0.01, 0.04], 7), "less_code")
    np.testing.assert_allclose(got[0].numpy(), [0.14 / math.sqrt(0.01024 + 1e-8),
                                                (0.18 - 0.2) / math.sqrt(0.999 * 0.04 + 0.001 * 4 + 1e-8)],
                               rtol=1e-6)


def test_adam_update_rows_are_independent_of_batch():
    state = _state([0.1, 0.2], [0.01, 0.04], 2)
    batch = torch.tensor([[0.5, -2.0], [1.0, 3.0]])
    together = adam_update(batch, state)
    alone = torch.cat([adam_update(batch[i:i + 1], state) for i in range(2)])
    assert torch.equal(together, alone)


def test_dense_projector_equals_dense_project():
    from dataworth.gradients.projection import dense_project

    flat = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(DenseProjector(5000, 16, seed=3)(flat), dense_project(flat, 3, 16))


# ---------------------------------------------------------------------------------------------- matching

def test_cosine_matrix_equals_hand_values_and_zero_rows_score_zero():
    train = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    valid = np.array([[0.0, 2.0], [3.0, 0.0]])
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(cosine_matrix(train, valid), [[0, 1], [s, s], [0, 0]], atol=1e-12)


def test_weighted_cosine_sums_learning_rate_times_cosine_over_checkpoints():
    t1, v1 = np.array([[1.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 1.0]])  # cos = [1, 0]
    t2, v2 = np.array([[1.0, 1.0]]), np.array([[1.0, 0.0], [-1.0, -1.0]])  # cos = [1/√2, -1]
    got = weighted_cosine([t1, t2], [v1, v2], [0.5, 0.25])
    np.testing.assert_allclose(got, [[0.5 + 0.25 / math.sqrt(2), -0.25]])


def test_aggregate_is_mean_within_subtask_then_max_across_like_less():
    # 2 pool rows x 5 validation rows; subtasks a, a, b, b, b
    pairs = np.array([[0.9, 0.1, 0.2, 0.2, 0.2],
                      [0.3, 0.3, 0.6, 0.0, 0.0]])
    subtasks = ["a", "a", "b", "b", "b"]
    scores, names, per = aggregate_scores(pairs, subtasks)  # defaults: mean, max
    assert names == ["a", "b"]
    np.testing.assert_allclose(per, [[0.5, 0.2], [0.3, 0.2]])
    np.testing.assert_allclose(scores, [0.5, 0.3])
    # the within-subtask reduction is selectable (the seed compares all three) ...
    np.testing.assert_allclose(aggregate_scores(pairs, subtasks, "max")[0], [0.9, 0.6])
    np.testing.assert_allclose(aggregate_scores(pairs, subtasks, "min")[0], [0.2, 0.3])
    # ... and so is the reduction across subtasks
    np.testing.assert_allclose(aggregate_scores(pairs, subtasks, "mean", "mean")[0], [0.35, 0.25])
    np.testing.assert_allclose(aggregate_scores(pairs, subtasks, "mean", "min")[0], [0.2, 0.2])
    # LESS's reshape(N, n_subtasks, -1).mean(-1).max(-1) on equal-size, grouped subtasks is the same thing
    grouped = np.array([[1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_allclose(aggregate_scores(grouped, ["x", "x", "y", "y"])[0],
                               grouped.reshape(1, 2, -1).mean(-1).max(-1))


def test_rank_rows_is_descending_with_ties_in_pool_order():
    assert rank_rows(np.array([0.1, 0.5, 0.5, -1.0, 0.5])).tolist() == [1, 2, 4, 0, 3]


# ---------------------------------------------------------------------------------------------- selection size

def test_selection_size_is_floor_of_exact_percent():
    assert selection_size(2000, 5) == 100  # 0.05 * 2000 in binary floating point would be 100.000...01
    assert selection_size(1000, 5) == 50
    assert selection_size(39, 5) == 1  # floor(1.95)
    assert selection_size(200, 2.5) == 5
    assert selection_size(7, 100) == 7
    assert selection_size(10, None, n=10) == 10


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10**6), hundredths=st.integers(1, 10_000))
def test_selection_size_matches_integer_arithmetic(n, hundredths):
    percent = hundredths / 100
    exact = n * hundredths // 10_000
    if exact >= 1:
        assert selection_size(n, percent) == exact
    else:
        with pytest.raises(InputError, match="smaller than one selected row"):
            selection_size(n, percent)


def test_pool_smaller_than_selection_is_input_error():
    with pytest.raises(InputError, match="--n: selecting 50 rows but the pool has only 20"):
        selection_size(20, None, n=50)
    with pytest.raises(InputError, match="5 % of a pool of 10 rows is 0 rows"):
        selection_size(10, 5)
    with pytest.raises(InputError, match="--percent"):
        SelectConfig(percent=150)


# ---------------------------------------------------------------------------------------------- data loading

OPEN_INSTRUCT = {
    "dolly": [{"dataset": "dolly", "id": "dolly_0", "messages": [
        {"role": "user", "content": "What is a dolly?"}, {"role": "assistant", "content": "A cart."}]}],
    "flan_v2": [{"dataset": "flan_v2", "id": "flan_v2_0", "messages": [
        {"role": "user", "content": "Translate 'chat' to English."}, {"role": "assistant", "content": "cat"}]}],
    "cot": [{"dataset": "cot", "id": "cot_0", "messages": [
        {"role": "user", "content": "2+2? Think step by step."},
        {"role": "assistant", "content": "2 and 2 make 4. The answer is 4."}]}],
    "oasst1": [{"dataset": "oasst1", "id": "oasst1_0", "messages": [
        {"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye!"}]}],
}


def test_open_instruct_pool_directory_and_per_task_validation_files(tmp_path):
    from dataworth.data.rows import load_rows

    for name, rows in OPEN_INSTRUCT.items():
        write_jsonl(tmp_path / "train" / f"{name}_data.jsonl", rows)
    pool = load_rows(str(tmp_path / "train"))
    assert [r.id for r in pool] == ["cot_0", "dolly_0", "flan_v2_0", "oasst1_0"]  # sorted file order
    assert all(r.kind == "messages" for r in pool)
    assert pool[3].data == OPEN_INSTRUCT["oasst1"][0]  # every original field kept
    # validation: one file per task (LESS ships e.g. mmlu / bbh / tydiqa), subtask from the row
    valid = tmp_path / "valid"
    write_jsonl(valid / "mmlu.jsonl", [
        {"id": f"m{i}", "subtask": sub, "messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": "A"}]}
        for i, sub in enumerate(["algebra", "algebra", "anatomy"])])
    write_jsonl(valid / "tydiqa.jsonl", [{"id": "t0", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    assert list_tasks(str(valid)) == ["mmlu", "tydiqa"]
    mmlu = load_task_rows(str(valid), "mmlu")
    assert [r.id for r in mmlu] == ["m0", "m1", "m2"]
    assert subtask_labels(mmlu, "mmlu") == ["algebra", "algebra", "anatomy"]
    assert subtask_labels(load_task_rows(str(valid), "tydiqa"), "tydiqa") == ["tydiqa"]
    # a single file with a task field per row works too
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [
        {"id": "a", "task": "x", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"id": "b", "task": "y", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    assert [r.id for r in load_task_rows(str(mixed), "y")] == ["b"]
    assert [r.id for r in load_task_rows("builtin:instruct:valid?pool=200&valid_per_subtask=2", "units")][:1]


def test_task_without_validation_examples_is_input_error(tmp_path):
    write_jsonl(tmp_path / "valid" / "mmlu.jsonl", [{"id": "m0", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    with pytest.raises(InputError, match=r"no examples for task 'bbh'.*tasks here: mmlu"):
        load_task_rows(str(tmp_path / "valid"), "bbh")
    with pytest.raises(InputError, match=r"no examples for task 'poetry'.*tasks present: .*units"):
        load_task_rows("builtin:instruct:valid?pool=200&valid_per_subtask=2", "poetry")


# ---------------------------------------------------------------------------------------------- writing the selection

def test_selection_writes_original_rows_with_score_best_first_and_full_table(tmp_path):
    from dataworth.data.rows import load_rows

    rows = [{"dataset": "dolly", "id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                                            {"role": "assistant", "content": f"a{i}"}]}
            for i in range(40)]
    rows.append({"messages": [{"role": "user", "content": "no id"}, {"role": "assistant", "content": "x"}]})
    pool = load_rows(str(write_jsonl(tmp_path / "pool.jsonl", rows)))
    scores = np.array([float(i % 7) for i in range(41)])  # many ties
    per = np.stack([scores, -scores], axis=1)
    summary = write_selection(pool, scores, tmp_path / "sel", percent=5, per_subtask=per, subtasks=["s1", "s2"])
    assert summary["k"] == 2  # floor(5 % of 41) = 2
    written = [json.loads(line) for line in (tmp_path / "sel" / "top_p5.jsonl").read_text().splitlines()]
    expected_order = sorted(range(41), key=lambda i: (-scores[i], i))[:2]  # best first, ties by pool order
    assert [w["id"] for w in written] == [f"r{i}" for i in expected_order] == ["r6", "r13"]
    for w, i in zip(written, expected_order):
        assert w == {**rows[i], "score": scores[i]}
    table = pd.read_parquet(tmp_path / "sel" / "scores.parquet")
    assert table["id"].tolist() == [r.id for r in pool]
    np.testing.assert_array_equal(table["score"], scores)
    assert sorted(table["rank"]) == list(range(1, 42))
    assert table.loc[table["selected"], "id"].tolist() == ["r6", "r13"]
    np.testing.assert_array_equal(table["subtask:s2"], -scores)
    # the row without an id gets its positional id added; nothing else changes
    write_selection(pool, -np.arange(41.0)[::-1], tmp_path / "sel2", percent=2.5)
    only = json.loads((tmp_path / "sel2" / "top_p2.5.jsonl").read_text())
    assert only == {"id": "40", **rows[40], "score": 0.0}


# ---------------------------------------------------------------------------------------------- pre-filter metrics

def test_prefilter_metrics_on_a_synthetic_case():
    n = 20
    true = np.arange(n, dtype=float)  # rows 19, 18 are the true top 10 %
    labelled = np.zeros(n, dtype=bool)
    labelled[[0, 19]] = True  # one true-top row labelled
    predicted = true.copy()
    predicted[18] = -5.0  # the predictor misses row 18 ...
    kept = keep_mask(predicted, labelled, keep_fraction=0.2)  # ... keeps the 4 best-predicted unlabelled
    assert np.flatnonzero(kept).tolist() == [14, 15, 16, 17]
    m = prefilter_metrics(true, predicted, labelled, kept, percent=10, buckets=2,
                          seconds_cheap_per_row=0.1, seconds_gradient_per_row=1.0)
    assert m["top_k"] == 2
    assert m["recall"] == 0.5  # row 19 survives (labelled), row 18 does not
    assert m["recall_unlabelled"] == 0.0
    assert m["recall_random"] == pytest.approx(6 / 20)
    assert m["gradient_passes_saved"] == pytest.approx(1 - 6 / 20)
    assert m["compute_saved"] == pytest.approx(1 - (0.1 * 20 + 1.0 * 6) / (1.0 * 20))
    y, p = true[~labelled], predicted[~labelled]
    assert m["r2"] == pytest.approx(1 - ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    # 18 unlabelled rows, 2 buckets of 9: only row 18 (true top half, predicted lowest) moves,
    # pushing row 9 (the best of the bottom half) into the top predicted bucket
    assert m["bucket_accuracy"] == pytest.approx(16 / 18)


def test_quantile_buckets_are_equal_count_by_rank():
    assert quantile_buckets(np.array([5.0, 1.0, 3.0, 2.0, 4.0, 0.0]), 3).tolist() == [2, 0, 1, 1, 2, 0]


# ---------------------------------------------------------------------------------------------- checkpoints

def _fake_checkpoint(path: Path, r: int = 8, optimizer: bool = True, params=("a.lora_A.default.weight",)) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 16, "target_modules": ["q_proj"],
                                                          "base_model_name_or_path": "base"}))
    (path / "trainer_state.json").write_text(json.dumps({"avg_lr": 1e-3}))
    if optimizer:
        (path / "optimizer.safetensors").write_bytes(b"")
        (path / "optimizer.json").write_text(json.dumps({"params": list(params)}))
    return path


def test_checkpoint_without_optimizer_state_is_clear_input_error(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "epoch-1", optimizer=False)
    with pytest.raises(InputError, match=r"no optimizer state.*Adam-preconditioned features need.*--gradient sgd"):
        check_checkpoints([ckpt], "adam")
    check_checkpoints([ckpt], "sgd")  # plain SGD features only when asked


def test_mismatched_lora_configurations_between_checkpoints_is_input_error(tmp_path):
    a = _fake_checkpoint(tmp_path / "epoch-1", r=8)
    b = _fake_checkpoint(tmp_path / "epoch-2", r=4)
    with pytest.raises(InputError, match=r"epoch-2: LoRA configuration field 'r' is 4 but .*epoch-1 has 8"):
        check_checkpoints([a, b])
    c = _fake_checkpoint(tmp_path / "epoch-3", params=("other.lora_A.default.weight",))
    with pytest.raises(InputError, match="mismatched LoRA configurations"):
        check_checkpoints([a, c])
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="not a LoRA checkpoint"):
        check_checkpoints([tmp_path / "plain"])


# ---------------------------------------------------------------------------------------------- end to end

TASKS = ("units", "arithmetic")


def _small_world(root: Path, tiny_tokenizer, tiny_llama) -> Path:
    """Base model (conftest tiny Llama, 32 dims) + a 60-row instruct pool + per-task valid/test files."""
    from dataworth.data.worlds.instruct import InstructConfig, make_instruct

    tiny_llama.save_pretrained(root / "base")
    tiny_tokenizer.save_pretrained(root / "base")
    world = make_instruct(InstructConfig(pool=200, valid_per_subtask=2, test_per_task=4))
    write_jsonl(root / "pool.jsonl", world.rows("train")[:60])
    for split in ("valid", "test"):
        for task in TASKS:
            write_jsonl(root / split / f"{task}.jsonl", [r for r in world.rows(split) if r["task"] == task])
    return root


def _cli_args(root: Path, run: Path) -> list[str]:
    return ["--run", str(run), "--pool", str(root / "pool.jsonl"), "--base", str(root / "base"),
            "--valid", str(root / "valid"), "--test", str(root / "test"), "--task", "units", "--task", "arithmetic",
            "--warmup-percent", "10", "--warmup-epochs", "2", "--finetune-epochs", "1", "--dense-dim", "64",
            "--lr", "1e-3", "--max-length", "64", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_tokenizer, tiny_llama):
    """Warm-up and features through the Python API, then `dataworth select run` through the CLI on the same
    run directory (it reuses the finished steps: match, select, LoRA on the selection, evaluate)."""
    from click.testing import CliRunner

    from dataworth.cli import cli
    from dataworth.selection.less import features, warmup

    root = _small_world(tmp_path_factory.mktemp("less"), tiny_tokenizer, tiny_llama)
    config = SelectConfig(run=str(root / "run"), pool=str(root / "pool.jsonl"), base=str(root / "base"),
                          valid=str(root / "valid"), test=str(root / "test"), tasks=TASKS, warmup_percent=10,
                          warmup_epochs=2, finetune_epochs=1, dense_dim=64, lr=1e-3, max_length=64, threads=1)
    warmup(config, progress=False)
    features(config, progress=False)
    args = ["select", "run", *_cli_args(root, root / "run"), "--json", str(root / "figures.json")]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root


def test_select_run_end_to_end_writes_selection_scores_and_evaluation(tiny_run):
    from dataworth.selection.less import compute_scores, load_config
    from dataworth.store.reader import open_store

    run = tiny_run / "run"
    figures = json.loads((tiny_run / "figures.json").read_text())
    assert set(figures) == set(TASKS)
    for task in TASKS:
        assert figures[task]["k"] == 3  # floor(5 % of 60)
        assert figures[task]["loss"] > 0 and 0 <= figures[task]["exact_match"] <= 1
        selected = [json.loads(x) for x in (run / "selected" / task / "top_p5.jsonl").read_text().splitlines()]
        table = pd.read_parquet(run / "selected" / task / "scores.parquet")
        truth = compute_scores(load_config(run), task)
        np.testing.assert_allclose(table["score"], truth["scores"])
        # the streamed scores equal the plain formula on whole matrices: max_s mean_{v∈s} Σ_c η̄_c cos
        record = json.loads((run / "features" / "features.json").read_text())
        trains = [open_store(Path(c["features"]) / "pool").matrix() for c in record["checkpoints"]]
        valids = [open_store(Path(c["features"]) / "valid" / task).matrix() for c in record["checkpoints"]]
        pairs = weighted_cosine(trains, valids, [c["avg_lr"] for c in record["checkpoints"]])
        labels = subtask_labels(load_task_rows(str(tiny_run / "valid"), task), task)
        plain = np.max([pairs[:, [lab == s for lab in labels]].mean(1) for s in dict.fromkeys(labels)], axis=0)
        np.testing.assert_allclose(truth["scores"], plain, rtol=1e-12)
        assert [s["id"] for s in selected] == table.sort_values("rank")["id"].tolist()[:3]
        assert (run / "final" / task / "adapter" / "adapter_config.json").is_file()
        assert json.loads((run / "eval" / f"{task}.json").read_text())["eval"]["rows"] == 4
    assert len(list((run / "warmup" / "model" / "checkpoints").glob("epoch-*"))) == 2
    assert len((run / "warmup" / "rows.jsonl").read_text().splitlines()) == 6


@pytest.mark.slow
def test_select_run_from_scratch_through_the_cli(tmp_path, tiny_tokenizer, tiny_llama):
    from click.testing import CliRunner

    from dataworth.cli import cli

    root = _small_world(tmp_path, tiny_tokenizer, tiny_llama)
    result = CliRunner().invoke(cli, ["select", "run", *_cli_args(root, root / "run")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "units: trained on 3 selected rows" in result.output
    assert len(list((root / "run" / "features").glob("ckpt-*/valid/arithmetic/manifest.json"))) == 2


def test_pool_features_equal_autograd_adam_update_of_token_mean_gradient(tiny_run):
    """Store row = dense_project(Adam(∇ of the row's token-mean loss w.r.t. every LoRA weight)), where the
    gradient comes from plain autograd on the row alone and Adam is written out per module."""
    from dataworth.data.batching import collate, example_losses
    from dataworth.data.encode import encode_rows
    from dataworth.data.rows import load_rows
    from dataworth.gradients.projection import dense_project
    from dataworth.model.load import load_model
    from dataworth.model.optimizer import load_optimizer_state
    from dataworth.selection.less import lora_modules
    from dataworth.store.reader import open_store

    run = tiny_run / "run"
    ckpt = run / "warmup" / "model" / "checkpoints" / "epoch-2"
    store = open_store(run / "features" / "ckpt-2" / "pool")
    loaded = load_model(ckpt, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    rows = load_rows(str(tiny_run / "pool.jsonl"))
    encoded, _ = encode_rows(rows[:3], tok, max_length=64)
    states, meta = load_optimizer_state(ckpt)
    (b1, b2), eps = meta["betas"], meta["eps"]
    modules = lora_modules(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for i, enc in enumerate(encoded):
        for _, module in modules:
            module.weight.grad = None
            module.weight.requires_grad_(True)
        batch = collate([enc], [0], tok.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        (example_losses(logits, batch).sum() / enc.n_targets).backward()
        parts = []
        for name, module in modules:
            g = module.weight.grad
            st = states[f"{name}.weight"]
            t = meta["step"][f"{name}.weight"] + 1
            m1 = b1 * st["exp_avg"] + (1 - b1) * g
            v1 = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
            parts.append(((m1 / (1 - b1 ** t)) / ((v1 / (1 - b2 ** t)).sqrt() + eps)).reshape(-1))
        expected = dense_project(torch.cat(parts)[None], 0, 64)[0].numpy()
        np.testing.assert_allclose(store.read_rows(i, i + 1)[0], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_prefilter_on_the_tiny_run_reports_recall_and_compute_saved(tiny_run):
    from dataworth.selection.less import load_config
    from dataworth.selection.prefilter import PrefilterConfig, run_prefilter

    metrics = run_prefilter(load_config(tiny_run / "run"), "units",
                            PrefilterConfig(labelled_fraction=0.3, keep_fraction=0.3, percent=5))
    assert metrics["labelled"] == 18 and metrics["kept"] == 18
    assert 0 <= metrics["recall"] <= 1 and metrics["gradient_passes_saved"] == pytest.approx(0.4)
    assert "compute_saved" in metrics and "r2" in metrics and 0 <= metrics["bucket_accuracy"] <= 1
    assert (tiny_run / "run" / "selected" / "units" / "prefilter.json").is_file()


def test_cli_bad_input_prints_one_line_and_exits_2(tiny_run, tmp_path):
    from click.testing import CliRunner

    from dataworth.cli import cli

    runner = CliRunner()
    result = runner.invoke(cli, ["select", "match", "--run", str(tiny_run / "run"), "--task", "poetry"])
    assert result.exit_code == 2
    assert "no examples for task 'poetry'" in result.output
    result = runner.invoke(cli, ["select", "features", "--run", str(tmp_path / "fresh"), "--pool",
                                 str(tiny_run / "pool.jsonl"), "--valid", str(tiny_run / "valid")])
    assert result.exit_code == 2 and "no warm-up checkpoints" in result.output
    result = runner.invoke(cli, ["select", "warmup", "--run", str(tmp_path / "w"), "--pool",
                                 str(tiny_run / "pool.jsonl"), "--base", str(tiny_run / "base"),
                                 "--warmup-percent", "1"])
    assert result.exit_code == 2 and "smaller than one selected row" in result.output
