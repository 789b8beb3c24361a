"""Real English that no one here wrote, shipped inside the package: the documents behind ``builtin:bios?realtext=N``.

Why it exists: a fine-tuned model's attribution should find the planted facts among ordinary prose, not only
among our own template sentences. ``realtext.jsonl.gz`` holds ``REALTEXT_SIZE`` short documents (1-3 whole
sentences, 20-60 words, ASCII prose) read once from the docstrings of CPython 3.11.7's standard library by
``benchmarks/make_realtext_snapshot.py``, whose docstring lists every rule that kept or dropped one. Each line
is ``{"source": "stdlib:<dotted name>", "text": ...}``, e.g. ``"stdlib:socket.socket.detach"``. Nothing reads
the standard library at run time, so every machine gets the same documents.

Provenance and licence: the texts are verbatim sentences of Python's documentation strings, Copyright (c)
2001-2023 Python Software Foundation; All Rights Reserved, redistributed under the PSF License Agreement
(version 2), whose text ships beside the snapshot as ``realtext.LICENSE.txt``. The change made to them (PSF
licence, clause 3): whole leading sentences of one paragraph per docstring were kept, lines joined with
single spaces; nothing else.
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from importlib import resources

SNAPSHOT = "realtext.jsonl.gz"
LICENSE = "realtext.LICENSE.txt"
# Documents in SNAPSHOT (a test checks the file against it): the upper bound of `realtext=N`, known without
# reading the file, so that parsing a spec does not open package data.
REALTEXT_SIZE = 469


@dataclass(frozen=True)
class RealTextDocument:
    """One snapshot document: where it comes from (``stdlib:json.dumps``) and its text."""

    source: str
    text: str


@functools.lru_cache(maxsize=1)
def realtext_documents() -> tuple[RealTextDocument, ...]:
    """The snapshot's documents in file order (read from package data once, then cached)."""
    raw = resources.files(__package__).joinpath(SNAPSHOT).read_bytes()
    lines = gzip.decompress(raw).decode("ascii").splitlines()
    return tuple(RealTextDocument(**json.loads(line)) for line in lines)
