"""Shared utilities: what reaches a screen is visible and unambiguous, numbers are finite, and an OSError
names its file."""

from __future__ import annotations

import errno
import sys
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataworth.errors import InputError
from dataworth.util import atomic_path, displayable, finite_number

BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_NAMED = {"t": "\t", "n": "\n", "r": "\r"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}


def undisplay(shown: str, one_line: bool = False) -> str:
    """The inverse of `displayable`, written from its documented rule (a test oracle, not package code): a run
    of backslashes before an escape letter is halved; when the run was odd, an escape follows it."""
    letters = "xuUtnr" if one_line else "xuU"
    out, i = [], 0
    while i < len(shown):
        run_end = i
        while run_end < len(shown) and shown[run_end] == "\\":
            run_end += 1
        run = run_end - i
        if run == 0:
            out.append(shown[i])
            i += 1
        elif run_end < len(shown) and shown[run_end] in letters:
            out.append("\\" * (run // 2))
            i = run_end
            if run % 2:  # the last backslash starts an escape
                letter = shown[i]
                width = _HEX_DIGITS.get(letter, 0)
                out.append(chr(int(shown[i + 1:i + 1 + width], 16)) if width else _NAMED[letter])
                i += 1 + width
        else:
            out.append(shown[i:run_end])
            i = run_end
    return "".join(out)


def invisible(char: str) -> bool:
    """Characters no display may show raw: controls (bar tab, newline, CR), format characters (Cf, the bidi
    controls among them), line/paragraph separators and surrogates."""
    return (unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs")) and char not in "\t\n\r"


hostile_text = st.text(alphabet=st.one_of(
    st.characters(),  # any code point but surrogates, which the list below adds
    st.sampled_from(list(BIDI_CONTROLS + "\\xuUtnr0a\t\n\r\x00\x1b\u200b\u2028\ufeff\U000e0041\ud800\udfff")),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(hostile_text, st.booleans())
def test_displayable_shows_no_invisible_character_and_is_reversible(text, one_line):
    shown = displayable(text, one_line=one_line)
    assert not [c for c in shown if invisible(c) or (one_line and c in "\t\n\r")], ascii(shown)
    assert undisplay(shown, one_line) == text  # reversible, hence two different texts never look the same


def test_right_to_left_override_cannot_disguise_a_file_name():
    assert displayable("invoice gnp\u202e.exe") == "invoice gnp\\u202e.exe"
    assert displayable("a\u2067b\u2069c\u061cd") == "a\\u2067b\\u2069c\\u061cd"
    assert displayable("id\r\nx\ty", one_line=True) == "id\\r\\nx\\ty"
    assert displayable("tab\tand\nline") == "tab\tand\nline"  # multi-line displays keep their layout
    assert displayable("\\frac{1}{2} C:\\data") == "\\frac{1}{2} C:\\data"  # ordinary backslashes are kept
    assert displayable("\\x1b") == "\\\\x1b" and displayable("\x1b") == "\\x1b"


def test_prose_keeps_its_backslashes_and_still_escapes_invisible_characters():
    message = "x.jsonl:3: duplicate id 'a\\nb' (first at x.jsonl:1) \u202eevil\r"
    assert displayable(message, one_line=True, reversible=False) == \
        "x.jsonl:3: duplicate id 'a\\nb' (first at x.jsonl:1) \\u202eevil\\r"


def test_every_format_character_python_knows_is_escaped():
    """The escaped set is written out by hand (fast to import); it must cover the running Unicode database."""
    missing = [f"U+{c:04X}" for c in range(sys.maxunicode + 1)
               if invisible(chr(c)) and displayable(chr(c)) == chr(c)]
    assert not missing


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "nan", "inf"])
def test_finite_number_refuses_nan_and_infinity_naming_the_flag(value):
    with pytest.raises(InputError, match=r"^--lr: must be a finite number, got (nan|inf|-inf)$"):
        finite_number(value, "--lr")


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_finite_number_passes_every_finite_float(value):
    assert finite_number(value, "--x") == value


def test_atomic_path_names_the_file_when_the_disk_is_full(tmp_path):
    """write() on a full disk raises ENOSPC without a file name; the error must say which file."""
    target = tmp_path / "shards" / "00001.npy"
    with pytest.raises(OSError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert list(target.parent.iterdir()) == []  # no temporary file left behind, nothing that looks whole
