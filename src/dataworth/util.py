"""Small things every stage needs once: atomic files, hashes, devices, pad ids, messages, progress bars.

Why a module of its own: each of these was written several times with slightly different behaviour (three
pad-id fallbacks, ten atomic writes, two device parsers). Here each is written once; a stage imports this
module and `dataworth.errors`, nothing else that is not upstream of it. No torch at import time: the
numpy-only store readers import this module too (torch is imported inside the two functions that need it).
The writer lock (`directory_lock`) and the directory swap (`swap_directory`) live here too: both the store
and the scores directory need them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import resource
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from dataworth.errors import InputError

HASH_CHUNK = 1 << 24  # 16 MiB: hashing a file never holds more than this in memory
LOCK_FILE = ".dataworth.lock"


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
        # Some writers (safetensors) create their file 0600; every file we write gets what open() would give.
        os.chmod(tmp, 0o666 & ~process_umask())
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


_UMASK: list[int] = []
_UMASK_LOCK = threading.Lock()


def process_umask() -> int:
    """The process umask, read once: from ``/proc/self/status`` where there is one, else by setting and
    restoring it (``os.umask`` can only be read that way, so never twice at once)."""
    with _UMASK_LOCK:
        if not _UMASK:
            try:
                line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("Umask:"))
                _UMASK.append(int(line.split()[1], 8))
            except (OSError, StopIteration, ValueError, IndexError):
                _UMASK.append(os.umask(0o022))
                os.umask(_UMASK[0])
        return _UMASK[0]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"sha256", "size"}`` of a file as written: what a manifest or summary records to verify it later."""
    return {"sha256": file_sha256(path), "size": os.stat(path).st_size}


def verify_file(path: str | os.PathLike, rel: str, record: dict[str, Any] | str, *, source: str,
                remedy: str, hash_it: bool = True) -> None:
    """InputError naming ``path`` unless it exists and matches ``record`` (a ``file_record`` or a bare sha256).

    The size is compared first (a truncated file is caught without reading it); ``hash_it=False`` stops
    there. ``source`` says where the record lives ("the manifest"), ``remedy`` what to do about a mismatch.
    """
    path = Path(path)
    expected = {"sha256": record} if isinstance(record, str) else dict(record)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(f"{path}: missing ({rel} is listed in {source}); {remedy}") from None
    if expected.get("size") is not None and size != expected["size"]:
        raise InputError(f"{path}: size {size} bytes, {source} records {expected['size']} (truncated or "
                         f"replaced {rel}); {remedy}")
    if hash_it and file_sha256(path) != expected.get("sha256"):
        raise InputError(f"{path}: checksum error in {rel} (sha256 differs from {source}); {remedy}")


# ---------------------------------------------------------------------------------------------------------
# Writer lock: one writer per directory at a time, across processes

_HELD_LOCKS: dict[str, tuple[int, object]] = {}  # real path of a locked directory -> (flock fd, holder token)
_HELD_LOCKS_GUARD = threading.Lock()


def acquire_directory_lock(directory: str | os.PathLike, what: str = "directory") -> object | None:
    """Take the exclusive writer lock of ``directory`` (``DIR/.dataworth.lock``, ``flock``, holding our pid).

    Returns a token when this call took the lock (give it to `release_directory_lock`), None when this
    process already holds it (a writer inside a writer: the outer one releases). Another process holding
    it → InputError naming its pid. The kernel drops a flock when its process dies, so the file a killed
    writer left is simply taken over. The file is removed on release while still locked; a process that
    opened it just before then finds that the path no longer names the inode it locked, and tries again.
    """
    directory = Path(directory)
    key = os.path.realpath(directory)
    with _HELD_LOCKS_GUARD:
        if key in _HELD_LOCKS:
            return None
        target = directory / LOCK_FILE
        while True:
            fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise InputError(f"{directory}: another dataworth process (pid {holder}) is writing this {what} "
                                 f"(lock {target}); wait for it to finish or stop it") from None
            if _same_file(fd, target):
                break
            os.close(fd)  # released and removed by its holder meanwhile: lock the new file
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        token = object()
        _HELD_LOCKS[key] = (fd, token)
        return token


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def release_directory_lock(directory: str | os.PathLike, token: object | None = None) -> None:
    """Give up the writer lock of ``directory`` (removing the lock file): the one ``token`` took, or with
    ``token=None`` whichever this process holds. A token whose lock was already released does nothing."""
    key = os.path.realpath(directory)
    with _HELD_LOCKS_GUARD:
        held = _HELD_LOCKS.get(key)
        if held is None or (token is not None and held[1] is not token):
            return
        del _HELD_LOCKS[key]
        try:
            (Path(directory) / LOCK_FILE).unlink(missing_ok=True)
        finally:
            os.close(held[0])


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, what: str = "directory") -> Iterator[None]:
    """Hold the writer lock of ``directory`` for a block (`acquire_directory_lock`); released after it unless
    an outer holder in this process took it first."""
    token = acquire_directory_lock(directory, what)
    try:
        yield
    finally:
        if token is not None:
            release_directory_lock(directory, token)


# ---------------------------------------------------------------------------------------------------------
# Replacing a whole directory: a reader sees the old one or the new one, never a mix


def staging_directory(target: str | os.PathLike, token: int | None = None) -> Path:
    """A fresh sibling of ``target`` to fill before `swap_directory` moves it in: ``.NAME.staging-<pid>``.

    Beside ``target`` so the final rename stays on one filesystem. ``token`` (default: our pid) lets the
    ranks of one run agree on the name.
    """
    target = Path(os.path.realpath(target))
    staging = target.with_name(f".{target.name}.staging-{os.getpid() if token is None else token}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def swap_directory(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Replace the directory ``target`` by ``staging``: rename the old one away, rename the new one in, delete
    the old one. No file of the old directory survives in the new one.

    The renames run under an ``flock`` of the parent directory, so two runs finishing at once replace the
    directory one after the other (the last one wins) instead of failing half-way. A crash between the
    two renames leaves the old contents in ``.NAME.old-<pid>`` beside an absent ``target``.
    """
    staging = Path(staging)
    target = Path(os.path.realpath(target))
    fsync_dir(staging)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.rename(target, old)
        os.rename(staging, target)
        fsync_dir(target.parent)
    finally:
        os.close(fd)  # releases the flock
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


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


def peak_resident_bytes() -> int:
    """This process's peak resident memory so far (``ru_maxrss``), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def resident_bytes() -> int:
    """This process's resident memory now (``/proc/self/statm``), else its peak so far: the baseline a memory
    plan adds to (libraries, the loaded model, mapped weight files)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_resident_bytes()


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
