"""The real-LLM demo (`dataworth demo --model …`) end to end on a tiny randomly initialised chat model.

SmolLM2 itself takes ~15 minutes (README); here a 2-layer Llama with a ChatML tokenizer runs every stage in
seconds, so CI checks the wiring, the training rows and resumption. It learns nothing, so ``trace_all``.
"""

import json

import pytest
from conftest import build_llama

from dataworth.data.rows import load_rows
from dataworth.demo import (
    LLMDemoConfig,
    names_value,
    run_llm_demo,
    write_llm_training_rows,
)
from dataworth.errors import InputError


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, chatml_tokenizer):
    path = tmp_path_factory.mktemp("chat-model")
    model = build_llama(len(chatml_tokenizer))
    model.generation_config.eos_token_id = chatml_tokenizer.eos_token_id
    model.generation_config.pad_token_id = chatml_tokenizer.pad_token_id
    model.save_pretrained(path)
    chatml_tokenizer.save_pretrained(path)
    return path


def tiny_config(out, model_dir, **overrides) -> LLMDemoConfig:
    fields = dict(out=str(out), model=str(model_dir), people=4, realtext=3, epochs=1, rank=4, lora_r=2,
                  max_new_tokens=6, max_length=96, curvatures=("raw", "ekfac"), trace_all=True)
    return LLMDemoConfig(**(fields | overrides))


@pytest.fixture(scope="module")
def llm_demo(tmp_path_factory, chat_model_dir):
    out = tmp_path_factory.mktemp("llm-demo")
    return run_llm_demo(tiny_config(out, chat_model_dir))


def test_training_rows_hold_questions_for_half_the_people_and_none_for_the_traced_half(tmp_path):
    config = LLMDemoConfig(out=str(tmp_path), people=6, realtext=5)
    path, held_out = write_llm_training_rows(config, tmp_path / "train.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    chat = [r for r in rows if r.get("kind") == "qa"]
    people = {r["person"] for r in rows if r.get("kind") == "bio"}
    assert len(held_out) == 3 and held_out < people
    assert {r["person"] for r in chat} == people - held_out
    assert len(chat) == 5 * 3 and all(r["messages"][1]["content"].startswith(r["person"]) for r in chat)
    assert sum(r.get("kind") == "realtext" for r in rows) == 5
    again, _ = write_llm_training_rows(config, tmp_path / "again.jsonl")
    assert again.read_bytes() == path.read_bytes()


def test_llm_demo_runs_every_stage_and_traces_held_out_questions_to_their_biographies(llm_demo):
    out = llm_demo.out
    for rel in ("model/config.json", "model/adapter/adapter_config.json", "generated.jsonl", "queries.jsonl",
                "store/manifest.json", "scores/topk.parquet", "summary.json"):
        assert (out / rel).exists(), rel
    assert llm_demo.report is not None and llm_demo.report.exists()
    methods = {row["method"] for row in llm_demo.table}
    assert {"raw/cosine", "raw/dot", "ekfac/cosine", "ekfac/dot", "BM25 (prompt+response)", "gold documents"} <= methods
    for row in llm_demo.table:  # tail-patch stepped the unmerged adapter at the last epoch's mean lr
        assert row["tail-patch lr"] > 0 and "avg_lr" in row["tail-patch lr from"], row
        assert {"tail-patch@10", "rivals@10", "rivals_above_gold", "gold_negative"} <= set(row), row
    manifest = json.loads((out / "store/manifest.json").read_text())
    assert all("mlp" in m["name"] for m in manifest["modules"])
    assert manifest["config"]["text_format"] == {"start": ["<|endoftext|>"], "end": ["<|endoftext|>"]}
    train = {r.id: r for r in load_rows(out / "train.jsonl")}
    for q in load_rows(out / "queries.jsonl"):
        assert q.data["gold"], q.id
        for gold in q.data["gold"]:  # gold = that person's biographies stating the asked attribute
            assert train[gold].data["person"] == q.data["person"]
            assert q.data["attribute"] in train[gold].data["facts"]
            assert train[gold].data["kind"] == "bio"


def test_llm_demo_resumes_without_redoing_finished_stages(llm_demo, chat_model_dir):
    shards = sorted(str(p.relative_to(llm_demo.out)) for p in (llm_demo.out / "store/shards").iterdir())
    stamps = {rel: (llm_demo.out / rel).stat().st_mtime_ns
              for rel in ["model/dataworth_train.json", "generated.jsonl", *shards]}
    again = run_llm_demo(tiny_config(llm_demo.out, chat_model_dir))
    assert {rel: (again.out / rel).stat().st_mtime_ns for rel in stamps} == stamps
    assert [r["method"] for r in again.table] == [r["method"] for r in llm_demo.table]


def test_answer_names_the_value_only_as_whole_words():
    assert names_value("Alice Smith was born in Paris.", "Paris")
    assert names_value("On 5 July 1997.", "5 July 1997")
    assert not names_value("She is Parisian.", "Paris")
    assert not names_value("It was 15 July 1997.", "5 July 1997")


def test_llm_demo_refuses_an_unknown_model_and_bad_sizes(tmp_path):
    with pytest.raises(InputError, match="--model"):
        LLMDemoConfig(out=str(tmp_path), model="no-such-model")
    with pytest.raises(InputError, match="--people"):
        LLMDemoConfig(out=str(tmp_path), people=0)
    with pytest.raises(InputError, match="--finetune"):
        LLMDemoConfig(out=str(tmp_path), finetune="qlora")
