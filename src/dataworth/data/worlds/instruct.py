"""`builtin:instruct`: an instruction pool with known task families, for targeted data selection (LESS).

Why it exists: to check that a selection method finds the training rows that help a target task, the pool
must contain a known, small share of rows of each task family among noise. Five target families with
exactly checkable short answers (exact match of the assistant content after ``strip()``):

=============  ==================================================  =====================
family         subtasks                                            answer
=============  ==================================================  =====================
arithmetic     add, subtract (numbers 0-99)                        ``"57"``
reverse        word (letters of a made-up word), list (3 words)    ``"omukab"`` / ``"c, b, a"``
facts          birth_city, birth_date, affiliation (university      ``"Paris"``
               or employer) of a person of the default bios world
units          km_to_m, kg_to_g, hours_to_minutes                  ``"7000"``
sort           ascending, descending (3-4 numbers 0-99)            ``"3, 17, 42"``
=============  ==================================================  =====================

plus ``task="chat"`` rows (greetings, small talk, opinions) that help no target.

Splits: ``train`` is the pool (``pool`` rows; each target family is a minority of 5-10 %, ``POOL_SHARES``,
the rest chat), ``valid`` has ``valid_per_subtask`` rows per target (family, subtask), ``test`` has
``test_per_task`` rows per target family spread evenly over its subtasks. Chat appears only in ``train``.
The underlying items (number pairs, words, persons × attributes, …) of test, valid and train are drawn
*without replacement* from one enumerated universe per subtask, so no test question appears in valid or
train even in another phrasing, and no item repeats within a split.

The facts family asks about ``make_bios(BiosConfig(people=facts_people, seed=facts_seed))`` — by default
the same population as the default ``builtin:bios``, so a model trained on that corpus knows the answers.
That world is small (48 people × 4 asked attributes = 192 facts), so the facts share of the pool is capped at
what is left after test and valid (a subtask short of items hands its quota to the family's other subtasks);
any remaining shortfall is filled with chat rows (``InstructWorld.train_counts`` shows the actual mixture).
Chat has 5184 distinct items, which bounds ``pool`` at about 8000. A request that cannot be met (e.g. more test rows than a subtask has items)
raises ``ValueError`` naming the parameter.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Callable

from dataworth.data.worlds.bios import ATTRIBUTES, BiosConfig, make_bios, question_for

# Target families and their subtasks, in a fixed order (row order and id order depend on it).
TASKS: dict[str, tuple[str, ...]] = {
    "arithmetic": ("add", "subtract"),
    "reverse": ("word", "list"),
    "facts": ("birth_city", "birth_date", "affiliation"),
    "units": ("km_to_m", "kg_to_g", "hours_to_minutes"),
    "sort": ("ascending", "descending"),
}
CHAT_SUBTASKS: tuple[str, ...] = ("greeting", "smalltalk", "opinion")

# Share of the train pool per target family; chat takes the rest (61 % by default).
POOL_SHARES: dict[str, float] = {"arithmetic": 0.10, "units": 0.10, "reverse": 0.08, "sort": 0.06, "facts": 0.05}

# An item generator: universe size and a bijection from index to (user content, assistant content).
Item = tuple[str, str]


@dataclass(frozen=True)
class Universe:
    """All possible items of one subtask: ``item(i)`` for ``i in range(size)`` are pairwise distinct."""

    size: int
    item: Callable[[int, random.Random], Item]  # the rng picks only the phrasing, never the content


@dataclass(frozen=True)
class InstructConfig:
    """Sizes and seeds of the instruction world (``facts_*`` select the bios population asked about)."""

    pool: int = 2000
    valid_per_subtask: int = 8
    test_per_task: int = 50
    seed: int = 0
    facts_people: int = 48
    facts_seed: int = 0


@dataclass(frozen=True)
class InstructExample:
    """One single-turn instruction example; ``messages()`` gives the open-instruct format."""

    id: str
    task: str
    subtask: str
    user: str
    assistant: str

    def row(self) -> dict:
        return {"id": self.id, "task": self.task, "subtask": self.subtask, "messages": [
            {"role": "user", "content": self.user}, {"role": "assistant", "content": self.assistant}]}


@dataclass(frozen=True)
class InstructWorld:
    """The three splits; ``train_counts`` is the actual number of pool rows per task."""

    config: InstructConfig
    train: tuple[InstructExample, ...]
    valid: tuple[InstructExample, ...]
    test: tuple[InstructExample, ...]

    @property
    def train_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for ex in self.train:
            counts[ex.task] = counts.get(ex.task, 0) + 1
        return counts

    def rows(self, split: str) -> list[dict]:
        """Fresh plain-dict rows of ``split`` (``train``, ``valid`` or ``test``)."""
        return [ex.row() for ex in {"train": self.train, "valid": self.valid, "test": self.test}[split]]


SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")  # 70 syllables
WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "garden", "rocket",
    "window", "forest", "silver", "orange", "pencil", "bridge", "castle", "dragon", "hammer", "island",
    "jacket", "kettle", "ladder", "marble", "needle", "oyster", "pepper", "rabbit", "saddle", "tunnel",
    "violin", "wallet", "yellow", "zebra", "anchor", "basket", "cactus", "donkey", "engine", "falcon",
    "guitar", "helmet", "igloo", "jungle", "kitten", "lantern", "magnet", "nectar", "orchid", "parrot",
)


def _pick(rng: random.Random, phrasings: tuple[str, ...], **values) -> str:
    return rng.choice(phrasings).format(**values)


def _add(i: int, rng: random.Random) -> Item:
    a, b = divmod(i, 100)
    return _pick(rng, ("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."), a=a, b=b), str(a + b)


SUBTRACT_PAIRS = tuple((a, b) for a in range(100) for b in range(a + 1))  # a >= b: answers never negative


def _subtract(i: int, rng: random.Random) -> Item:
    a, b = SUBTRACT_PAIRS[i]
    phrasings = ("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.")
    return _pick(rng, phrasings, a=a, b=b), str(a - b)


def _made_up_word(i: int) -> str:
    """Index → a 3-syllable made-up word (70³ of them), so reversal cannot be memorised from real words."""
    n = len(SYLLABLES)
    return SYLLABLES[i // (n * n)] + SYLLABLES[(i // n) % n] + SYLLABLES[i % n]


def _reverse_word(i: int, rng: random.Random) -> Item:
    word = _made_up_word(i)
    phrasings = ("Reverse the word '{w}'.", "Spell '{w}' backwards.", "Write the letters of '{w}' in reverse order.")
    return _pick(rng, phrasings, w=word), word[::-1]


def _reverse_list(i: int, rng: random.Random) -> Item:
    n = len(WORDS)
    words = [WORDS[i // (n * n)], WORDS[(i // n) % n], WORDS[i % n]]
    phrasings = ("Reverse the order of these words: {ws}", "List these words from last to first: {ws}")
    return _pick(rng, phrasings, ws=", ".join(words)), ", ".join(reversed(words))


def _unit(unit_from: str, unit_to: str, factor: int) -> Universe:
    """Integers 2..1000 of ``unit_from`` → ``factor`` times as many ``unit_to``."""
    def item(i: int, rng: random.Random) -> Item:
        n = i + 2
        phrasings = ("How many {t} are in {n} {f}?", "Convert {n} {f} to {t}.")
        return _pick(rng, phrasings, n=n, f=unit_from, t=unit_to), str(n * factor)
    return Universe(999, item)


def _numbers(i: int) -> list[int]:
    """Index in ``[0, 2·10⁶)`` → 3 numbers (first half) or 4 numbers (second half), each 0-99, as drawn.

    The second half maps injectively into the 10⁸ four-number tuples through ``j = 48271·i mod 10⁸``
    (48271 is coprime to 10⁸), so half the items have 3 numbers and half 4, all distinct.
    """
    count = 3 if i < 100**3 else 4
    j = i if count == 3 else ((i - 100**3) * 48271) % 100**4
    return [(j // 100**k) % 100 for k in reversed(range(count))]


def _sort(descending: bool) -> Universe:
    word, phrase = ("descending", "largest to smallest") if descending else ("ascending", "smallest to largest")

    def item(i: int, rng: random.Random) -> Item:
        numbers = _numbers(i)
        phrasings = (f"Sort these numbers in {word} order: {{ns}}", f"Order from {phrase}: {{ns}}")
        question = _pick(rng, phrasings, ns=", ".join(map(str, numbers)))
        return question, ", ".join(map(str, sorted(numbers, reverse=descending)))
    return Universe(2 * 100**3, item)


def _facts(people: int, seed: int) -> dict[str, Universe]:
    """Questions about the bios population ``(people, seed)``; affiliation = university or employer."""
    persons = make_bios(BiosConfig(people=people, docs_per_person=1, distractors=0, seed=seed)).people
    pairs = {
        "birth_city": [(p, "birth_city") for p in persons],
        "birth_date": [(p, "birth_date") for p in persons],
        "affiliation": [(p, a) for p in persons for a in ("university", "employer")],
    }
    assert all(a in ATTRIBUTES for v in pairs.values() for _, a in v)
    return {sub: Universe(len(v), lambda i, rng, v=v: question_for(*v[i])) for sub, v in pairs.items()}


CHAT_NAMES = ("Sam", "Alex", "Jordan", "Robin", "Taylor", "Morgan", "Casey", "Jamie", "Riley", "Quinn",
              "Avery", "Charlie", "Dana", "Emery", "Frankie", "Harper", "Jesse", "Kai", "Logan", "Noel",
              "Parker", "Reese", "Sasha", "Toni")
CHAT_OPENERS = ("", "Hi! ", "Hello. ", "Hey there! ", "Good morning! ", "Good evening! ", "Sorry to bother you. ",
                "I have a question. ", "Just curious: ", "Quick one: ", "Hello again! ", "Hey! ")
CHAT_PLACES = ("the beach", "the mountains", "the city", "the countryside", "a lake", "the desert",
               "a forest", "an island", "a small village", "the seaside", "a market", "a museum",
               "a vineyard", "a castle", "the coast", "a national park", "a ski resort", "a botanical garden",
               "the zoo", "a festival", "a harbour town", "a cabin", "a fishing village", "a hot spring")
CHAT_THINGS = ("rainy days", "jazz music", "board games", "hiking", "gardening", "old films", "poetry",
               "long walks", "cooking", "painting", "cycling", "knitting", "birdwatching", "chess",
               "camping", "baking", "dancing", "sailing", "photography", "crossword puzzles", "pottery",
               "yoga", "stargazing", "origami")
CHAT_GREETINGS = (("My name is {x}.", "Nice to meet you, {x}!"),
                  ("I'm {x}, nice to meet you.", "Nice to meet you too, {x}."),
                  ("This is {x} again.", "Welcome back, {x}!"),
                  ("{x} here, how are you?", "I'm doing well, thanks for asking, {x}."),
                  ("Call me {x}.", "Sure, {x}. How can I help?"),
                  ("It's {x}. Do you remember me?", "Hello {x}, good to hear from you."))
CHAT_SMALLTALK = (("Do you think a trip to {x} would be relaxing?", "A trip to {x} sounds lovely."),
                  ("I spent the weekend at {x}.", "That sounds like a nice weekend."),
                  ("What should I pack for {x}?", "Comfortable shoes are always a good idea."),
                  ("Is {x} nice in spring?", "Spring is a pleasant season almost anywhere."),
                  ("My family wants to visit {x}.", "I hope you all have a great time."),
                  ("Have you ever heard good things about {x}?", "Many travellers speak warmly of {x}."))
CHAT_OPINIONS = (("Do you like {x}?", "Many people enjoy {x}."),
                 ("What do you think about {x}?", "{X} can be a relaxing hobby."),
                 ("Is {x} a good way to spend an evening?", "It depends on your mood, but why not?"),
                 ("My friend loves {x}. Should I try it?", "Trying something new is often worthwhile."),
                 ("I'm thinking of taking up {x}.", "That sounds like a fun plan."),
                 ("Is {x} hard to get into?", "Most hobbies get easier with a little practice."))


def _chat(templates: tuple[tuple[str, str], ...], fillers: tuple[str, ...]) -> Universe:
    """Opener × template × filler; the answer ignores the opener."""
    per_opener = len(templates) * len(fillers)

    def item(i: int, rng: random.Random) -> Item:
        opener = CHAT_OPENERS[i // per_opener]
        template = templates[(i % per_opener) // len(fillers)]
        x = fillers[i % len(fillers)]
        user, reply = (t.format(x=x, X=x[:1].upper() + x[1:]) for t in template)
        return opener + user, reply
    return Universe(len(CHAT_OPENERS) * per_opener, item)


def universes(cfg: InstructConfig) -> dict[tuple[str, str], Universe]:
    """The item universe of every (task, subtask), chat included."""
    n = len(WORDS)
    facts = _facts(cfg.facts_people, cfg.facts_seed)
    return {
        ("arithmetic", "add"): Universe(100 * 100, _add),
        ("arithmetic", "subtract"): Universe(len(SUBTRACT_PAIRS), _subtract),
        ("reverse", "word"): Universe(len(SYLLABLES) ** 3, _reverse_word),
        ("reverse", "list"): Universe(n**3, _reverse_list),
        **{("facts", sub): u for sub, u in facts.items()},
        ("units", "km_to_m"): _unit("km", "metres", 1000),
        ("units", "kg_to_g"): _unit("kg", "grams", 1000),
        ("units", "hours_to_minutes"): _unit("hours", "minutes", 60),
        ("sort", "ascending"): _sort(descending=False),
        ("sort", "descending"): _sort(descending=True),
        ("chat", "greeting"): _chat(CHAT_GREETINGS, CHAT_NAMES),
        ("chat", "smalltalk"): _chat(CHAT_SMALLTALK, CHAT_PLACES),
        ("chat", "opinion"): _chat(CHAT_OPINIONS, CHAT_THINGS),
    }


def _even_split(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` counts differing by at most one, larger ones first."""
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


def _fill(total: int, capacities: list[int]) -> list[int]:
    """Split ``total`` as evenly as possible under per-part ``capacities`` (largest parts first).

    Water-filling: every part gets ``min(capacity, level)``; the leftover goes one by one to parts that still
    have room. The sum is ``min(total, sum(capacities))``.
    """
    counts = [0] * len(capacities)
    left = min(total, sum(capacities))
    while left > 0:
        open_parts = [k for k in range(len(counts)) if counts[k] < capacities[k]]
        share = max(1, left // len(open_parts))
        for k in open_parts:
            step = min(share, capacities[k] - counts[k], left)
            counts[k] += step
            left -= step
            if left == 0:
                break
    return counts


def _pool_quotas(cfg: InstructConfig, left: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """Train rows per (task, subtask): target shares of ``pool`` (capped by ``left`` items), rest chat."""
    quotas: dict[tuple[str, str], int] = {}
    for task, subtasks in TASKS.items():
        want = round(POOL_SHARES[task] * cfg.pool)
        quotas.update(zip([(task, s) for s in subtasks], _fill(want, [left[(task, s)] for s in subtasks])))
    chat = cfg.pool - sum(quotas.values())
    capacity = [left[("chat", s)] for s in CHAT_SUBTASKS]
    if chat > sum(capacity):
        raise ValueError(f"pool={cfg.pool} needs {chat} chat rows but only {sum(capacity)} distinct ones exist; "
                         f"use a smaller pool")
    quotas.update(zip([("chat", s) for s in CHAT_SUBTASKS], _fill(chat, capacity)))
    return quotas


@functools.lru_cache(maxsize=8)
def make_instruct(cfg: InstructConfig) -> InstructWorld:
    """Build the instruction world for ``cfg`` (deterministic in ``cfg``; cached, the result is immutable).

    Per subtask, one seeded sample without replacement from its universe is cut into test | valid | train,
    so the splits share no item. Train is shuffled; ids are ``ins-<split>-NNNNN`` in final order.
    """
    for name in ("pool", "valid_per_subtask", "test_per_task"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    worlds = universes(cfg)
    held_out: dict[tuple[str, str], tuple[int, int]] = {}  # (test, valid) counts per subtask
    for task, subtasks in TASKS.items():
        for sub, n_test in zip(subtasks, _even_split(cfg.test_per_task, len(subtasks))):
            held_out[(task, sub)] = (n_test, cfg.valid_per_subtask)
            if n_test + cfg.valid_per_subtask > worlds[(task, sub)].size:
                raise ValueError(f"test_per_task={cfg.test_per_task} and valid_per_subtask={cfg.valid_per_subtask} "
                                 f"need {n_test + cfg.valid_per_subtask} distinct {task}/{sub} items but only "
                                 f"{worlds[(task, sub)].size} exist")
    left = {key: u.size - sum(held_out.get(key, (0, 0))) for key, u in worlds.items()}
    quotas = _pool_quotas(cfg, left)

    splits: dict[str, list[tuple[str, str, Item]]] = {"train": [], "valid": [], "test": []}
    for (task, sub), universe in worlds.items():
        n_test, n_valid = held_out.get((task, sub), (0, 0))
        rng = random.Random(f"instruct:{cfg.seed}:{task}:{sub}")
        indices = rng.sample(range(universe.size), n_test + n_valid + quotas[(task, sub)])
        items = [universe.item(i, rng) for i in indices]
        splits["test"] += [(task, sub, it) for it in items[:n_test]]
        splits["valid"] += [(task, sub, it) for it in items[n_test:n_test + n_valid]]
        splits["train"] += [(task, sub, it) for it in items[n_test + n_valid:]]
    random.Random(f"instruct:{cfg.seed}:shuffle").shuffle(splits["train"])
    _check_disjoint(splits)

    def examples(split: str) -> tuple[InstructExample, ...]:
        width = max(5, len(str(len(splits[split]))))
        return tuple(InstructExample(f"ins-{split}-{k + 1:0{width}d}", task, sub, user, answer)
                     for k, (task, sub, (user, answer)) in enumerate(splits[split]))

    return InstructWorld(config=cfg, train=examples("train"), valid=examples("valid"), test=examples("test"))


def _check_disjoint(splits: dict[str, list[tuple[str, str, Item]]]) -> None:
    """Invariant: no user message repeats within or across splits (universes are bijections)."""
    seen: set[str] = set()
    for rows in splits.values():
        for _, _, (user, _) in rows:
            if user in seen:
                raise RuntimeError(f"instruct world invariant broken: {user!r} appears twice")
            seen.add(user)
