"""Encoding: validated rows in, token ids with loss masks out (`encode_rows`).

Why a module of its own: attribution is only as trustworthy as the answer to "which tokens did the loss
measure?". Training, extraction, scoring and generation must agree on it *to the token*, so chat
formatting, loss-mask construction, the end token and truncation live here once; the formats are in
`encode_rows`'s docstring. `without_end_token` and `measured_queries` choose what a *query* measures (its
answer, or its answer and the end token that encoding appends). `text_delimiters` says which tokens wrap a
plain-text document: bos/eos, unless those are a chat model's turn markers (then its document delimiter).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dataworth.data.batching import Encoded
from dataworth.data.rows import Row
from dataworth.errors import InputError, one_line


@dataclass(frozen=True)
class EncodeReport:
    """Totals of one ``encode_rows`` call: rows, tokens (after truncation), rows cut by ``max_length``,
    rows left with zero target tokens (kept, counted), and the number of target tokens."""

    rows: int
    tokens: int
    truncated: int
    no_targets: int
    targets: int = 0


@dataclass
class _Piece:
    """A segment of a row's token sequence. ``part``: ``head`` (bos) | ``prompt`` | ``body``; ``target``:
    ``no`` | ``yes`` | ``until_eot`` (a target up to and including the first end-of-turn token)."""

    part: str
    target: str
    text: str | None = None
    ids: list[int] | None = None


@dataclass(frozen=True)
class _Format:
    """What encoding needs to know about a tokenizer, resolved once per ``encode_rows`` call. ``start`` /
    ``end``: the tokens around a document (``text_delimiters``); ``eos`` ends an assistant turn in the plain
    messages format."""

    chat: bool
    start: int | None
    end: int | None
    eos: int | None
    end_of_turn: int | None


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _use_chat(tokenizer, chat: bool | str) -> bool:
    if chat == "auto":
        return has_chat_template(tokenizer)
    if chat is True:
        if not has_chat_template(tokenizer):
            raise InputError("chat: chat formatting requested but the tokenizer has no chat_template")
        return True
    if chat is False:
        return False
    raise InputError(f"chat: expected 'auto', True or False, got {chat!r}")


def _token_ids(output: Any) -> list[int]:
    """Token ids from ``apply_chat_template(..., tokenize=True)``: transformers 5 returns a ``BatchEncoding``
    (``return_dict`` defaults to True), 4.x a list; tensors and a batch of one are tolerated."""
    if isinstance(output, Mapping):
        output = output["input_ids"]
    if hasattr(output, "tolist"):
        output = output.tolist()
    if output and isinstance(output[0], (list, tuple)):
        if len(output) != 1:
            raise ValueError(f"expected one tokenized conversation, got {len(output)}")
        output = output[0]
    return [int(i) for i in output]


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool, source: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises its own types, and templates raise_exception() on odd conversations
        raise InputError(f"{source}: the tokenizer's chat template fails on this conversation: "
                         f"{one_line(exc)}") from None


def prompt_token_ids(prompt: str, tokenizer, chat: bool | str = "auto") -> list[int]:
    """The exact token ids a model is given to generate a response to ``prompt``.

    With a chat template (``chat="auto"`` and the tokenizer has one, or ``chat=True``):
    ``apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)`` (the template
    adds bos itself when the model wants one). Without: ``[start] + tok(prompt)``, ``start`` the document
    start of ``text_delimiters`` (bos, unless bos is a chat-turn marker). ``dataworth generate`` uses this,
    and ``encode_rows`` builds prompt_response rows on it, so the loss is measured on the very sequence the
    response was generated from.
    """
    if _use_chat(tokenizer, chat):
        conversation = [{"role": "user", "content": prompt}]
        return _token_ids(tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True))
    start, _ = text_delimiters(tokenizer)
    return _ids(start) + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def end_of_turn_id(tokenizer) -> int | None:
    """The token a chat template closes an assistant turn with (e.g. ``<|im_end|>``, ``<|eot_id|>``), found
    by rendering a marker answer and taking the first added/special token after it; else eos."""
    marker = "DATAWORTHENDOFTURNPROBE"
    probe = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": marker}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:
        return tokenizer.eos_token_id
    at = rendered.rfind(marker)
    if at < 0:
        return tokenizer.eos_token_id
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for token in tokenizer(rendered[at + len(marker):], add_special_tokens=False)["input_ids"]:
        if token in special:
            return int(token)
    return tokenizer.eos_token_id


# Names of the token that separates documents in pretraining streams, looked for in this order: GPT-2,
# SmolLM and Qwen use <|endoftext|>, Llama 3 <|end_of_text|>, Llama 2 and Mistral </s>.
DOCUMENT_DELIMITERS = ("<|endoftext|>", "<|end_of_text|>", "</s>")


def _special_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids) | {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", {}) or {})}


def chat_turn_markers(tokenizer) -> frozenset[int]:
    """Special tokens the chat template writes at least once per message: turn openers and closers.

    Found by rendering a four-message probe (user, assistant, user, assistant) and counting each special
    token: ``<|im_start|>`` / ``<|im_end|>`` (ChatML) or ``<|eot_id|>`` (Llama 3) occur once per turn or
    more, while a bos the template writes once (``<|begin_of_text|>``, ``<s>`` before the first turn) or an
    eos after assistant turns only (Llama 2, Mistral, open-instruct) occurs fewer times. No template, or one
    that fails on the probe: none.
    """
    if not has_chat_template(tokenizer):
        return frozenset()
    probe = [{"role": role, "content": f"DATAWORTHPROBE{i}"} for i, role in enumerate(("user", "assistant") * 2)]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # jinja's own types, or a template's raise_exception()
        return frozenset()
    counts = Counter(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return frozenset(t for t in _special_ids(tokenizer) if counts[t] >= len(probe))


def document_delimiter(tokenizer) -> int | None:
    """The special token named like a document separator (``DOCUMENT_DELIMITERS``, first found), if any."""
    special = _special_ids(tokenizer)
    for name in DOCUMENT_DELIMITERS:
        token = tokenizer.convert_tokens_to_ids(name)  # an unknown name gives unk (or None): checked below
        if token in special and tokenizer.convert_ids_to_tokens(token) == name:
            return int(token)
    return None


def text_delimiters(tokenizer) -> tuple[int | None, int | None]:
    """``(start, end)``: the tokens before and after a plain-text document (``None``: nothing there).

    ``start = D if bos ∈ M else bos`` and ``end = D if eos ∈ M else eos``, where ``M`` are the chat-turn
    markers (``chat_turn_markers``) and ``D`` the document delimiter (``document_delimiter``); if there is no
    ``D``, or ``D ∈ M``, or ``M`` is empty, simply ``(bos, eos)``. A bos/eos named like a delimiter
    (``</s>`` closing every turn in Zephyr's template) counts as ``D`` and stays.

    Why: a chat model's bos/eos can be turn markers (SmolLM2-Instruct: ``<|im_start|>`` / ``<|im_end|>``),
    and ``[bos] + text + [eos]`` is then a chat turn with no role, a sequence the model never saw. SmolLM2
    gets ``<|endoftext|> text <|endoftext|>``: its pretraining stream separates documents with
    ``<|endoftext|>`` and has no bos (GPT-2's convention; the base SmolLM2-135M config declares
    ``bos_token_id = eos_token_id = 0``, ``<|endoftext|>``), so every pretraining document followed a ``D``,
    and this is what ``[bos] + text + [eos]`` is for the base model. The leading ``D`` also keeps the mask
    semantics of text rows: position 0 is the delimiter, so every text token is a target, as after a bos.
    Llama 3 Instruct keeps ``<|begin_of_text|>`` and ends with ``<|end_of_text|>``, not ``<|eot_id|>``.
    Tokenizers whose bos/eos are no turn markers (GPT-2, the built-in tiny model's, Llama 2, Mistral) keep
    ``(bos, eos)`` exactly, so their encodings and data fingerprints are unchanged.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    markers = chat_turn_markers(tokenizer)
    delimiter = document_delimiter(tokenizer)
    if not markers or delimiter is None or delimiter in markers:
        return bos, eos

    def side(token: int | None) -> int | None:
        named_as_delimiter = token is not None and tokenizer.convert_ids_to_tokens(token) in DOCUMENT_DELIMITERS
        return delimiter if token in markers and not named_as_delimiter else token

    return side(bos), side(eos)


def text_format(tokenizer) -> dict[str, list[str]]:
    """``text_delimiters`` as token strings, ``{"start": ["<|endoftext|>"], "end": ["<|endoftext|>"]}``
    (an empty list where there is no token): what a store's manifest records of how text rows were framed."""
    return {side: [] if token is None else [tokenizer.convert_ids_to_tokens(token)]
            for side, token in zip(("start", "end"), text_delimiters(tokenizer))}


def _resolve_format(tokenizer, chat: bool | str) -> _Format:
    use_chat = _use_chat(tokenizer, chat)
    start, end = text_delimiters(tokenizer)
    return _Format(
        chat=use_chat,
        start=start,
        end=end,
        eos=tokenizer.eos_token_id,
        end_of_turn=end_of_turn_id(tokenizer) if use_chat else tokenizer.eos_token_id,
    )


def _ids(token: int | None) -> list[int]:
    return [] if token is None else [token]


def _plan_text(row: Row, fmt: _Format) -> list[_Piece]:
    return [_Piece("head", "no", ids=_ids(fmt.start)), _Piece("body", "yes", text=row.text),
            _Piece("body", "yes", ids=_ids(fmt.end))]


def _plan_prompt_response(row: Row, tokenizer, fmt: _Format) -> list[_Piece]:
    prompt, response = row.prompt, row.response
    if fmt.chat:
        prompt_ids = prompt_token_ids(prompt, tokenizer, chat=True)
        head = prompt_ids[:1] if prompt_ids[:1] == _ids(tokenizer.bos_token_id) else []
        return [_Piece("head", "no", ids=head), _Piece("prompt", "no", ids=prompt_ids[len(head):]),
                _Piece("body", "yes", text=response), _Piece("body", "yes", ids=_ids(fmt.end_of_turn))]
    return [_Piece("head", "no", ids=_ids(fmt.start)), _Piece("prompt", "no", text=prompt),
            _Piece("body", "yes", text=response), _Piece("body", "yes", ids=_ids(fmt.end))]


def _plan_messages_plain(row: Row, fmt: _Format) -> list[_Piece]:
    """open-instruct / LESS format: ``<|role|>\\n{content}\\n`` per turn, assistant content followed by eos."""
    pieces = [_Piece("head", "no", ids=_ids(fmt.start))]
    for message in row.messages:
        role, content = message["role"], message["content"]
        if role == "assistant":
            pieces += [_Piece("body", "no", text="<|assistant|>\n"), _Piece("body", "yes", text=content),
                       _Piece("body", "yes", ids=_ids(fmt.eos)), _Piece("body", "no", text="\n")]
        else:
            pieces.append(_Piece("body", "no", text=f"<|{role}|>\n{content}\n"))
    return pieces


def _plan_messages_chat(row: Row, tokenizer) -> list[_Piece]:
    """Render incrementally: message i contributes ``render(messages[:i+1])`` minus ``render(messages[:i])``;
    for an assistant turn the part up to ``render(messages[:i], add_generation_prompt=True)`` is its header
    (not a target). The template must have the prefix property, which is checked."""
    messages = row.messages
    pieces: list[_Piece] = []
    before = ""

    def extend(prefix: str, longer: str, what: str) -> str:
        if not longer.startswith(prefix):
            raise InputError(f"{row.source}: the chat template does not render conversations incrementally "
                             f"(rendering {what} changes the earlier text), so per-turn loss masks are undefined; "
                             f"use chat=False")
        return longer[len(prefix):]

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = _render(tokenizer, messages[:i], True, row.source)
            pieces.append(_Piece("body", "no", text=extend(before, header, f"the generation prompt of message {i}")))
            full = _render(tokenizer, messages[: i + 1], False, row.source)
            pieces.append(_Piece("body", "until_eot", text=extend(header, full, f"message {i}")))
        else:
            full = _render(tokenizer, messages[: i + 1], False, row.source)
            pieces.append(_Piece("body", "no", text=extend(before, full, f"message {i}")))
        before = full
    return pieces


def _plan_row(row: Row, tokenizer, fmt: _Format) -> list[_Piece]:
    if row.kind == "text":
        return _plan_text(row, fmt)
    if row.kind == "prompt_response":
        return _plan_prompt_response(row, tokenizer, fmt)
    if fmt.chat:
        return _plan_messages_chat(row, tokenizer)
    return _plan_messages_plain(row, fmt)


def _tokenize_pieces(pieces: list[_Piece], tokenizer, chunk: int = 2048) -> None:
    """Fill ``ids`` of every text piece, tokenising all texts in batched calls (``add_special_tokens=False``,
    so each segment's tokens are exactly its own and mask boundaries are exact)."""
    pending = [p for p in pieces if p.ids is None]
    for start in range(0, len(pending), chunk):
        group = pending[start : start + chunk]
        encoded = tokenizer([p.text for p in group], add_special_tokens=False, verbose=False)["input_ids"]
        for piece, ids in zip(group, encoded):
            piece.ids = list(ids)


def _piece_mask(piece: _Piece, end_of_turn: int | None) -> list[int]:
    if piece.target == "yes":
        return [1] * len(piece.ids)
    if piece.target == "no":
        return [0] * len(piece.ids)
    if end_of_turn is not None and end_of_turn in piece.ids:
        stop = piece.ids.index(end_of_turn) + 1
        return [1] * stop + [0] * (len(piece.ids) - stop)
    return [1] * len(piece.ids)


def _assemble(row: Row, pieces: list[_Piece], fmt: _Format, max_length: int | None) -> Encoded:
    """Concatenate pieces and apply the truncation policy (see ``encode_rows``)."""
    parts: dict[str, tuple[list[int], list[int]]] = {"head": ([], []), "prompt": ([], []), "body": ([], [])}
    for piece in pieces:
        ids, mask = parts[piece.part]
        ids += piece.ids
        mask += _piece_mask(piece, fmt.end_of_turn)
    (head, head_mask), (prompt, prompt_mask), (body, body_mask) = parts["head"], parts["prompt"], parts["body"]
    total = len(head) + len(prompt) + len(body)
    truncated = max_length is not None and total > max_length
    if truncated and row.kind == "prompt_response" and len(head) + len(body) <= max_length:
        keep = max_length - len(head) - len(body)  # drop prompt tokens from the left, keep the response
        prompt, prompt_mask = prompt[len(prompt) - keep :], prompt_mask[len(prompt) - keep :]
    elif truncated and row.kind == "prompt_response":
        prompt, prompt_mask = [], []
    input_ids = head + prompt + body
    loss_mask = head_mask + prompt_mask + body_mask
    if truncated:
        input_ids, loss_mask = input_ids[:max_length], loss_mask[:max_length]
    if loss_mask:
        loss_mask[0] = 0  # position 0 has nothing before it to predict it from
    return Encoded(id=row.id, input_ids=input_ids, loss_mask=loss_mask, truncated=truncated)


def encode_rows(
    rows: Sequence[Row], tokenizer, max_length: int | None = None, chat: bool | str = "auto"
) -> tuple[list[Encoded], EncodeReport]:
    """Tokenise rows into ``Encoded(id, input_ids, loss_mask, truncated)`` (target ⇔ ``loss_mask == 1``).

    Formats (each token only where the tokenizer defines it; each segment tokenised on its own with
    ``add_special_tokens=False``, so the mask boundary is exact). ``start`` / ``end`` are
    ``text_delimiters(tokenizer)``: ``bos`` / ``eos``, except on chat models whose bos/eos are turn markers,
    which get their document delimiter (SmolLM2-Instruct: ``<|endoftext|>`` on both sides):

    - text: ``[start] + tok(text) + [end]``; targets: every token after position 0.
    - prompt_response, plain: ``[start] + tok(prompt) + tok(response) + [end]``; targets: response + end. A
      prompt/response pair without the chat template is a document as well (the model sees no chat
      markup), so it is framed like one; ``prompt_token_ids`` agrees, so generation and scoring match.
    - prompt_response, chat (``chat="auto"`` with a ``chat_template``, or ``chat=True``):
      ``prompt_token_ids(prompt) + tok(response) + [end_of_turn]``; targets: response + end-of-turn token.
    - messages, plain (LESS / open-instruct): ``[start]`` then per turn ``<|system|>\\n{c}\\n``,
      ``<|user|>\\n{c}\\n``, ``<|assistant|>\\n{c}{eos}\\n``; targets: assistant ``{c}`` and its eos (there
      eos does end a turn, as in open-instruct's training data, so it stays).
    - messages, chat: the template rendered turn by turn (see ``_plan_messages_chat``); targets: what each
      assistant turn adds after the generation prompt, up to and including the end-of-turn token.

    Truncation (only when ``len > max_length``; the row is marked ``truncated=True`` and counted):
    prompt_response rows lose prompt tokens from the *start* of the prompt first (bos stays), because the
    loss measures the response; if bos + response alone is still too long, the prompt is dropped and the
    response is cut on the right. text and messages rows keep their first ``max_length`` tokens.
    Rows left with zero targets are kept and counted in ``EncodeReport.no_targets``.
    """
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise InputError(f"max_length: must be a positive integer, got {max_length!r}")
    fmt = _resolve_format(tokenizer, chat)
    plans = [_plan_row(row, tokenizer, fmt) for row in rows]
    _tokenize_pieces([piece for plan in plans for piece in plan], tokenizer)
    encoded = [_assemble(row, plan, fmt, max_length) for row, plan in zip(rows, plans)]
    report = EncodeReport(
        rows=len(encoded),
        tokens=sum(len(e.input_ids) for e in encoded),
        truncated=sum(e.truncated for e in encoded),
        no_targets=sum(e.n_targets == 0 for e in encoded),
        targets=sum(e.n_targets for e in encoded),
    )
    return encoded, report


def encode_row(row: Row, tokenizer, max_length: int | None = None, chat: bool | str = "auto") -> Encoded:
    """One row; exactly ``encode_rows([row], ...)[0][0]``."""
    return encode_rows([row], tokenizer, max_length=max_length, chat=chat)[0][0]


def data_fingerprint(encoded: Sequence[Encoded]) -> str:
    """sha256 (hex) over, per row in order: the id, the token ids and the loss mask, each length-prefixed
    (so concatenations cannot collide). Changes when any id, token, mask bit or the order changes."""
    digest = hashlib.sha256(b"dataworth-data-fingerprint-v1\0")
    for row in encoded:
        name = row.id.encode("utf-8")
        digest.update(len(name).to_bytes(8, "little") + name)
        digest.update(len(row.input_ids).to_bytes(8, "little"))
        digest.update(np.asarray(row.input_ids, dtype="<i8").tobytes())
        digest.update(np.asarray(row.loss_mask, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def without_end_token(row: Encoded, tokenizer) -> Encoded:
    """``row`` with its final end-of-sequence / end-of-turn / end-of-document target unmasked (kept in the input)."""
    ends = {t for t in (getattr(tokenizer, "eos_token_id", None), end_of_turn_id(tokenizer),
                        text_delimiters(tokenizer)[1]) if t is not None}
    if row.input_ids and row.input_ids[-1] in ends and row.loss_mask[-1] and row.n_targets > 1:
        return Encoded(row.id, row.input_ids, row.loss_mask[:-1] + [0], row.truncated)
    return row


def value_only(row: Encoded, tokenizer, value: str) -> Encoded | None:
    """``row`` measuring only the tokens of ``value`` inside its targets (the last occurrence), e.g. only
    ``" Paris"`` of the answer ``"Alice Smith was born in Paris."``; ``None`` when the targets do not
    contain ``value``'s tokens (tried with and without a leading space, as byte-level BPE attaches it).

    Why: a whole-sentence answer shares its template tokens ("… was born in …") with every document in
    that template; attributing the value alone asks what taught the model *the fact*.
    """
    targets = [i for i, m in enumerate(row.loss_mask) if m and i > 0]
    ids = row.input_ids
    for variant in (" " + value.strip(), value.strip()):
        pattern = list(tokenizer(variant, add_special_tokens=False)["input_ids"])
        if not pattern:
            continue
        wanted = set(targets)
        for start in range(len(ids) - len(pattern), 0, -1):
            span = range(start, start + len(pattern))
            if ids[start:start + len(pattern)] == pattern and all(i in wanted for i in span):
                mask = [1 if i in span else 0 for i in range(len(ids))]
                return Encoded(row.id, row.input_ids, mask, row.truncated)
    return None


# What a retrain measures per query: the response tokens, or the response plus its appended end token.
MEASURES = ("answer", "answer+end")


def measured_queries(queries: Sequence[Any], tokenizer: Any, measure: str) -> list:
    """The encoded queries with exactly the ``measure``d targets in their loss masks (``MEASURES``)."""
    if measure == "answer":
        return [without_end_token(q, tokenizer) for q in queries]
    return list(queries)
