"""`data.encode.value_only`: measuring only the fact's value tokens of an answer."""

from dataworth.data.encode import encode_row, value_only
from dataworth.data.rows import Row


def pr(rid: str, prompt: str, response: str) -> Row:
    return Row(id=rid, kind="prompt_response", data={"prompt": prompt, "response": response}, source="test:1")


def test_value_only_measures_exactly_the_value_tokens_of_the_answer(chatml_tokenizer):
    encoded = encode_row(pr("q", "Where was Alice Smith born?", "Alice Smith was born in Paris."), chatml_tokenizer)
    only = value_only(encoded, chatml_tokenizer, "Paris")
    kept = [t for t, m in zip(only.input_ids, only.loss_mask) if m]
    assert chatml_tokenizer.decode(kept) == " Paris"
    assert only.input_ids == encoded.input_ids
    assert all(encoded.loss_mask[i] for i, m in enumerate(only.loss_mask) if m)  # a subset of the targets
    # a value that is only in the prompt (not a target) or nowhere: None
    assert value_only(encoded, chatml_tokenizer, "Alice Smith was born in Berlin") is None
    prompt_only = encode_row(pr("p", "Is it Paris?", "Yes."), chatml_tokenizer)
    assert value_only(prompt_only, chatml_tokenizer, "Paris") is None
