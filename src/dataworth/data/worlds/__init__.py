"""Built-in data worlds with known ground truth: `builtin:bios` (attribution) and `builtin:instruct` (selection).

Why they exist: attribution and data selection are only checkable when we know which training rows *should*
come out on top. Each world is generated in pure Python from a seed (``random.Random``, never global state),
so the same spec gives byte-identical rows on every machine.

``builtin_rows(name, split, params)`` is what ``dataworth.data.rows.load_rows("builtin:NAME[:SPLIT][?k=v&...]")``
calls; parameters arrive as strings and are validated here. Typed APIs: ``make_bios(BiosConfig(...))`` and
``make_instruct(InstructConfig(...))``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from dataworth.data.worlds.bios import MAX_PEOPLE, BiosConfig, make_bios
from dataworth.data.worlds.instruct import InstructConfig, make_instruct
from dataworth.data.worlds.realtext import REALTEXT_SIZE
from dataworth.errors import InputError

__all__ = [
    "ATTRIBUTES", "BUILTIN_NAMES", "CHAT_SUBTASKS", "POOL_SHARES", "TASKS", "BioDocument", "BiosConfig",
    "BiosWorld", "FactQuery", "InstructConfig", "InstructExample", "InstructWorld", "Person", "builtin_rows",
    "make_bios", "make_instruct", "parse_config",
]
_INT = re.compile(r"[+-]?[0-9]+")


@dataclasses.dataclass(frozen=True)
class _Param:
    """An integer parameter in ``[low, high]`` (``high=None``: unbounded) mapped to a config field."""

    low: int | None
    high: int | None

    def parse(self, world: str, key: str, text: str) -> int:
        bounds = f"an integer in {self.low}..{self.high}" if self.high is not None else (
            f"an integer >= {self.low}" if self.low is not None else "an integer")
        if not _INT.fullmatch(text.strip()):
            raise InputError(f"builtin:{world} parameter '{key}': expected {bounds}, got {text!r}")
        value = int(text.strip())
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise InputError(f"builtin:{world} parameter '{key}': expected {bounds}, got {value}")
        return value


@dataclasses.dataclass(frozen=True)
class _World:
    """How to turn string params into a config, build the world and list its splits."""

    config_type: type
    build: Callable
    splits: tuple[str, ...]
    default_split: str
    params: dict[str, _Param]


_SEED = _Param(None, None)
_WORLDS: dict[str, _World] = {
    "bios": _World(BiosConfig, make_bios, ("train", "queries", "questions"), "train", {
        "people": _Param(1, MAX_PEOPLE),
        "docs_per_person": _Param(1, 50),
        "distractors": _Param(0, 100_000),
        "seed": _SEED,
        "reversals": _Param(0, 50),
        "realtext": _Param(0, REALTEXT_SIZE),
    }),
    "instruct": _World(InstructConfig, make_instruct, ("train", "valid", "test"), "train", {
        "pool": _Param(1, 1_000_000),
        "valid_per_subtask": _Param(1, 10_000),
        "test_per_task": _Param(1, 10_000),
        "seed": _SEED,
        "facts_people": _Param(1, MAX_PEOPLE),
        "facts_seed": _SEED,
    }),
}
BUILTIN_NAMES: tuple[str, ...] = tuple(_WORLDS)


def parse_config(name: str, params: dict[str, str]):
    """The typed config (``BiosConfig`` / ``InstructConfig``) of world ``name`` from string ``params``.

    Raises ``InputError`` naming an unknown world, an unknown parameter, or a value that does not parse.
    """
    world = _world(name)
    values = {}
    for key, text in params.items():
        if key not in world.params:
            raise InputError(f"builtin:{name}: unknown parameter '{key}' (allowed: {', '.join(world.params)})")
        values[key] = world.params[key].parse(name, key, str(text))
    return world.config_type(**values)


def builtin_rows(name: str, split: str | None, params: dict[str, str]) -> list[dict]:
    """Rows (plain dicts, each with a unique ``id``) of ``builtin:NAME[:SPLIT]`` with string ``params``.

    ``split=None`` means the world's training split. Bad name, split or parameter → one-line ``InputError``
    naming it and what is allowed.
    """
    world = _world(name)
    split = world.default_split if split is None else split
    if split not in world.splits:
        raise InputError(f"builtin:{name}: unknown split '{split}' (allowed: {', '.join(world.splits)})")
    config = parse_config(name, params)
    try:
        built = world.build(config)
    except ValueError as exc:  # a combination of valid values that cannot be met, e.g. test larger than a universe
        raise InputError(f"builtin:{name}: {exc}") from None
    return built.rows(split)


def _world(name: str) -> _World:
    if name not in _WORLDS:
        raise InputError(f"unknown builtin dataset '{name}' (known: {', '.join(BUILTIN_NAMES)})")
    return _WORLDS[name]
