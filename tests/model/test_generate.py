"""dataworth.generate: prompts files parse (or fail naming file:line), batched left-padded greedy decoding
equals a plain one-token-at-a-time argmax loop, and the output JSONL has the documented rows."""

from __future__ import annotations

import json
import string

import pytest
import torch
from click.testing import CliRunner
from conftest import build_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from dataworth.cli import cli
from dataworth.data.encode import prompt_token_ids
from dataworth.errors import InputError
from dataworth.model.generate import (
    _until_stop,
    generate,
    generate_token_ids,
    read_prompts,
    stop_token_ids,
)
from dataworth.model.load import load_model

PROMPTS = ["Alice Smith was born in", "What is 2 plus 3?", "Bob", "Reverse the word cat:",
           "The capital of France is Paris. Oxford is a", "hello"]



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("gen-llama")
    build_llama(len(tiny_tokenizer), seed=7).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir, device="cpu")


def reference_greedy(model, prompt_ids: list[int], stops: list[int], max_new_tokens: int) -> list[int]:
    """Obviously correct greedy decoding: recompute the whole sequence each step, take the argmax."""
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token in stops:
                break
            ids.append(token)
            out.append(token)
    return out


def test_batched_greedy_equals_reference_one_by_one(loaded):
    tok = loaded.tokenizer
    prompts = [prompt_token_ids(p, tok) for p in PROMPTS]
    stops = stop_token_ids(tok, loaded.model)
    expected = [reference_greedy(loaded.model, p, stops, 12) for p in prompts]
    for batch_size in (1, 4, len(prompts)):
        got = generate_token_ids(loaded.model, tok, prompts, max_new_tokens=12, batch_size=batch_size)
        assert got == expected, f"batch_size={batch_size}"


def test_stop_tokens_are_eos_and_end_of_turn_markers(loaded, tiny_tokenizer):
    import copy

    assert stop_token_ids(tiny_tokenizer) == [tiny_tokenizer.eos_token_id]
    chat_tok = copy.deepcopy(tiny_tokenizer)
    chat_tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "<|user|>"]})
    assert stop_token_ids(chat_tok) == sorted(
        {chat_tok.eos_token_id, chat_tok.convert_tokens_to_ids("<|im_end|>"), chat_tok.convert_tokens_to_ids("<|user|>")})
    assert _until_stop([5, 6, 2, 7, 2], [2]) == [5, 6]
    assert _until_stop([5, 6], [2]) == [5, 6]
    got = generate_token_ids(loaded.model, loaded.tokenizer, [prompt_token_ids(p, loaded.tokenizer) for p in PROMPTS],
                             max_new_tokens=30, batch_size=6)
    stops = set(stop_token_ids(loaded.tokenizer, loaded.model))
    assert all(not set(ids) & stops and len(ids) <= 30 for ids in got)


def test_generate_writes_documented_rows(loaded, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"p{i}", "prompt": p}) for i, p in enumerate(PROMPTS)) + "\n")
    out = tmp_path / "out" / "gen.jsonl"
    rows = generate(loaded, prompts, out, max_new_tokens=8, batch_size=3)
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(len(PROMPTS))]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert {r["model"] for r in rows} == {f"{loaded.spec}@{loaded.fingerprint[:12]}"}
    assert all(r["model_fingerprint"] == loaded.fingerprint for r in rows)
    tok = loaded.tokenizer
    stops = stop_token_ids(tok, loaded.model)
    for row in rows:
        ids = reference_greedy(loaded.model, prompt_token_ids(row["prompt"], tok), stops, 8)
        assert row["response"] == tok.decode(ids, skip_special_tokens=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["gen.jsonl"]  # no temp file left behind


def test_generate_from_spec_string_and_json_list(model_dir, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Bob", {"prompt": "hello", "id": 7}]))
    rows = generate(str(model_dir), prompts, tmp_path / "gen.jsonl", max_new_tokens=4, device="cpu")
    assert [(r["id"], r["prompt"]) for r in rows] == [("0", "Bob"), ("7", "hello")]


def test_generate_missing_model_is_input_error(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    with pytest.raises(InputError, match="does not exist"):
        generate(str(tmp_path / "nope"), prompts, tmp_path / "o.jsonl")


# ------------------------------------------------------------------------------------------- prompts files

prompt_text = st.text(alphabet=string.ascii_letters + string.digits + " ?.,'\"\\éü\n\t", min_size=1, max_size=30).filter(
    lambda s: s.strip())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(prompt_text, st.one_of(st.none(), st.integers(0, 10**6))), min_size=1, max_size=8,
                unique_by=lambda t: t[1] if t[1] is not None else object()),
       st.booleans(), st.sampled_from(["prompt", "text"]))
def test_read_prompts_round_trips_json_and_jsonl(tmp_path_factory, items, as_jsonl, key):
    folder = tmp_path_factory.mktemp("prompts")
    objects = [{key: text} if pid is None else {key: text, "id": pid} for text, pid in items]
    ids = [str(pid) if pid is not None else str(i) for i, (_, pid) in enumerate(items)]
    if len(set(ids)) != len(ids):  # an explicit id equal to another row's index: a real duplicate
        return
    if as_jsonl:
        path = folder / "p.jsonl"
        path.write_text("\n\n".join(json.dumps(o) for o in objects) + "\n")  # blank lines are skipped
        lines = [1 + 2 * i for i in range(len(objects))]
    else:
        path = folder / "p.json"
        path.write_text("[\n" + ",\n".join(json.dumps(o) for o in objects) + "\n]")
        lines = [2 + i for i in range(len(objects))]
    parsed = read_prompts(path)
    assert [p.prompt for p in parsed] == [text for text, _ in items]
    assert [p.id for p in parsed] == ids
    assert [p.source for p in parsed] == [f"{path}:{line}" for line in lines]


@pytest.mark.parametrize("content, where, message", [
    ("", ":", "empty"),
    ('{"prompt": "a"}\n{"prompt": \n', ":2", "invalid JSON"),
    ('{"prompt": "a"}\n{"question": "b"}\n', ":2", "field 'prompt'"),
    ('{"prompt": "a"}\n{"prompt": 3}\n', ":2", "expected a string"),
    ('{"prompt": "a"}\n{"prompt": "   "}\n', ":2", "empty"),
    ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', ":2", "duplicate id"),
    ('[\n "a",\n 5\n]', ":3", "expected a string or an object"),
    ('[\n "a",\n', ":", "invalid JSON"),
    ('{"prompt": "a", "id": [1]}\n', ":1", "field 'id'"),
])
def test_read_prompts_errors_name_file_and_line(tmp_path, content, where, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as info:
        read_prompts(path)
    assert str(info.value).startswith(f"{path}{where}")


def test_read_prompts_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_prompts(tmp_path / "none.jsonl")


# ----------------------------------------------------------------------------------------------------- CLI

def test_cli_help_of_train_and_generate_show_examples():
    runner = CliRunner()
    for command, example in (("train", "dataworth train --data builtin:bios"), ("generate", "dataworth generate --model")):
        result = runner.invoke(cli, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert example in result.output


def test_cli_generate_end_to_end_and_bad_input_exit_2(model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Bob"}\n')
    out = tmp_path / "g.jsonl"
    runner = CliRunner()
    ok = runner.invoke(cli, ["generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                             "--max-new-tokens", "3", "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert len(out.read_text().splitlines()) == 1
    prompts.write_text('{"prompt": "Bob"}\nnot json\n')
    bad = runner.invoke(cli, ["generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out)])
    assert bad.exit_code == 2
    assert f"{prompts}:2" in bad.output


@pytest.mark.parametrize("flags, flag", [
    (["--sample", "--temperature", "0"], "--temperature"),
    (["--sample", "--temperature", "-1"], "--temperature"),
    (["--sample", "--temperature", "nan"], "--temperature"),
    (["--sample", "--top-p", "2"], "--top-p"),
    (["--top-p", "2"], "--top-p"),
    (["--sample", "--top-p", "0"], "--top-p"),
    (["--sample", "--top-p", "inf"], "--top-p"),
])
def test_cli_generate_refuses_impossible_sampling_settings_in_one_line(model_dir, tmp_path, flags, flag):
    """Temperature divides the logits and top-p is a share of probability mass: temperature 0 with sampling
    was a traceback, top-p 2 was accepted silently."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Bob"}\n')
    result = CliRunner().invoke(cli, ["generate", "--model", str(model_dir), "--prompts", str(prompts), "--out",
                                      str(tmp_path / "g.jsonl"), "--max-new-tokens", "2", "--device", "cpu", *flags])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert result.output.strip().splitlines()[-1].startswith(f"error: {flag}: must be")
    assert not (tmp_path / "g.jsonl").exists()


def test_cli_generate_says_when_responses_are_empty(tmp_path, monkeypatch):
    """A model that ends at once gives an empty response, which score refuses: say so when it is written."""
    import dataworth.cli.generate as command

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    rows = [{"id": "q0", "prompt": "a", "response": ""}, {"id": "q\u202e1", "prompt": "b", "response": " x"}]
    monkeypatch.setattr(command, "generate", lambda *args, **kwargs: rows)
    result = CliRunner().invoke(cli, ["generate", "--model", "m", "--prompts", str(prompts), "--out",
                                      str(tmp_path / "g.jsonl")])
    assert result.exit_code == 0, result.output
    assert "note: 1 response(s) are empty (the model ended at once: q0)" in result.stderr


@pytest.mark.slow
def test_smollm2_answers_in_english(tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["What is the capital of France?", "Name a colour of the sky."]))
    rows = generate("smollm2", prompts, tmp_path / "g.jsonl", max_new_tokens=12, device="cpu")
    for row in rows:
        words = [w for w in row["response"].split() if w.strip(string.punctuation)]
        assert words and all(w.strip(string.punctuation).isascii() for w in words), row
    assert "Paris" in rows[0]["response"]
