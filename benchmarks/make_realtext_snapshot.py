"""Regenerate ``src/dataworth/data/worlds/realtext.jsonl.gz``, the real English behind ``builtin:bios?realtext=N``.

    PYTHONPATH=src .venv/bin/python benchmarks/make_realtext_snapshot.py [--out PATH]

The committed snapshot was made with CPython 3.11.7's standard library; another Python version has other
docstrings, so rerunning it elsewhere gives a different (equally valid) file. The world never runs this: it
reads only the committed file.

What goes in (each rule drops or shortens a candidate, none rewrites its words):

1. the docstrings of the standard library's public modules, classes, methods and functions (private names,
   tests, idlelib, lib2to3, turtledemo, ensurepip and site-packages left out);
2. of each docstring, its first paragraph that passes rules 3-5 (at most one per docstring, so ``source``
   names one document). Usually that is the first paragraph; a later one when the first is a one-line
   summary: only ~200 first paragraphs of the 3.11 stdlib pass, too few for a few hundred documents;
3. prose only: no line of the paragraph indented or starting like code, a list or a directive (``>>>``,
   ``...``, ``-``, ``*``, ``..``); once joined on one line, only ASCII letters, digits, spaces and
   ``.,;:'"()?!-`` (so no ``=``, ``_``, backticks, brackets, ``<>`` or ``*``: signatures, reST roles and
   literals go), no ``::``, ``--``, ``word(`` call, dotted ``os.path`` or camelCase / ``ValueError`` name;
4. its leading whole sentences, one to three and at most 60 words, each of at least three words, starting
   with a capital letter and ending with a full stop; 20-60 words in all;
5. nothing that could read as a bios fact or name a bios person: no match of ``bios.FACT_WORDING`` (the fact
   templates' wording and the pronouns he/she/his/her) and no first or last name of the bios name lists,
   whatever the world's population (so the world's own per-world check has nothing left to drop);
6. de-duplicated (case and spacing ignored), first occurrence kept; at most ``PER_MODULE`` documents per
   top-level module, in file order (tkinter alone would otherwise be an eighth of the snapshot).

Written in source order as gzip'd JSON lines ``{"source": "stdlib:json.dumps", "text": ...}`` with a zero
gzip timestamp and no file name, so the same inputs give the same bytes. Beside it, ``realtext.LICENSE.txt``:
the PSF License Agreement section of the running Python's ``LICENSE.txt``, which the licence asks to retain.
Afterwards set ``realtext.REALTEXT_SIZE`` to the printed count (a test compares them).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import io
import json
import re
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dataworth.data.worlds.bios import (  # noqa: E402
    FACT_WORDING,
    FIRST_NAMES_FEMALE,
    FIRST_NAMES_MALE,
    LAST_NAMES,
)

OUT = ROOT / "src" / "dataworth" / "data" / "worlds" / "realtext.jsonl.gz"
LICENSE_NAME = "realtext.LICENSE.txt"
PSF_SECTION = re.compile(r"^PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2\n.*?(?=\n\n\n)", re.S | re.M)
SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "__pycache__"}
PER_MODULE = 20
WORDS = (20, 60)
SENTENCES = (1, 3)

_CODE_LINE = re.compile(r"^(?:\s|>>>|\.\.\.|\.\. |[-*+] |\d+[.)] )")
_ALLOWED = re.compile(r"[A-Za-z0-9 .,;:'\"()?!-]+")
_NOT_PROSE = re.compile(r"::|\w\(|\w\.\w|[a-z][A-Z]|\(\s*\)|--|\s[.,;:]")
_NAMES = re.compile(r"\b(?:" + "|".join(FIRST_NAMES_FEMALE + FIRST_NAMES_MALE + LAST_NAMES) + r")\b")
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")


def module_name(root: Path, path: Path) -> str | None:
    """Dotted module name of ``path`` under the stdlib ``root``; None for tests, tools and private modules."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if set(parts) & SKIP_PARTS:
        return None
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or any(p.startswith("_") for p in parts):
        return None
    return ".".join(parts)


def docstrings(tree: ast.Module, module: str):
    """``(source, docstring)`` of the module and its public classes, methods and functions, in file order."""
    doc = ast.get_docstring(tree)
    if doc:
        yield f"stdlib:{module}", doc
    stack = [(module, node) for node in reversed(tree.body)]
    while stack:
        prefix, node = stack.pop()
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        name = f"{prefix}.{node.name}"
        doc = ast.get_docstring(node)
        if doc:
            yield f"stdlib:{name}", doc
        if isinstance(node, ast.ClassDef):  # methods of classes; functions nested in functions are not API
            stack.extend((name, child) for child in reversed(node.body))


def leading_sentences(text: str) -> str:
    """The first one to three whole sentences of ``text`` that together have at most ``WORDS[1]`` words."""
    kept: list[str] = []
    for sentence in _SENTENCE_END.split(text)[: SENTENCES[1]]:
        if len(" ".join(kept + [sentence]).split()) > WORDS[1]:
            break
        kept.append(sentence)
    return " ".join(kept)


def prose(paragraph: str) -> str | None:
    """``paragraph`` joined on one line and cut to its leading sentences, if it passes rules 3-5."""
    lines = paragraph.strip().split("\n")
    if any(_CODE_LINE.match(line) for line in lines):
        return None
    text = " ".join(" ".join(lines).split())
    if not _ALLOWED.fullmatch(text) or _NOT_PROSE.search(text) or FACT_WORDING.search(text) or _NAMES.search(text):
        return None
    text = leading_sentences(text)
    if not WORDS[0] <= len(text.split()) <= WORDS[1]:
        return None
    if not all(s[0].isupper() and s.endswith(".") and len(s.split()) >= 3 for s in _SENTENCE_END.split(text)):
        return None
    return text


def candidates(root: Path) -> list[dict]:
    """One passing paragraph per stdlib docstring, de-duplicated, in file order (rules 1-5)."""
    seen: set[str] = set()
    found = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(root, path)
        if module is None:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for source, doc in docstrings(tree, module):
            for paragraph in doc.strip().split("\n\n"):
                text = prose(paragraph)
                if text:
                    break
            key = " ".join(text.lower().split()) if text else None
            if key and key not in seen:
                seen.add(key)
                found.append({"source": source, "text": text})
    return found


def capped(found: list[dict]) -> list[dict]:
    """The first ``PER_MODULE`` documents of each top-level module (rule 6), order kept."""
    per_module: dict[str, int] = {}
    kept = []
    for doc in found:
        top = doc["source"].removeprefix("stdlib:").split(".")[0]
        per_module[top] = per_module.get(top, 0) + 1
        if per_module[top] <= PER_MODULE:
            kept.append(doc)
    return kept


def write_snapshot(docs: list[dict], out: Path) -> bytes:
    """Gzip'd JSON lines with a zero timestamp and no file name: the same documents give the same bytes."""
    raw = "".join(json.dumps(d, sort_keys=True, ensure_ascii=True) + "\n" for d in docs).encode("ascii")
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        gz.write(raw)
    out.write_bytes(buffer.getvalue())
    return raw


def psf_license(root: Path) -> str:
    """The PSF License Agreement (version 2) as the running Python's ``LICENSE.txt`` states it."""
    match = PSF_SECTION.search((root / "LICENSE.txt").read_text(encoding="utf-8"))
    if match is None:
        raise SystemExit(f"{root / 'LICENSE.txt'}: no PSF License Agreement section found")
    return match.group(0) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    root = Path(sysconfig.get_paths()["stdlib"])
    found = candidates(root)
    docs = capped(found)
    raw = write_snapshot(docs, args.out)
    (args.out.parent / LICENSE_NAME).write_text(psf_license(root), encoding="utf-8")
    print(f"{len(found)} candidates, {len(docs)} written to {args.out} "
          f"({len(raw)} bytes, {args.out.stat().st_size} gzip'd), Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
