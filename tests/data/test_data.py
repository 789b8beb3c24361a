"""dataworth.data: parsing and validation of every input form, loss masks of every row kind, truncation,
fingerprints and batches. Masks are checked by decoding exactly which tokens are targets."""

from __future__ import annotations

import copy
import json
import re
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dataworth
import dataworth.data.rows
from dataworth.data.batching import batches, example_losses
from dataworth.data.encode import (
    EncodeReport,
    data_fingerprint,
    encode_row,
    encode_rows,
    end_of_turn_id,
    prompt_token_ids,
)
from dataworth.data.rows import Row, load_rows, load_rows_report
from dataworth.errors import InputError

SIMPLE_TEMPLATE = (
    "<s>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hi there"},
    {"role": "user", "content": "Reverse the word cat"},
    {"role": "assistant", "content": "tac"},
]
HYPO = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------------------------- helpers


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def row(kind: str, data: dict, rid: str = "r") -> Row:
    return Row(id=rid, kind=kind, data=data, source="test:1")


def tok_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def targets_text(tokenizer, enc) -> str:
    return tokenizer.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m])


def target_runs(enc) -> list[list[int]]:
    """Maximal runs of consecutive target tokens."""
    runs, current = [], []
    for token, m in zip(enc.input_ids, enc.loss_mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = SIMPLE_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def end_tokenizer(tiny_tokenizer):
    """A template whose turns end with a dedicated special token, not eos."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tok.chat_template = SIMPLE_TEMPLATE.replace("</s>", "<|end|>")
    return tok


# ---------------------------------------------------------------------------------------------- loss masks, plain


def test_text_targets_every_token_after_bos(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_row(row("text", {"text": "Alice Smith was born in Paris."}), tok)
    assert enc.input_ids == [tok.bos_token_id] + tok_ids(tok, "Alice Smith was born in Paris.") + [tok.eos_token_id]
    assert enc.loss_mask == [0] + [1] * (len(enc.input_ids) - 1)
    assert targets_text(tok, enc) == "Alice Smith was born in Paris.</s>"


def test_prompt_response_targets_response_and_eos_only(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_row(row("prompt_response", {"prompt": "What is 2 plus 3?", "response": " It is 5."}), tok)
    prompt, response = tok_ids(tok, "What is 2 plus 3?"), tok_ids(tok, " It is 5.")
    assert enc.input_ids == [tok.bos_token_id] + prompt + response + [tok.eos_token_id]
    assert enc.loss_mask == [0] * (1 + len(prompt)) + [1] * (len(response) + 1)
    assert targets_text(tok, enc) == " It is 5.</s>"


def test_messages_plain_format_targets_assistant_content_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    enc = encode_row(row("messages", {"messages": CONVERSATION}), tok)
    assert tok.decode(enc.input_ids) == (
        "<s><|system|>\nbe nice\n<|user|>\nhi\n<|assistant|>\nhi there</s>\n"
        "<|user|>\nReverse the word cat\n<|assistant|>\ntac</s>\n"
    )
    eos = tok.eos_token_id
    assert target_runs(enc) == [tok_ids(tok, "hi there") + [eos], tok_ids(tok, "tac") + [eos]]
    # the newline after eos is not a target
    assert enc.input_ids[-1] == tok_ids(tok, "\n")[-1] and enc.loss_mask[-1] == 0


def test_open_instruct_rows_load_and_encode(tmp_path, tiny_tokenizer):
    # The shape of LESS's dolly / flan_v2 / cot / oasst1 files.
    rows = [{"dataset": "dolly", "id": f"dolly_{i}", "messages": CONVERSATION[1:3]} for i in range(3)]
    loaded = load_rows(write_jsonl(tmp_path / "dolly_data.jsonl", rows))
    assert [r.id for r in loaded] == ["dolly_0", "dolly_1", "dolly_2"]
    assert all(r.kind == "messages" and r.data["dataset"] == "dolly" for r in loaded)
    enc, report = encode_rows(loaded, tiny_tokenizer)
    assert all(targets_text(tiny_tokenizer, e) == "hi there</s>" for e in enc)
    assert report == EncodeReport(rows=3, tokens=sum(len(e.input_ids) for e in enc), truncated=0, no_targets=0,
                                  targets=3 * (len(tok_ids(tiny_tokenizer, "hi there")) + 1))


def test_no_bos_or_eos_when_the_tokenizer_has_none(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.bos_token = None
    tok.eos_token = None
    assert tok.bos_token_id is None and tok.eos_token_id is None
    enc = encode_row(row("prompt_response", {"prompt": "hi", "response": " there"}), tok)
    assert enc.input_ids == tok_ids(tok, "hi") + tok_ids(tok, " there")
    assert targets_text(tok, enc) == " there"


# ---------------------------------------------------------------------------------------------- loss masks, chat


def test_chat_prompt_response_uses_template_and_its_end_of_turn(chat_tokenizer):
    tok = chat_tokenizer
    enc = encode_row(row("prompt_response", {"prompt": "What is 2 plus 3?", "response": "It is 5."}), tok)
    templated = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                        add_generation_prompt=True, tokenize=True)["input_ids"]
    assert prompt_token_ids("What is 2 plus 3?", tok) == templated
    assert enc.input_ids == templated + tok_ids(tok, "It is 5.") + [tok.eos_token_id]
    assert tok.decode(enc.input_ids) == "<s><|user|>\nWhat is 2 plus 3?</s>\n<|assistant|>\nIt is 5.</s>"
    assert targets_text(tok, enc) == "It is 5.</s>"


def test_chat_messages_render_the_template_exactly_and_target_assistant_turns(chat_tokenizer):
    tok = chat_tokenizer
    enc = encode_row(row("messages", {"messages": CONVERSATION}), tok)
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    eos = tok.eos_token_id
    assert target_runs(enc) == [tok_ids(tok, "hi there") + [eos], tok_ids(tok, "tac") + [eos]]


def test_chat_end_of_turn_token_other_than_eos(end_tokenizer):
    tok = end_tokenizer
    end = tok.convert_tokens_to_ids("<|end|>")
    assert end_of_turn_id(tok) == end != tok.eos_token_id
    pr = encode_row(row("prompt_response", {"prompt": "hi", "response": "hi there"}), tok)
    assert pr.input_ids[-1] == end and targets_text(tok, pr) == "hi there<|end|>"
    msgs = encode_row(row("messages", {"messages": CONVERSATION}), tok)
    assert target_runs(msgs) == [tok_ids(tok, "hi there") + [end], tok_ids(tok, "tac") + [end]]


def test_chat_flag_forces_or_disables_the_template(tiny_tokenizer, chat_tokenizer):
    r = row("prompt_response", {"prompt": "hi", "response": " there"})
    plain = encode_row(r, tiny_tokenizer)
    assert encode_row(r, chat_tokenizer, chat=False) == plain
    plain_prompt = [tiny_tokenizer.bos_token_id] + tok_ids(tiny_tokenizer, "hi")
    assert prompt_token_ids("hi", chat_tokenizer, chat=False) == plain_prompt
    with pytest.raises(InputError, match="chat"):
        encode_row(r, tiny_tokenizer, chat=True)


def test_chat_template_without_prefix_property_is_an_error(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    # The footer depends on the last message, so earlier renderings are not prefixes of later ones.
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}[{{ messages[-1]['role'] }}]"
    with pytest.raises(InputError, match=r"test:1: .*incrementally"):
        encode_row(row("messages", {"messages": CONVERSATION}), tok)


# ---------------------------------------------------------------------------------------------- masked loss


def test_masked_loss_equals_hand_sum_over_response_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [
        row("prompt_response", {"prompt": "The capital of France is", "response": " Paris."}, "a"),
        row("text", {"text": "Oxford is a university town."}, "b"),
        row("messages", {"messages": CONVERSATION[1:3]}, "c"),
        row("prompt_response", {"prompt": "Reverse the word cat:", "response": " tac"}, "d"),
    ]
    encoded, _ = encode_rows(rows, tok)
    # Obviously-correct reference: the target positions, written out from the formats.
    bos = 1
    user = len(tok_ids(tok, "<|user|>\nhi\n")) + len(tok_ids(tok, "<|assistant|>\n"))
    want_positions = {
        "a": range(bos + len(tok_ids(tok, "The capital of France is")), len(encoded[0].input_ids)),
        "b": range(1, len(encoded[1].input_ids)),
        "c": range(bos + user, bos + user + len(tok_ids(tok, "hi there")) + 1),
        "d": range(bos + len(tok_ids(tok, "Reverse the word cat:")), len(encoded[3].input_ids)),
    }
    torch.manual_seed(0)
    seen = []
    for batch in batches(encoded, pad_id=tok.pad_token_id, batch_size=3, sort_by_length=True):
        logits = torch.randn(len(batch), batch.input_ids.shape[1], len(tok))
        got = example_losses(logits, batch)
        logp = torch.log_softmax(logits, -1)
        for b, (rid, pos) in enumerate(zip(batch.ids, batch.index.tolist())):
            ids = encoded[pos].input_ids
            want = -sum(logp[b, t - 1, ids[t]] for t in want_positions[rid])
            assert torch.allclose(got[b], want, atol=1e-5), rid
            seen.append(pos)
    assert sorted(seen) == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------- truncation


def test_prompt_response_truncation_drops_prompt_start_first(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt_text, response_text = "Bob Jones studied physics at Oxford and works for Acme.", " Acme."
    r = row("prompt_response", {"prompt": prompt_text, "response": response_text})
    prompt, response = tok_ids(tok, prompt_text), tok_ids(tok, response_text)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    full = 1 + len(prompt) + len(response) + 1

    assert not encode_row(r, tok, max_length=full).truncated
    keep2 = encode_row(r, tok, max_length=1 + 2 + len(response) + 1)
    assert keep2.truncated and keep2.input_ids == [bos] + prompt[-2:] + response + [eos]
    assert targets_text(tok, keep2) == " Acme.</s>"
    cut = encode_row(r, tok, max_length=3)
    assert cut.truncated and cut.input_ids == [bos] + (response + [eos])[:2]
    assert cut.loss_mask == [0, 1, 1]


@HYPO
@given(max_length=st.integers(min_value=1, max_value=40))
def test_prompt_response_truncation_properties(tiny_tokenizer, max_length):
    tok = tiny_tokenizer
    r = row("prompt_response", {"prompt": "Alice Smith was born in Paris on 3 May 1970.", "response": " Paris"})
    full = encode_row(r, tok)
    enc = encode_row(r, tok, max_length=max_length)
    assert len(enc.input_ids) == min(max_length, len(full.input_ids))
    assert enc.truncated == (max_length < len(full.input_ids))
    assert enc.input_ids[0] == tok.bos_token_id
    answer = len(tok_ids(tok, " Paris")) + 1
    if max_length >= 1 + answer:  # the whole response fits: kept whole, after the prompt's tail
        assert enc.input_ids[-answer:] == full.input_ids[-answer:] and enc.n_targets == answer
        assert enc.input_ids[1:] == full.input_ids[len(full.input_ids) - len(enc.input_ids) + 1 :]
    else:  # the response is cut on the right; all that remains after bos is a target
        assert enc.input_ids[1:] == full.input_ids[-answer:][: max_length - 1]
        assert enc.n_targets == max_length - 1


def test_text_and_messages_keep_first_tokens_and_counts(tiny_tokenizer, chat_tokenizer):
    tok = tiny_tokenizer
    rows = [
        row("text", {"text": "The capital of France is Paris."}, "t"),
        row("messages", {"messages": CONVERSATION}, "m"),
        row("prompt_response", {"prompt": "x", "response": "y"}, "p"),
    ]
    full, _ = encode_rows(rows, tok)
    cut, report = encode_rows(rows, tok, max_length=6)
    assert cut[0].input_ids == full[0].input_ids[:6] and cut[0].loss_mask == full[0].loss_mask[:6]
    assert cut[1].input_ids == full[1].input_ids[:6] and cut[1].n_targets == 0  # kept, counted
    assert cut[2] == full[2]
    assert [e.truncated for e in cut] == [True, True, False]
    assert report == EncodeReport(rows=3, tokens=6 + 6 + len(full[2].input_ids), truncated=2, no_targets=1,
                                  targets=5 + 0 + full[2].n_targets)
    chat_cut = encode_row(rows[2], chat_tokenizer, max_length=4)  # template's <s> stays at the front
    assert chat_cut.input_ids[0] == tok.bos_token_id and targets_text(tok, chat_cut) == "y</s>"
    with pytest.raises(InputError, match="max_length"):
        encode_rows(rows, tok, max_length=0)


def test_batched_encoding_equals_row_by_row(tiny_tokenizer, chat_tokenizer):
    rows = load_rows_from_dicts([
        {"text": "Alice"}, {"prompt": "What is 2 plus 3?", "response": "5"}, {"messages": CONVERSATION},
        {"instruction": "Reverse", "input": "cat", "output": "tac"},
    ])
    for tok in (tiny_tokenizer, chat_tokenizer):
        batched, _ = encode_rows(rows, tok, max_length=20)
        assert batched == [encode_row(r, tok, max_length=20) for r in rows]


def load_rows_from_dicts(dicts):
    with tempfile.TemporaryDirectory() as tmp:
        return load_rows(write_jsonl(Path(tmp) / "rows.jsonl", dicts))


# ---------------------------------------------------------------------------------------------- parsing: round trips


def _words():
    return st.text(st.characters(codec="utf-8"), max_size=12)


_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": _words()}), max_size=4
).map(lambda ms: ms + [{"role": "assistant", "content": "answer"}])

_valid_row = st.one_of(
    st.fixed_dictionaries({"text": _words()}),
    st.fixed_dictionaries({"prompt": _words(), "response": _words().filter(str.strip)}),  # blank: refused
    st.fixed_dictionaries({"messages": _messages}),
)
_valid_row = st.tuples(_valid_row, st.sampled_from(["web", "book"])).map(lambda pair: {**pair[0], "source": pair[1]})


@HYPO
@given(rows=st.lists(_valid_row, min_size=1, max_size=8), with_ids=st.booleans(), ascii_only=st.booleans())
def test_jsonl_round_trip_keeps_ids_kinds_and_fields(rows, with_ids, ascii_only):
    if with_ids:
        rows = [{"id": f"doc-{i}", **r} for i, r in enumerate(rows)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("\n\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in rows), encoding="utf-8")
        loaded = load_rows(path)
    assert [r.data for r in loaded] == rows
    assert [r.id for r in loaded] == [f"doc-{i}" if with_ids else str(i) for i in range(len(rows))]
    want_kinds = ["messages" if "messages" in r else "prompt_response" if "prompt" in r else "text" for r in rows]
    assert [r.kind for r in loaded] == want_kinds
    assert [r.source for r in loaded] == [f"{path}:{2 * i + 1}" for i in range(len(rows))]  # blank lines count


_KNOWN = {"text", "prompt", "instruction", "response", "completion", "output", "messages", "id"}
_bad_line = st.one_of(
    st.text(min_size=1).filter(lambda s: "\n" not in s and s.strip() and not _parses(s)),
    st.one_of(st.integers(), st.lists(st.integers(), max_size=3), st.text(max_size=5), st.booleans(), st.none())
    .map(json.dumps),
    st.dictionaries(st.text(max_size=6).filter(lambda k: k not in _KNOWN), st.integers(), max_size=3).map(json.dumps),
    st.sampled_from([{"text": 5}, {"prompt": "a"}, {"response": "a"}, {"prompt": "a", "response": None, "output": 1},
                     {"messages": "hi"}, {"messages": [{"role": "user", "content": "x"}]},
                     {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
                     {"text": "a", "id": [1]}, {"text": "a", "id": True}]).map(json.dumps),
)


def _parses(s: str) -> bool:
    try:
        json.loads(s)
    except ValueError:
        return False
    return True


@HYPO
@given(bad=_bad_line, before=st.integers(0, 3), after=st.integers(0, 3))
def test_malformed_jsonl_line_is_named_by_path_and_line(bad, before, after):
    good = [json.dumps({"text": f"row {i}"}) for i in range(before + after)]
    lines = good[:before] + [bad] + good[before:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        with pytest.raises(InputError) as err:
            load_rows(path)
        assert str(err.value).startswith(f"{path}:{before + 1}: ") and "\n" not in str(err.value)
        if before + after:
            rows, skipped = load_rows_report(path, skip_bad=True)
            assert [r.data["text"] for r in rows] == [f"row {i}" for i in range(before + after)]
            assert [b.source for b in skipped] == [f"{path}:{before + 1}"]
            # ids are indices over all rows, so they do not shift when a bad row is skipped
            assert [r.id for r in rows] == [str(i) for i in range(before + after + 1) if i != before]


# ------------------------------------------------------------------------------------ parsing: every bad input


BAD_JSONL = [
    (b'{"text":"a"}\n\xff\xfe\n', 2, "UTF-8"),
    (b'{"text":"a"}\n{"text": }\n', 2, "invalid JSON"),
    (b"[1, 2]\n", 1, "must be a JSON object, got array"),
    (b'{"text":"a"}\n\n{"foo": 1}\n', 3, "no 'text', 'prompt'+'response' or 'messages' field"),
    (b'{"text": 5}\n', 1, "field 'text' must be a string"),
    (b'{"prompt": "a"}\n', 1, "field 'response' missing"),
    (b'{"completion": "a"}\n', 1, "field 'prompt' missing"),
    (b'{"prompt": "a", "response": ["x"]}\n', 1, "field 'response' must be a string"),
    (b'{"prompt": "a", "response": "b", "output": "c"}\n', 1, "aliases"),
    (b'{"messages": "hi"}\n', 1, "field 'messages' must be an array"),
    (b'{"messages": [{"role": "user", "content": "q"}]}\n', 1, "no assistant turn"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}\n', 1,
     "no assistant turn"),
    (b'{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]}\n', 1,
     "messages[1].role': unknown role 'tool'"),
    (b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}\n', 1, "messages[0].content' missing"),
    (b'{"messages": [{"role": "user", "content": 3}]}\n', 1, "messages[0].content' must be a string"),
    (b'{"text": "a", "id": {"x": 1}}\n', 1, "field 'id' must be a string or an integer"),
    (b'{"prompt": "q", "response": ""}\n', 1, "field 'response' is empty (nothing to measure"),
    (b'{"text": "a"}\n{"prompt": "q", "completion": " \\n\\t "}\n', 2, "field 'completion' is empty"),
    (b'{"instruction": "q", "input": "x", "output": ""}\n', 1, "field 'output' is empty"),
    (b'{"id": "r1", "text": null}\n', 1, "field 'text' is null"),
    (b'{"prompt": null, "response": "r"}\n', 1, "field 'prompt' is null, expected a string"),
    (b'{"prompt": "q", "response": null}\n', 1, "field 'response' is null, expected a string"),
    (b'{"id": "a", "text": "x"}\n{"text": "y"}\n{"id": "a", "text": "z"}\n', 3, "duplicate id 'a' (first at {path}:1)"),
    (b'{"id": "1", "text": "x"}\n{"text": "y"}\n', 2, "duplicate id '1' (first at {path}:1)"),
]


@pytest.mark.parametrize("content,line,message", BAD_JSONL, ids=[m for _, _, m in BAD_JSONL])
def test_bad_jsonl_rows_name_path_line_and_problem(tmp_path, content, line, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        load_rows(path)
    assert str(err.value).startswith(f"{path}:{line}: ")
    assert message.format(path=path) in str(err.value)


def test_bad_files_and_directories(tmp_path):
    cases = {
        "missing.jsonl": (None, "no such file or directory"),
        "empty.jsonl": (b"", "empty dataset"),
        "blank.jsonl": (b"\n  \n\n", "empty dataset"),
        "rows.csv": (b"text\nhello\n", "unsupported file type '.csv'"),
        "broken.json": (b'[\n{"text": "a"},\n{"text": \n]', ":4: invalid JSON"),
        "latin.json": (b'[\n{"text": "a"},\n{"text": "caf\xe9"}]', ":3: not valid UTF-8"),
        "scalar.json": (b"42", ":1: a .json file must hold a list of rows"),
        "two_lists.json": (b'{"a": [], "b": []}', "exactly one list value"),
        "no_text.json": (b'[{"text": "a"},\n {"nope": 1}]', ":2: no 'text'"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(InputError) as err:
            load_rows(path)
        assert str(err.value).startswith(str(path)) and message in str(err.value), name

    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "txt_only").mkdir()
    (tmp_path / "txt_only" / "notes.txt").write_text("hello")
    for folder in ("empty_dir", "txt_only"):
        with pytest.raises(InputError, match="holds no .jsonl"):
            load_rows(tmp_path / folder)


def test_skip_bad_writes_bad_ids_and_keeps_good_rows(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"id": "a", "text": "x"}\n{"id": "b", "text": 7}\nnot json\n{"id": "a", "text": "dup"}\n'
                     b'\xff\n{"id": "c", "prompt": "p", "response": "r"}\n')
    out = tmp_path / "bad.jsonl"
    rows, bad = load_rows_report(path, skip_bad=True, bad_ids_out=out)
    assert [r.id for r in rows] == ["a", "c"]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(b["id"], b["source"]) for b in written] == [
        ("b", f"{path}:2"), (f"{path}:3", f"{path}:3"), ("a", f"{path}:4"), (f"{path}:5", f"{path}:5")]
    assert "field 'text'" in written[0]["reason"] and "duplicate id 'a'" in written[2]["reason"]
    assert [b.id for b in bad] == [b["id"] for b in written]
    assert load_rows(path, skip_bad=True) == rows

    all_bad = tmp_path / "all_bad.jsonl"
    all_bad.write_text('{"x": 1}\n[]\n')
    with pytest.raises(InputError, match="empty dataset .*all 2 rows were bad"):
        load_rows(all_bad, skip_bad=True, bad_ids_out=tmp_path / "bad2.jsonl")
    assert len((tmp_path / "bad2.jsonl").read_text().splitlines()) == 2


# ---------------------------------------------------------------------------------------------- containers


def test_aliases_resolve_to_prompt_and_response():
    rows = load_rows_from_dicts([
        {"prompt": "p", "completion": "c"},
        {"instruction": "Reverse the word", "input": "cat", "output": "tac"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"text": "doc", "output": "kept as metadata"},
    ])
    assert [(r.kind, r.prompt, r.response) for r in rows[:3]] == [
        ("prompt_response", "p", "c"), ("prompt_response", "Reverse the word\n\ncat", "tac"),
        ("prompt_response", "Say hi", "hi")]
    assert rows[3].kind == "text" and rows[3].data["output"] == "kept as metadata"


def test_json_list_and_wrapped_object_with_line_numbers(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text('[\n  {"text": "a"},\n\n  {"text": "b",\n   "id": 7}\n]\n')
    rows = load_rows(listed)
    assert [(r.id, r.data["text"], r.source) for r in rows] == [("0", "a", f"{listed}:2"), ("7", "b", f"{listed}:4")]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text('{"version": "1.0", "meta": {"rows": [1]},\n "data": [\n {"text": "a"}, {"text": "b"}]}')
    rows = load_rows(wrapped)
    assert [(r.data["text"], r.source) for r in rows] == [("a", f"{wrapped}:3"), ("b", f"{wrapped}:3")]


def test_parquet_rows_with_nested_messages(tmp_path):
    import pandas as pd

    path = tmp_path / "pool.parquet"
    pd.DataFrame([
        {"id": "x1", "dataset": "oasst1", "messages": CONVERSATION[1:3]},
        {"id": "x2", "dataset": "cot", "messages": CONVERSATION},
    ]).to_parquet(path)
    rows = load_rows(path)
    assert [(r.id, r.kind, r.data["dataset"], r.source) for r in rows] == [
        ("x1", "messages", "oasst1", f"{path}:1"), ("x2", "messages", "cot", f"{path}:2")]
    assert rows[1].messages == CONVERSATION
    bad = tmp_path / "bad.parquet"
    pd.DataFrame([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": None}]).to_parquet(bad)
    with pytest.raises(InputError, match=rf"^{re.escape(str(bad))}:2: field 'response' is null"):
        load_rows(bad)


def test_empty_response_is_refused_like_an_empty_assistant_turn(tmp_path):
    """Both would measure only the end token; both are refused naming file:line, and --skip-bad lists them."""
    path = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "ok", "prompt": "Where?", "response": " Paris."},
        {"id": "empty", "prompt": "Where?", "response": ""},
        {"id": "turn", "messages": [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": ""}]},
    ])
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:2: field 'response' is empty"):
        load_rows(path)
    rows, bad = load_rows_report(path, skip_bad=True)
    assert [r.id for r in rows] == ["ok"] and [b.id for b in bad] == ["empty", "turn"]


def test_files_of_other_types_in_a_data_directory_are_named_never_skipped_silently(tmp_path, caplog):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a0"}])
    for name in ("rows.csv", "more.jsonl.gz", "sub/notes.txt", "sub/x.tsv", "y.txt", "z.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("text\nhello\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref\n")
    with caplog.at_level("WARNING", logger="dataworth.data.rows"):
        rows = load_rows(tmp_path)
    assert [r.data["text"] for r in rows] == ["a0"]
    notes = [r.getMessage() for r in caplog.records]
    assert notes == [f"{tmp_path}: skipped 6 file(s) of unsupported type (read: .jsonl, .ndjson, .json, .parquet): "
                     "more.jsonl.gz, rows.csv, sub/notes.txt, sub/x.tsv, y.txt and 1 more"]
    only_csv = tmp_path / "sub"
    with pytest.raises(InputError, match=r"holds no .jsonl/.ndjson/.json/.parquet files \(it holds notes.txt, x.tsv\)"):
        load_rows(only_csv)


def test_directory_concatenates_files_in_relative_path_order(tmp_path):
    import pandas as pd

    (tmp_path / "a").mkdir()
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b0"}, {"text": "b1"}])
    (tmp_path / "a" / "x.json").write_text(json.dumps([{"text": "x0"}]))
    pd.DataFrame([{"text": "y0"}, {"text": "y1"}]).to_parquet(tmp_path / "a" / "y.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    write_jsonl(tmp_path / ".hidden.jsonl", [{"text": "hidden"}])
    rows = load_rows(tmp_path)
    assert [r.data["text"] for r in rows] == ["x0", "y0", "y1", "b0", "b1"]
    assert [r.id for r in rows] == ["0", "1", "2", "3", "4"]  # global index across files
    assert rows[3].source == f"{tmp_path / 'b.jsonl'}:1"


def test_hf_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_list([{"text": "a", "id": "d0"}, {"text": "b", "id": "d1"}]).save_to_disk(str(single))
    rows = load_rows(f"hf:{single}")
    assert [(r.id, r.data["text"], r.source) for r in rows] == [
        ("d0", "a", f"hf:{single}#0"), ("d1", "b", f"hf:{single}#1")]

    split = tmp_path / "split"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": "p", "response": "r"}]),
        "validation": datasets.Dataset.from_list([{"messages": CONVERSATION}]),
    }).save_to_disk(str(split))
    assert [r.kind for r in load_rows(f"hf:{split}")] == ["prompt_response"]
    valid = load_rows(f"hf:{split}:validation")
    assert valid[0].messages == CONVERSATION and valid[0].source == f"hf:{split}:validation#0"
    with pytest.raises(InputError, match=r"no split 'test' \(splits: train, validation\)"):
        load_rows(f"hf:{split}:test")
    with pytest.raises(InputError, match=r"^hf:no-such-org/no-such-dataset:train: not available offline"):
        load_rows("hf:no-such-org/no-such-dataset")


def test_builtin_spec_calls_worlds_with_split_and_params(monkeypatch):
    calls = []

    def builtin_rows(name, split, params):
        calls.append((name, split, params))
        return [{"id": "bio-0", "text": "Alice was born in Paris.", "person": "Alice"},
                {"id": "bio-1", "text": "Bob works for Acme.", "person": "Bob"}]

    monkeypatch.setattr(dataworth.data.rows, "builtin_rows", builtin_rows)
    rows = load_rows("builtin:bios:train?people=20&seed=3")
    assert calls == [("bios", "train", {"people": "20", "seed": "3"})]
    assert [(r.id, r.source, r.data["person"]) for r in rows] == [
        ("bio-0", "builtin:bios:train#0", "Alice"), ("bio-1", "builtin:bios:train#1", "Bob")]
    load_rows("builtin:bios")
    assert calls[-1] == ("bios", "train", {})
    with pytest.raises(InputError, match="parameter 'seed' given twice"):
        load_rows("builtin:bios?seed=1&seed=2")


# ---------------------------------------------------------------------------------------------- fingerprint & batches


def test_data_fingerprint_is_pinned_and_sensitive_to_ids_tokens_masks_order():
    from dataworth.data.batching import Encoded

    a, b = Encoded("a", [1, 5, 6], [0, 1, 1]), Encoded("b", [1, 7], [0, 1])
    base = data_fingerprint([a, b])
    assert base == data_fingerprint([Encoded("a", [1, 5, 6], [0, 1, 1]), Encoded("b", [1, 7], [0, 1])])
    variants = [
        [b, a],
        [Encoded("c", [1, 5, 6], [0, 1, 1]), b],
        [Encoded("a", [1, 5, 9], [0, 1, 1]), b],
        [Encoded("a", [1, 5, 6], [0, 0, 1]), b],
        [Encoded("a", [1, 5], [0, 1]), Encoded("b", [6, 1, 7], [1, 0, 1])],  # same flat tokens, other split
    ]
    assert len({base, *(data_fingerprint(v) for v in variants)}) == len(variants) + 1
    # Pinned: stores record this value, so it must not drift between versions or machines.
    assert base == "2daba71a1039310400754c47c821c3d478dffa390c75aa813cdffa5e1882ab5c"


def test_batches_cover_every_row_once_with_positions(tiny_tokenizer):
    rows = load_rows_from_dicts([{"text": "a" * n} for n in (1, 9, 3, 14, 6)])
    encoded, _ = encode_rows(rows, tiny_tokenizer)
    got = list(batches(encoded, pad_id=0, token_budget=32, sort_by_length=True))
    positions = [p for batch in got for p in batch.index.tolist()]
    assert sorted(positions) == list(range(5))
    for batch in got:
        for i, pos in enumerate(batch.index.tolist()):
            n = len(encoded[pos].input_ids)
            assert batch.ids[i] == encoded[pos].id
            assert batch.input_ids[i, :n].tolist() == encoded[pos].input_ids
            assert batch.attention_mask[i].sum() == n
