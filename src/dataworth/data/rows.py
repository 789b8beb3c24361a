"""Rows: a data spec in, validated rows with stable ids and exact sources out (`load_rows`).

Why a module of its own: every later number is credited to a row by its id, so ids must be stable and every
bad row must be reported where it is (``path:line``), never dropped silently.

Row kinds (checked in this order; the first that applies wins):

==================  =========================================================  ==============================
kind                fields                                                     loss measures
==================  =========================================================  ==============================
``messages``        ``messages``: list of ``{role, content}``, roles           assistant content + its
                    system/user/assistant, ≥ 1 assistant turn with content      end-of-turn token
``prompt_response`` ``prompt`` + ``response`` (strings; the response not       response tokens + eos /
                    blank). Aliases: response may be ``completion`` or         end-of-turn token
                    ``output``; prompt may be ``instruction`` (+ optional
                    ``input``, joined as ``instruction + "\\n\\n" + input``,
                    the Alpaca convention)
``text``            ``text`` (string)                                          every token after position 0
==================  =========================================================  ==============================

Every other field (``id``, ``source``, ``task``, ``dataset``, …) is kept in ``Row.data`` untouched.
A row's id is its ``id`` field (string or integer, stringified) or else its 0-based index among all rows
of the spec (bad rows included, so ids do not shift when ``skip_bad`` drops some).
``Row.source`` is ``path:line`` for files (line = 1-based line of a JSONL row or of the start of a JSON
array item; for parquet, the 1-based row number), ``hf:NAME:SPLIT#i`` or ``builtin:NAME:SPLIT#i``
(0-based) otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl

from dataworth.data.worlds import builtin_rows
from dataworth.errors import InputError, one_line
from dataworth.util import write_jsonl_atomic

logger = logging.getLogger(__name__)
Kind = Literal["text", "prompt_response", "messages"]
ROLES = ("system", "user", "assistant")
DATA_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
PROMPT_KEYS = ("prompt", "instruction")
RESPONSE_KEYS = ("response", "completion", "output")


@dataclass(frozen=True)
class Row:
    """One validated row. ``data`` is the original row with every field; the properties below resolve the
    field aliases of the module docstring, so encoders never look at raw keys."""

    id: str
    kind: Kind
    data: dict
    source: str

    @property
    def text(self) -> str:
        if self.kind != "text":
            raise ValueError(f"{self.source}: row {self.id!r} is a {self.kind} row, not text")
        return self.data["text"]

    @property
    def prompt(self) -> str:
        return self._prompt_response()[0]

    @property
    def response(self) -> str:
        return self._prompt_response()[1]

    @property
    def messages(self) -> list[dict[str, str]]:
        """The conversation reduced to ``{"role", "content"}`` dicts (extra per-message keys dropped)."""
        if self.kind != "messages":
            raise ValueError(f"{self.source}: row {self.id!r} is a {self.kind} row, not messages")
        return [{"role": m["role"], "content": m["content"]} for m in self.data["messages"]]

    def _prompt_response(self) -> tuple[str, str]:
        if self.kind != "prompt_response":
            raise ValueError(f"{self.source}: row {self.id!r} is a {self.kind} row, not prompt_response")
        return _resolve_prompt_response(self.data)


@dataclass(frozen=True)
class BadRow:
    """A row skipped by ``skip_bad``: its id (the ``id`` field if readable, else ``source``), where, why."""

    id: str
    source: str
    reason: str


class _RowProblem(Exception):
    """Internal: what is wrong with one row (the location is added by the caller)."""


@dataclass(frozen=True)
class _Record:
    """A raw row as read from its container, before validation. ``problem`` is set when the row could not
    even be decoded (bad UTF-8, broken JSON line)."""

    source: str
    value: Any = None
    problem: str | None = None


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    if value is None:
        return "null"
    return names.get(type(value), type(value).__name__)


def _present(data: Mapping, key: str) -> bool:
    # Columnar sources (parquet, 🤗 datasets) fill absent fields with None: treat None as absent.
    return data.get(key) is not None


def _one_key(data: Mapping, keys: Sequence[str]) -> str | None:
    found = [k for k in keys if _present(data, k)]
    if len(found) > 1:
        raise _RowProblem(f"fields {', '.join(repr(k) for k in found)} are aliases of each other; keep one")
    return found[0] if found else None


def _string_field(data: Mapping, key: str) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise _RowProblem(f"field '{key}' must be a string, got {_json_type(value)}")
    return value


def _absent(data: Mapping, keys: Sequence[str]) -> str:
    """How the field ``keys[0]`` (or an alias) is absent: ``missing``, or ``is null`` when the row holds it as null."""
    held = next((k for k in keys if k in data), None)
    return f"field '{held}' is null, expected a string" if held else f"field '{keys[0]}' missing"


def _resolve_prompt_response(data: Mapping) -> tuple[str, str]:
    """``(prompt, response)`` of a prompt/response row, resolving aliases (see module docstring).

    An empty or whitespace-only response is refused, as an assistant turn without content is: the loss
    would measure the end-of-sequence token alone and the row would be scored as if it said something."""
    prompt_key = _one_key(data, PROMPT_KEYS)
    response_key = _one_key(data, RESPONSE_KEYS)
    if prompt_key is None:
        raise _RowProblem(f"{_absent(data, PROMPT_KEYS)} (the row has '{response_key}')")
    if response_key is None:
        raise _RowProblem(f"{_absent(data, RESPONSE_KEYS)} (the row has '{prompt_key}')")
    prompt = _string_field(data, prompt_key)
    response = _string_field(data, response_key)
    if not response.strip():
        raise _RowProblem(f"field '{response_key}' is empty (nothing to measure: the loss would be the "
                          "end-of-sequence token alone)")
    if prompt_key == "instruction" and _present(data, "input"):
        extra = _string_field(data, "input")
        if extra:
            prompt = f"{prompt}\n\n{extra}"
    return prompt, response


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise _RowProblem(f"field 'messages' must be an array of {{role, content}} objects, got {_json_type(messages)}")
    answered = False
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise _RowProblem(f"field 'messages[{i}]' must be an object, got {_json_type(message)}")
        for key in ("role", "content"):
            if key not in message or message[key] is None:
                raise _RowProblem(f"field 'messages[{i}].{key}' missing")
            if not isinstance(message[key], str):
                raise _RowProblem(f"field 'messages[{i}].{key}' must be a string, got {_json_type(message[key])}")
        if message["role"] not in ROLES:
            raise _RowProblem(f"field 'messages[{i}].role': unknown role {message['role']!r} "
                              f"(expected {', '.join(ROLES)})")
        answered = answered or (message["role"] == "assistant" and message["content"].strip() != "")
    if not answered:
        raise _RowProblem("field 'messages' has no assistant turn with non-empty content (nothing to measure)")


def _classify(data: Any) -> Kind:
    if not isinstance(data, Mapping):
        raise _RowProblem(f"row must be a JSON object, got {_json_type(data)}")
    if _present(data, "messages"):
        _check_messages(data["messages"])
        return "messages"
    if _one_key(data, PROMPT_KEYS) is not None:
        _resolve_prompt_response(data)
        return "prompt_response"
    if _present(data, "text"):
        _string_field(data, "text")
        return "text"
    response_key = _one_key(data, RESPONSE_KEYS)
    if response_key is not None:
        raise _RowProblem(f"{_absent(data, PROMPT_KEYS)} (the row has '{response_key}')")
    nulls = [k for k in ("text", "messages", *PROMPT_KEYS) if k in data]  # present, but null (else handled above)
    if nulls:
        raise _RowProblem(f"field '{nulls[0]}' is null (a row needs a string 'text', 'prompt'+'response' "
                          "or a 'messages' array)")
    keys = ", ".join(repr(k) for k in list(data)[:8]) or "none"
    raise _RowProblem(f"no 'text', 'prompt'+'response' or 'messages' field (fields: {keys})")


def _row_id(data: Mapping, index: int) -> str:
    value = data.get("id")
    if value is None:
        return str(index)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _RowProblem(f"field 'id' must be a string or an integer, got {_json_type(value)}")
    return str(value)


def _readable_id(record: _Record) -> str | None:
    if isinstance(record.value, Mapping):
        value = record.value.get("id")
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    return None


def _read_jsonl(path: Path, shown: str) -> Iterator[_Record]:
    """One record per non-blank line; undecodable lines become records with a ``problem``."""
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            source = f"{shown}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad_byte = f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1}"
                yield _Record(source, problem=f"not valid UTF-8 ({bad_byte})")
                continue
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield _Record(source, problem=f"invalid JSON: {exc.msg} (column {exc.colno})")
                continue
            yield _Record(source, value)


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _skip_ws(text: str, pos: int) -> int:
    return _WHITESPACE.match(text, pos).end()


def _scan_array(text: str, pos: int) -> Iterator[tuple[Any, int]]:
    """Items of the (already validated) JSON array starting at ``text[pos] == "["`` with their start offsets."""
    pos = _skip_ws(text, pos + 1)
    while text[pos] != "]":
        value, end = _DECODER.raw_decode(text, pos)
        yield value, pos
        pos = _skip_ws(text, end)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)


def _find_member(text: str, pos: int, wanted: str) -> int:
    """Offset of the value of member ``wanted`` in the (already validated) JSON object at ``text[pos]``."""
    found = -1
    pos = _skip_ws(text, pos + 1)
    while text[pos] != "}":
        key, pos = _DECODER.raw_decode(text, pos)
        pos = _skip_ws(text, _skip_ws(text, pos) + 1)  # past ':'
        if key == wanted:
            found = pos  # the last duplicate wins, as in json.loads
        _, pos = _DECODER.raw_decode(text, pos)
        pos = _skip_ws(text, pos)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    return found


def _read_json(path: Path, shown: str) -> Iterator[_Record]:
    """A ``.json`` file: a list of rows, or an object with exactly one list value (``{"data": [...]}``).
    Each item's source line is the line where the item starts."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{shown}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x})") from None
    text = text.removeprefix("\ufeff")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{shown}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    start = _skip_ws(text, 0)
    if isinstance(whole, dict):
        lists = [key for key, value in whole.items() if isinstance(value, list)]
        if len(lists) != 1:
            keys = ", ".join(repr(k) for k in whole) or "none"
            raise InputError(f"{shown}:1: a .json file must hold a list of rows or an object with exactly one "
                             f"list value; this object has {len(lists)} list values (keys: {keys})")
        start = _find_member(text, start, lists[0])
    elif not isinstance(whole, list):
        raise InputError(f"{shown}:1: a .json file must hold a list of rows, got a JSON {_json_type(whole)}")
    line, last = 1, 0
    for value, pos in _scan_array(text, start):
        line += text.count("\n", last, pos)
        last = pos
        yield _Record(f"{shown}:{line}", value)


def _read_parquet(path: Path, shown: str) -> Iterator[_Record]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise InputError(f"{shown}: cannot read parquet: {one_line(exc)}") from None
    number = 0
    for chunk in parquet.iter_batches(batch_size=4096):
        for value in chunk.to_pylist():
            number += 1
            yield _Record(f"{shown}:{number}", value)


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet}


def _data_files(root: Path) -> tuple[list[Path], list[Path]]:
    """``(data files, other files)`` below ``root``, each sorted by relative POSIX path; hidden files and
    folders (``.git``, ``.DS_Store``) are in neither."""
    found, other = [], []
    for path in root.rglob("*"):
        if any(part.startswith(".") for part in path.relative_to(root).parts) or not path.is_file():
            continue
        (found if path.suffix.lower() in DATA_SUFFIXES else other).append(path)
    return tuple(sorted(paths, key=lambda p: p.relative_to(root).as_posix()) for paths in (found, other))


def _listing(root: Path, paths: Sequence[Path], shown: int = 5) -> str:
    """The first ``shown`` paths relative to ``root``, and how many more: ``a.csv, b/c.txt and 3 more``."""
    names = ", ".join(p.relative_to(root).as_posix() for p in paths[:shown])
    return names + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def _note_skipped_files(spec: str, root: Path, skipped: Sequence[Path]) -> None:
    """Say on stderr which files of a data directory were not read: a file of rows in another format
    (``.csv``, ``.txt``, ``.jsonl.gz``) must never be left out silently."""
    if skipped:
        logger.warning("%s: skipped %d file(s) of unsupported type (read: .jsonl, .ndjson, .json, .parquet): %s",
                       spec, len(skipped), _listing(root, skipped))


def _path_records(spec: str) -> Iterator[_Record]:
    path = Path(spec)
    if path.is_dir():
        files, skipped = _data_files(path)
        if not files:
            hint = ""
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                hint = f"; it looks like a datasets.save_to_disk folder: use hf:{spec}"
            found = f" (it holds {_listing(path, skipped)})" if skipped else ""
            raise InputError(f"{spec}: directory holds no .jsonl/.ndjson/.json/.parquet files{found}{hint}")
        if any(f.name in ("dataset_info.json", "dataset_dict.json", "state.json") for f in files):
            raise InputError(f"{spec}: looks like a datasets.save_to_disk folder; use hf:{spec}")
        _note_skipped_files(spec, path, skipped)
        for file in files:
            yield from _READERS[DATA_SUFFIXES[file.suffix.lower()]](file, str(file))
        return
    if not path.exists():
        raise InputError(f"{spec}: no such file or directory")
    fmt = DATA_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{spec}: unsupported file type '{path.suffix}' (expected .jsonl, .ndjson, .json or .parquet)")
    yield from _READERS[fmt](path, spec)


def _parse_hf(rest: str) -> tuple[str, str | None]:
    """``NAME[:SPLIT]`` → (name, split or None). A local folder name may itself contain ':'."""
    if Path(rest).is_dir() or ":" not in rest:
        return rest, None
    name, split = rest.rsplit(":", 1)
    return name, (split or None)


def _force_offline() -> None:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets.config
    import huggingface_hub.constants

    # Both libraries read the variables at import time; set the flags too in case they were imported earlier.
    for module, name in ((datasets.config, "HF_DATASETS_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                         (huggingface_hub.constants, "HF_HUB_OFFLINE")):
        if hasattr(module, name):
            setattr(module, name, True)


def _hf_records(spec: str) -> Iterator[_Record]:
    """``hf:NAME[:SPLIT]``: a ``save_to_disk`` folder, or a dataset in the local 🤗 cache (never downloads)."""
    name, split = _parse_hf(spec[len("hf:"):])
    if not name:
        raise InputError(f"{spec}: expected hf:NAME[:SPLIT]")
    _force_offline()
    import datasets

    if Path(name).is_dir():
        try:
            loaded = datasets.load_from_disk(name)
        except Exception as exc:
            raise InputError(f"hf:{name}: cannot load a save_to_disk folder: {one_line(exc)}") from None
        if isinstance(loaded, datasets.DatasetDict):
            split = split or "train"
            if split not in loaded:
                raise InputError(f"hf:{name}: no split '{split}' (splits: {', '.join(loaded)})")
            dataset, prefix = loaded[split], f"hf:{name}:{split}"
        else:
            if split is not None:
                raise InputError(f"hf:{name}:{split}: the folder holds a single Dataset without splits; "
                                 f"drop ':{split}'")
            dataset, prefix = loaded, f"hf:{name}"
    else:
        split = split or "train"
        try:
            dataset = datasets.load_dataset(name, split=split)
        except Exception as exc:
            raise InputError(f"hf:{name}:{split}: not available offline in the local 🤗 datasets cache "
                             f"({type(exc).__name__}: {one_line(exc)[:200]})") from None
        prefix = f"hf:{name}:{split}"
    for i, value in enumerate(dataset):
        yield _Record(f"{prefix}#{i}", value)


def _builtin_records(spec: str) -> Iterator[_Record]:
    """``builtin:NAME[:SPLIT][?key=value&...]`` → ``dataworth.data.worlds.builtin_rows(name, split, params)``."""
    body, _, query = spec[len("builtin:"):].partition("?")
    name, _, split = body.partition(":")
    split = split or "train"
    if not name:
        raise InputError(f"{spec}: expected builtin:NAME[:SPLIT][?key=value&...]")
    params: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise InputError(f"{spec}: cannot parse parameters '{query}' (expected key=value&key=value)") from None
    for key, value in pairs:
        if key in params:
            raise InputError(f"{spec}: parameter '{key}' given twice")
        params[key] = value
    for i, value in enumerate(builtin_rows(name, split, params)):
        yield _Record(f"builtin:{name}:{split}#{i}", value)


def _records(spec: str) -> Iterator[_Record]:
    if spec.startswith("hf:"):
        return _hf_records(spec)
    if spec.startswith("builtin:"):
        return _builtin_records(spec)
    return _path_records(spec)


def _write_bad_ids(bad: Sequence[BadRow], out: str | Path) -> None:
    """One JSON object per bad row (``id``, ``source``, ``reason``), written atomically."""
    write_jsonl_atomic(out, ({"id": row.id, "source": row.source, "reason": row.reason} for row in bad))


def load_rows_report(
    spec: str | Path, *, skip_bad: bool = False, bad_ids_out: str | Path | None = None
) -> tuple[list[Row], list[BadRow]]:
    """Parse and validate every row of ``spec``; return ``(rows, bad)``.

    ``spec``: a ``.jsonl``/``.ndjson``/``.json``/``.parquet`` file, a directory (all such files below it,
    hidden ones skipped, in sorted relative-path order, concatenated), ``hf:NAME[:SPLIT]`` (a
    ``save_to_disk`` folder or the local 🤗 datasets cache only; split defaults to ``train``), or
    ``builtin:NAME[:SPLIT][?key=value&...]``.

    The first bad row raises ``InputError("<source>: <what is wrong>")`` unless ``skip_bad``: then bad rows
    (undecodable lines, non-objects, missing/mistyped fields, duplicate ids) are left out and listed in
    ``bad``, and also written to ``bad_ids_out`` (JSONL: id, source, reason) when given. A spec with no
    good rows is an error either way. File-level damage (an unparsable ``.json`` or parquet file) always
    raises, since no row of it can be located.
    """
    spec = str(spec)
    rows: list[Row] = []
    bad: list[BadRow] = []
    first_seen: dict[str, str] = {}
    for index, record in enumerate(_records(spec)):
        try:
            if record.problem is not None:
                raise _RowProblem(record.problem)
            kind = _classify(record.value)
            row_id = _row_id(record.value, index)
            if row_id in first_seen:
                raise _RowProblem(f"duplicate id {row_id!r} (first at {first_seen[row_id]})")
        except _RowProblem as problem:
            reason = one_line(str(problem))
            if not skip_bad:
                raise InputError(f"{record.source}: {reason}") from None
            bad.append(BadRow(id=_readable_id(record) or record.source, source=record.source, reason=reason))
            continue
        first_seen[row_id] = record.source
        rows.append(Row(id=row_id, kind=kind, data=dict(record.value), source=record.source))
    if bad_ids_out is not None:
        _write_bad_ids(bad, bad_ids_out)
    if bad:
        listed = f", listed in {bad_ids_out}" if bad_ids_out else ""
        logger.warning("%s: skipped %d bad row(s)%s", spec, len(bad), listed)
    if not rows:
        raise InputError(f"{spec}: empty dataset (no rows)" + (f"; all {len(bad)} rows were bad" if bad else ""))
    return rows, bad


def load_rows(spec: str | Path, *, skip_bad: bool = False, bad_ids_out: str | Path | None = None) -> list[Row]:
    """The rows of ``spec`` (see ``load_rows_report``, which also returns the skipped bad rows)."""
    return load_rows_report(spec, skip_bad=skip_bad, bad_ids_out=bad_ids_out)[0]
