"""Small things every stage needs once: atomic files, hashes, devices, pad ids, messages, progress bars.

Why a module of its own: each of these was written several times with slightly different behaviour (three
pad-id fallbacks, ten atomic writes, two device parsers). Here each is written once; a stage imports this
module and `dataworth.errors`, nothing else that is not upstream of it. No torch at import time: the
numpy-only store readers import this module too (torch is imported inside the two functions that need it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from dataworth.errors import InputError

HASH_CHUNK = 1 << 24  # 16 MiB: hashing a file never holds more than this in memory


# ---------------------------------------------------------------------------------------------------------
# Atomic files: a killed run never leaves a half-written file that looks whole


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: some filesystems refuse fsync on directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield ``path.tmp-<pid>`` to write; on success fsync it and ``os.replace`` it onto ``path``.

    The parent directory is created; the temporary file is removed whatever happens, so an exception leaves
    ``path`` as it was (absent, or the previous complete version). An ``OSError`` that names no file (a full
    disk fails in ``write``, which knows no path) or only the temporary one is re-raised naming ``path``, so
    the user learns where, in the name they gave.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        if exc.filename not in (None, str(tmp), tmp):
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` fills a temporary file (any writer that takes a path: pandas, numpy, safetensors), which
    then replaces ``path`` atomically (`atomic_path`)."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, value: Any, *, indent: int = 2, sort_keys: bool = True) -> Path:
    """``value`` as JSON (plus a final newline) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """One JSON object per line (UTF-8, non-ASCII kept) to ``path`` atomically."""
    return write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Comparing configurations (store resumption, distributed agreement, retrain caches)


def first_difference(old: Any, new: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key (``model.fingerprint``, ``modules[2].k_out``) where two JSON-like values differ,
    with both values; None when equal. Lists and tuples compare alike; ``1`` and ``1.0`` differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(new) + [k for k in old if k not in new]:
            sub = f"{key}.{k}" if key else str(k)
            if k not in old or k not in new:
                return sub, old.get(k, "<missing>"), new.get(k, "<missing>")
            found = first_difference(old[k], new[k], sub)
            if found:
                return found
        return None
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        for i, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b, f"{key}[{i}]")
            if found:
                return found
        if len(old) != len(new):
            return f"{key} length", len(old), len(new)
        return None
    if old != new or type(old) is not type(new):
        return key, old, new
    return None


def short(value: Any, limit: int = 60) -> str:
    """A value for an error message: strings as they are (pass ``repr(v)`` or ``json.dumps(v)`` to quote them),
    anything else as sorted JSON (``repr`` when it is not JSON), cut to ``limit`` characters with an ellipsis."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, sort_keys=True)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------------------
# Devices, tokenizers, threads


def resolve_device(spec: Any = "auto"):
    """``"auto"`` → CUDA when available, else CPU; otherwise ``torch.device(spec)`` ("cpu", "cuda:1", "mps").

    A malformed device string or an unavailable CUDA device is an ``InputError`` naming ``--device``.
    """
    import torch

    if isinstance(spec, torch.device):
        return spec
    text = str(spec).strip().lower()
    if text in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise InputError(f"--device: '{spec}' is not a device (use auto, cpu, cuda, cuda:N, mps)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device: '{spec}' requested but CUDA is not available on this machine")
    return device


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its eos token, else 0.

    Which id it is never changes a result: padding is on the right, has attention 0 and loss mask 0, and a
    causal model's real positions never see it.
    """
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Temporarily set torch's intra-op CPU threads (``None``: unchanged)."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# Messages and progress


# Characters that must never reach a page or a terminal raw (`displayable`): C0/C1 controls other than tab,
# newline and carriage return; every Unicode format character (category Cf: the bidi controls U+061C,
# U+200E/F, U+202A–U+202E, U+2066–U+2069, zero-width spaces and joiners, soft hyphen, BOM, interlinear and
# tag characters, …); the line and paragraph separators U+2028/U+2029; lone surrogates. Hard-coded (a scan of
# the Unicode database costs 0.15 s per process); tests check it covers every Cf character Python knows.
_INVISIBLE = ("\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2"
              "\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff"
              "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
              "\U000e0001\U000e0020-\U000e007f")
# Per mode: the letters that start an escape, and what else is escaped. A run of backslashes right before
# such a letter or an escaped character is doubled, so the display stays reversible (the text's four
# characters ``\x1b`` show as ``\\x1b``, the one character ESC as ``\x1b``) while ``\frac`` stays ``\frac``.
_DISPLAY_PATTERNS = {
    one_line: re.compile(rf"(\\+)(?=[{letters}])|(\\*)([{_INVISIBLE}{extra}])")
    for one_line, letters, extra in ((False, "xuU", ""), (True, "xuUtnr", "\t\n\r"))
}
_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape_char(char: str) -> str:
    code = ord(char)
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _reversible_match(match: re.Match) -> str:
    if match.group(1) is not None:
        return match.group(1) * 2
    return match.group(2) * 2 + _escape_char(match.group(3))


def _plain_match(match: re.Match) -> str:
    if match.group(1) is not None:
        return match.group(1)
    return match.group(2) + _escape_char(match.group(3))


def displayable(text: str, *, one_line: bool = False, reversible: bool = True) -> str:
    """``text`` safe to show anywhere data is displayed (report HTML and Markdown, terminal tables, error lines):
    every invisible or layout-changing character (`_INVISIBLE`: controls, bidi overrides such as U+202E,
    zero-width and other format characters, lone surrogates) becomes a visible ``\\xNN`` / ``\\uNNNN`` /
    ``\\UNNNNNNNN``, so ``"gnp\\u202e.exe"`` cannot pass for ``exe.png``; ``one_line`` also escapes tab, newline
    and carriage return (``\\t``, ``\\n``, ``\\r``) for one-line displays. Reversible: backslashes that precede
    an escape letter are doubled — except with ``reversible=False``, for prose such as an error message, whose
    quoted values are already ``repr``-escaped. Not HTML escaping (that is ``reports.render.esc``)."""
    return _DISPLAY_PATTERNS[one_line].sub(_reversible_match if reversible else _plain_match, text)


def finite_number(value: Any, name: str) -> float:
    """``value`` as a float, or an ``InputError`` naming ``name`` (a flag or field) when it is NaN or ±inf.

    Why: ``float("inf") > 0`` passes every range check, and ``nan`` fails them with a misleading message."""
    number = float(value)
    if not math.isfinite(number):
        raise InputError(f"{name}: must be a finite number, got {value}")
    return number


def say(message: str) -> None:
    """A progress or plan line on stderr (stdout is for results)."""
    print(message, file=sys.stderr, flush=True)


def human_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def redraw_interval() -> float:
    """Seconds between progress redraws: 0.1 on a terminal, 1 when stderr is a file (CI, cluster logs)."""
    return 0.1 if sys.stderr.isatty() else 1.0


def progress_bar(total: int, desc: str, *, unit: str = "row", enabled: bool = True):
    """A tqdm bar on stderr that redraws at most every `redraw_interval` and disappears when done."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False,
                mininterval=redraw_interval())
