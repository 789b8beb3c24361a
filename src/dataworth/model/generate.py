"""Model responses for prompts → a query JSONL (``id``, ``prompt``, ``response``, ``model``).

Why a module of its own: the responses generated here become the *queries* whose influence dataworth
measures, so the prompt tokens must be exactly those the later stages rebuild from the same text:
``dataworth.data.encode.prompt_token_ids(prompt, tokenizer, chat)`` (the chat template for instruct models, else
``[bos] + tokens``). Generation stops at eos or the end-of-turn token of the chat format.

Batching: prompts are sorted by length, left-padded (pad attention 0, positions counted from the first
real token) and decoded together; with greedy decoding and eager attention every response equals the one
the prompt gets alone (tested), so ``batch_size`` only changes speed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from dataworth.data.encode import prompt_token_ids
from dataworth.errors import InputError
from dataworth.model.load import LoadedModel, load_model
from dataworth.util import finite_number, pad_token_id, write_jsonl_atomic

# Tokens that end an assistant turn in common chat formats, besides eos; used only if they are single
# special/added tokens of the tokenizer.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>", "<|user|>")


@dataclass(frozen=True)
class Prompt:
    """One prompt to answer; ``id`` is the ``id`` field or the 0-based position in the prompts file."""

    id: str
    prompt: str
    source: str


def read_prompts(path: str | Path) -> list[Prompt]:
    """Parse a prompts file: a JSON list (strings, or objects with ``prompt`` and optional ``id``) or JSONL
    (one object per line with ``prompt`` — or ``text`` — and optional ``id``; blank lines are skipped).

    Errors name ``path:line``: missing or empty file, bad JSON, a row without a string prompt, an empty
    prompt, a duplicate id.
    """
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: prompts file does not exist")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise InputError(f"{file}: prompts file is empty")
    if text.lstrip().startswith("["):
        items = _json_items(file, text)
    else:
        items = _jsonl_items(file, text)
    prompts = [_to_prompt(value, index, f"{file}:{line}") for index, (line, value) in enumerate(items)]
    if not prompts:
        raise InputError(f"{file}: no prompts")
    seen: dict[str, str] = {}
    for prompt in prompts:
        if prompt.id in seen:
            raise InputError(f"{prompt.source}: duplicate id {prompt.id!r} (first at {seen[prompt.id]})")
        seen[prompt.id] = prompt.source
    return prompts


def _json_items(file: Path, text: str) -> list[tuple[int, Any]]:
    """Items of a JSON array with the 1-based line each starts on."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{file}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(values, list):
        raise InputError(f"{file}:1: expected a JSON list of prompts")
    decoder, lines, pos = json.JSONDecoder(), [], text.index("[") + 1
    for _ in values:
        while text[pos] in " \t\r\n,":
            pos += 1
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)
    return list(zip(lines, values))


def _jsonl_items(file: Path, text: str) -> list[tuple[int, Any]]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InputError(f"{file}:{number}: invalid JSON line ({exc.msg})") from None
    return items


def _to_prompt(value: Any, index: int, source: str) -> Prompt:
    if isinstance(value, str):
        text, row_id = value, None
    elif isinstance(value, dict):
        key = "prompt" if "prompt" in value else "text" if "text" in value else None
        if key is None:
            raise InputError(f"{source}: field 'prompt': missing (each row needs 'prompt' or 'text')")
        text, row_id = value[key], value.get("id")
        if not isinstance(text, str):
            raise InputError(f"{source}: field '{key}': expected a string, got {type(text).__name__}")
        if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int))):
            raise InputError(f"{source}: field 'id': expected a string or integer, got {type(row_id).__name__}")
    else:
        raise InputError(f"{source}: expected a string or an object with 'prompt', got {type(value).__name__}")
    if not text.strip():
        raise InputError(f"{source}: field 'prompt': empty")
    return Prompt(id=str(index) if row_id is None else str(row_id), prompt=text, source=source)


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Token ids that end a response: eos (tokenizer and generation config) and end-of-turn markers."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids.update(int(i) for i in (config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]))
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", [])) | {
        str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and t in special)
    return sorted(ids)


def generate_token_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
) -> list[list[int]]:
    """Generated token ids for each prompt (list of token ids), without the prompt and the stop token.

    Shapes per batch: ``input_ids``/``attention_mask`` ``[B, T_max]``, left-padded. Greedy by default;
    sampling is seeded once per call (``torch.manual_seed(seed)``), so sampled outputs depend on batching.
    """
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise InputError(f"--batch-size: must be >= 1, got {batch_size}")
    check_sampling(do_sample, temperature, top_p)
    stops = stop_token_ids(tokenizer, model)
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    outputs: list[list[int]] = [[] for _ in prompts]
    if do_sample:
        torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            input_ids, attention = _left_pad([prompts[i] for i in chunk], pad_id)
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad_id,
                **sampling,
            )
            for row, index in enumerate(chunk):
                outputs[index] = _until_stop(generated[row, input_ids.shape[1]:].tolist(), stops)
    return outputs


def check_sampling(do_sample: bool, temperature: float, top_p: float) -> None:
    """``top_p`` in (0, 1] (the share of probability mass kept) and a finite ``temperature``, > 0 when
    sampling (logits are divided by it); checked whether or not sampling is on, as a wrong value is a mistake
    either way, and transformers would fail with a traceback or accept it silently."""
    top_p = finite_number(top_p, "--top-p")
    if not 0 < top_p <= 1:
        raise InputError(f"--top-p: must be in (0, 1], got {top_p}")
    temperature = finite_number(temperature, "--temperature")
    if temperature < 0:
        raise InputError(f"--temperature: must be > 0, got {temperature}")
    if do_sample and temperature == 0:
        raise InputError("--temperature: must be > 0 with --sample (temperature 0 is greedy decoding: use --greedy)")


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    if any(len(p) == 0 for p in prompts):
        raise InputError("prompt: a prompt encodes to zero tokens")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        attention[row, width - len(ids):] = 1
    return input_ids, attention


def _until_stop(ids: list[int], stops: Sequence[int]) -> list[int]:
    """Tokens before the first stop token (the rest is padding the batch added after this row stopped)."""
    for position, token in enumerate(ids):
        if token in stops:
            return ids[:position]
    return ids


def generate(
    model: Any,
    prompts_path: str | Path,
    out_path: str | Path,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool | str = "auto",
    batch_size: int = 8,
    device: str = "auto",
) -> list[dict]:
    """Answer every prompt of ``prompts_path`` with ``model`` (a spec string or a ``LoadedModel``) and write
    JSONL rows ``{"id", "prompt", "response", "model", "model_fingerprint"}`` to ``out_path`` atomically;
    returns the rows.

    ``model`` is ``"<spec>@<first 12 hex of the fingerprint>"`` for people; ``model_fingerprint`` the full
    ``model.load.model_fingerprint``, which ``dataworth score`` checks against the store's model. ``response`` is the
    decoded generated text with special tokens skipped and nothing stripped, so ``prompt`` + ``response``
    re-encode (``data.encode.encode_rows`` with the same ``chat``) to the tokens the model saw and produced.
    """
    check_sampling(do_sample, temperature, top_p)  # before minutes of model loading
    prompts = read_prompts(prompts_path)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    tokenizer = loaded.tokenizer
    token_ids = [prompt_token_ids(p.prompt, tokenizer, chat=chat) for p in prompts]
    generated = generate_token_ids(
        loaded.model, tokenizer, token_ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
    )
    label = f"{loaded.spec}@{loaded.fingerprint[:12]}"
    rows = [
        {"id": p.id, "prompt": p.prompt, "response": tokenizer.decode(ids, skip_special_tokens=True), "model": label,
         "model_fingerprint": loaded.fingerprint}
        for p, ids in zip(prompts, generated)
    ]
    write_jsonl(out_path, rows)
    return rows


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    """Write ``rows`` as UTF-8 JSONL atomically (never a half file)."""
    write_jsonl_atomic(path, rows)
