"""`builtin:bios`: a synthetic population whose biographies carry known ground truth for attribution.

Why it exists: to check an attribution method we must know which training documents *really* taught the
model a fact. Following the bioS data of "Physics of Language Models, Part 3.1" (Allen-Zhu & Li, 2023),
every person has five attributes; each attribute is stated in a recorded subset of that person's
biographies, so the gold answer to "which documents taught *Alice Smith was born in* → *Paris*?" is
exactly the documents whose ``facts`` list ``birth_city``. Values repeat across people (≈30 cities for 48
people) and distractor documents mention the same cities, universities and employers without stating
anyone's facts, so "contains the word Paris" is not enough to find the gold documents.

Guarantees (checked by ``tests/data/test_worlds.py``):

* full names are unique and no other person's full name occurs in a person's documents;
* every fact is stated in ``min(2, docs_per_person)`` or more documents, every document states ≥ 1 fact;
* a person's document contains an attribute's value iff it lists that attribute in ``facts``;
* every fact query's canonical sentence ``prompt + response`` occurs verbatim in ≥ 1 gold document;
* distractors name no person and use none of the fact phrasings;
* with ``reversals=r`` every fact is stated exactly ``r`` times in reversed form (below), value before name,
  and no reversed document contains any query's canonical sentence;
* with ``realtext=n`` exactly ``n`` real-text documents (below), distinct, none naming a person of the world
  or matching ``FACT_WORDING``, and none gold.

Reversed documents (``reversals > 0``, default 0): short documents of 1-3 sentences, each stating some
person's fact *backwards*, the value before the name and reusing the canonical sentence's words
(``"In Paris was born Alice Smith."`` for the query ``"Alice Smith was born in"`` → ``" Paris."``). They
exist to make lexical retrieval fail where attribution should not: a reversed sentence contains every word
of the forward query, so BM25 ranks it with or above the gold biographies (more so since it is short), yet
training an autoregressive model on "B is A" does not teach it to complete "A is" → "B" — the reversal
curse (Berglund et al., 2023, "The Reversal Curse: LLMs trained on 'A is B' fail to learn 'B is A'").
Measured with the demo's model (README, "Lexical confounders"): one more training step on a reversed
statement of a fact raises log p(answer) exactly as much as one on another person's reversed statement of
the same value — it teaches no person → value link — but it does raise the value's prior, more than a step on
an (already memorised) gold biography does; so gradient attribution ranks reversed documents high too.
A reversed document is ``kind="reversed"``, ``person=None``, ``facts=()``: it is **not gold** for any query
(gold stays the biographies stating the fact forward). Its row has one extra key, ``reversed``, listing the
facts it reverses in sentence order as ``"Alice Smith|birth_city"``; no other row has that key. Reversed
sentences of different people share documents; a document never states the same fact twice.

Real-text documents (``realtext > 0``, default 0): ``n`` short passages of real English prose that nobody
here wrote, drawn from the snapshot that ships with the package (``dataworth.data.worlds.realtext``:
``REALTEXT_SIZE`` Python standard-library docstrings), so that attribution must find the planted facts among
ordinary text, as in a real fine-tuning set. A real-text document is ``kind="realtext"``, ``person=None``,
``facts=()``: **not gold**. Its row has one extra key, ``source`` (``"stdlib:json.dumps"``); no other row has
that key. A snapshot document naming a person of this world (full name) or matching ``FACT_WORDING`` is never
drawn; the snapshot was built to avoid both, so for today's file nothing is dropped, but the check is made
per world and ``realtext`` larger than what is left is an error. The draw is a seeded shuffle of the
eligible documents, of which the first ``n`` are taken, so ``realtext=n`` is a subset of ``realtext=n+1``.

Leading-space convention: a query's ``prompt`` never ends with whitespace and its ``response`` starts with
one space (``"Alice Smith was born in"`` + ``" Paris."``). Byte-level BPE tokenizers (GPT-2, Llama-3,
SmolLM) attach the space to the following word, so ``prompt + response`` tokenises exactly as the same
sentence does inside a document, and the response's first token is the ``" Paris"`` token the model saw in
training.

Determinism: everything is drawn from ``random.Random`` instances seeded with strings derived from
``seed`` (never the global RNG). The people depend only on ``(people, seed)``, not on how many documents
are rendered, so ``builtin:instruct``'s facts questions agree with any bios corpus of the same population.
Reversed and real-text documents are drawn from generators of their own, so biographies and distractors have
the same texts for every ``reversals`` and ``realtext`` (only the shuffled order differs), and
``reversals=0, realtext=0`` gives exactly the rows it gave before the options existed.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

from dataworth.data.worlds.realtext import REALTEXT_SIZE, realtext_documents

ATTRIBUTES: tuple[str, ...] = ("birth_date", "birth_city", "university", "major", "employer")
FIRST_NAMES_FEMALE = (
    "Alice", "Beatrice", "Clara", "Daphne", "Elena", "Fiona", "Greta", "Helena", "Irene", "Julia",
    "Katrin", "Lena", "Miriam", "Nadia", "Olga", "Priya", "Rosa", "Sofia", "Tamara", "Vera",
)
FIRST_NAMES_MALE = (
    "Aaron", "Bruno", "Caspar", "Dmitri", "Elias", "Felix", "Gustav", "Hugo", "Igor", "Jonas",
    "Kenji", "Lorenzo", "Marcus", "Nikolai", "Oscar", "Pavel", "Rafael", "Stefan", "Tobias", "Viktor",
)
LAST_NAMES = (
    "Abernathy", "Brennan", "Castellano", "Dunmore", "Eastwood", "Fairbanks", "Galloway", "Hargrove",
    "Ingleby", "Jansen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Pellegrini",
    "Quinlan", "Rasmussen", "Sandoval", "Thornbury", "Underhill", "Valdez", "Whitcombe", "Yamada",
    "Zielinski", "Achterberg", "Blackwood", "Cardenas", "Delacroix", "Esposito", "Fitzgerald",
    "Gonzaga", "Holloway", "Iversen", "Kingsley", "Lachance", "Montague", "Novak", "Ortega", "Petrova",
)
CITIES = (
    "Paris", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague", "Warsaw", "Dublin", "Oslo", "Helsinki",
    "Athens", "Budapest", "Copenhagen", "Stockholm", "Amsterdam", "Brussels", "Zurich", "Milan",
    "Munich", "Krakow", "Seville", "Porto", "Edinburgh", "Toronto", "Chicago", "Seattle", "Denver",
    "Melbourne", "Osaka", "Nairobi",
)
UNIVERSITIES = (
    "Northgate University", "Riverside Institute of Technology", "Eastbrook College",
    "Westmoor University", "Highland Polytechnic", "Lakeshore University", "Silverpine College",
    "Redcliff University", "Stonebridge Institute", "Greenhollow University", "Bluewater College",
    "Ashford University", "Kingsmere Institute", "Oakridge University", "Fernvale College",
    "Marbleton University", "Thistledown Institute", "Elmsworth University", "Brightwater Polytechnic",
    "Crestfield University", "Harrowgate College", "Mapleford University", "Wyndham Institute",
    "Larkspur University",
)
MAJORS = (
    "physics", "chemistry", "biology", "mathematics", "economics", "history", "philosophy",
    "linguistics", "architecture", "astronomy", "geology", "sociology", "psychology", "statistics",
    "musicology", "anthropology", "civil engineering", "computer science", "marine biology",
    "political science", "materials science", "archaeology", "literature", "neuroscience",
)
EMPLOYERS = (
    "Acme Robotics", "Borealis Energy", "Cobalt Systems", "Driftwood Media", "Everline Logistics",
    "Falconer Pharmaceuticals", "Glimmer Games", "Halcyon Airlines", "Ironvale Steel", "Juniper Foods",
    "Keystone Insurance", "Lumen Optics", "Meridian Bank", "Nimbus Cloud", "Orchard Textiles",
    "Pinnacle Motors", "Quartzline Electronics", "Ridgeway Construction", "Saffron Hotels",
    "Tidewater Shipping", "Umbra Security", "Vantage Telecom", "Willowbrook Publishing",
    "Zephyr Semiconductors", "Atlas Biotech", "Beacon Analytics", "Cinder Studios", "Dynamo Chemicals",
    "Evergreen Farms", "Foxglove Architects",
)
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)

# Distinct birth dates per world: a small pool so dates repeat across people like the other attributes
# (a fully random date per person would be unique and much harder for a tiny model to memorise).
DATE_POOL_SIZE = 32
MAX_PEOPLE = (len(FIRST_NAMES_FEMALE) + len(FIRST_NAMES_MALE)) * len(LAST_NAMES)

# Fact templates. ``{S}`` is the sentence subject (full name or He/She), ``{P}`` a sentence-initial
# possessive (``Alice Smith's`` or His/Her), ``{p}`` a mid-sentence possessive (his/her), ``{v}`` the value.
# The FIRST template of each attribute is canonical: queries use it, always with the full name as subject.
FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{S} was born on {v}.",
        "{P} date of birth is {v}.",
        "{S} came into the world on {v}.",
        "{S} celebrates {p} birthday, having been born on {v}.",
    ),
    "birth_city": (
        "{S} was born in {v}.",
        "{P} hometown is {v}.",
        "{S} spent {p} early years in {v}, the city of {p} birth.",
        "{S} grew up in {v}.",
    ),
    "university": (
        "{S} studied at {v}.",
        "{S} graduated from {v}.",
        "{S} attended {v}.",
        "{S} received {p} degree from {v}.",
    ),
    "major": (
        "{S} majored in {v}.",
        "{S} earned a degree in {v}.",
        "{P} field of study was {v}.",
        "{S} focused on {v} as a student.",
    ),
    "employer": (
        "{S} works for {v}.",
        "{S} is employed by {v}.",
        "{S} has a job at {v}.",
        "{P} employer is {v}.",
    ),
}

# Natural questions (``split="questions"`` and the facts family of ``builtin:instruct``).
QUESTION_TEMPLATES: dict[str, str] = {
    "birth_date": "When was {name} born?",
    "birth_city": "Where was {name} born?",
    "university": "Which university did {name} attend?",
    "major": "What did {name} study?",
    "employer": "Which company does {name} work for?",
}

# Distractor sentences: they mention the same values but state nothing about any person. None of them may
# contain a fact phrasing ("was born", "works for", ...) or a pronoun that could refer to a person.
DISTRACTOR_TEMPLATES: tuple[str, ...] = (
    "{city} is home to many museums.",
    "The old town of {city} attracts visitors every summer.",
    "Trains from {city} run late into the night.",
    "{city} hosts a large book fair in {month}.",
    "{univ} offers evening courses in {major}.",
    "{univ} has a famous library.",
    "The campus of {univ} lies near {city}.",
    "{employer} hires engineers every year.",
    "{employer} opened a new office in {city}.",
    "{employer} sponsors a prize in {major}.",
    "Many students find {major} demanding.",
    "A conference on {major} took place in {city} on {date}.",
    "{employer} announced record profits on {date}.",
    "Rain fell over {city} for a whole week in {month}.",
)

# Reversed fact statements: the value strictly before the full name ``{name}``, reusing the canonical
# template's words but never forming the forward canonical sentence "{name} <verb> <prep> {v}." nor even its
# prompt "{name} <verb> <prep>". Every template starts with a capitalised function word, so values keep
# their case (a lower-case major is never capitalised into another token).
REVERSED_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "On {v} was born {name}.",
        "On {v}, {name} was born.",
        "It was on {v} that {name} was born.",
    ),
    "birth_city": (
        "In {v} was born {name}.",
        "In {v}, {name} was born.",
        "It was in {v} that {name} was born.",
    ),
    "university": (
        "At {v} studied {name}.",
        "At {v}, {name} studied.",
        "It was at {v} that {name} studied.",
    ),
    "major": (
        "In {v} majored {name}.",
        "In {v}, {name} majored.",
        "It was in {v} that {name} majored.",
    ),
    "employer": (
        "For {v} works {name}.",
        "For {v}, {name} works.",
        "It is for {v} that {name} works.",
    ),
}
REVERSED_DOC_SENTENCES = (1, 3)  # sentences per reversed document, inclusive

# Words that could make a non-gold document read as a statement about someone: the pronouns the
# biographies use, and every fact template's fixed wording (``fact_wording``).
PRONOUNS = ("he", "she", "his", "her")


def fact_wording() -> tuple[str, ...]:
    """The fixed wording of every fact template: the text between its ``{S}``/``{P}``/``{v}`` slots, trimmed
    of spaces and punctuation, ``{p}`` left in place (``"was born in"``, ``"spent {p} early years in"``)."""
    found: dict[str, None] = {}
    for templates in FACT_TEMPLATES.values():
        for template in templates:
            for part in re.split(r"\{[SPv]\}", template):
                part = part.strip(" .,")
                if part:
                    found.setdefault(part, None)
    return tuple(found)


def _wording_pattern(wording: str) -> str:
    return r"(?:his|her)".join(re.escape(piece) for piece in wording.split("{p}"))


# A match means "reads like a fact or refers to a person": no distractor or real-text document may match.
FACT_WORDING = re.compile(r"(?<![\w'])(?:" + "|".join([_wording_pattern(w) for w in fact_wording()] + list(PRONOUNS))
                          + r")(?![\w'])", re.IGNORECASE)


@dataclass(frozen=True)
class BiosConfig:
    """Size and seed of a bios world. ``distractors=None`` means "as many as there are people".

    ``reversals``: how many times each fact is also stated backwards in non-gold ``kind="reversed"``
    documents (module docstring; 0 = none). ``realtext``: how many real-English non-gold ``kind="realtext"``
    documents from the shipped snapshot to mix in (0..``REALTEXT_SIZE``; 0 = none).
    """

    people: int = 48
    docs_per_person: int = 3
    distractors: int | None = None
    seed: int = 0
    reversals: int = 0
    realtext: int = 0

    @property
    def n_distractors(self) -> int:
        return self.people if self.distractors is None else self.distractors


@dataclass(frozen=True)
class Person:
    """One synthetic person and their five attribute values."""

    name: str
    pronoun: str  # "he" or "she"
    birth_date: str
    birth_city: str
    university: str
    major: str
    employer: str

    def value(self, attribute: str) -> str:
        """The value of ``attribute`` (one of ``ATTRIBUTES``)."""
        return getattr(self, attribute)


@dataclass(frozen=True)
class BioDocument:
    """A training document. ``person`` is None and ``facts`` empty for every kind but ``bio``.

    ``reversed`` (reversed documents only): the facts stated backwards, in sentence order, as ``"name|attr"``.
    ``source`` (real-text documents only): where the text comes from, e.g. ``"stdlib:json.dumps"``.
    """

    id: str
    text: str
    person: str | None
    facts: tuple[str, ...]
    kind: str  # "bio", "distractor", "reversed" or "realtext"
    reversed: tuple[str, ...] | None = None
    source: str | None = None

    def row(self) -> dict:
        row = {"id": self.id, "text": self.text, "person": self.person, "facts": list(self.facts),
               "kind": self.kind}
        if self.reversed is not None:  # only reversed docs carry the key, so other rows stay as they were
            row["reversed"] = list(self.reversed)
        if self.source is not None:  # likewise only real-text docs
            row["source"] = self.source
        return row


@dataclass(frozen=True)
class FactQuery:
    """A cloze query (or a question) about one fact, with the ids of the documents that state that fact."""

    id: str
    prompt: str
    response: str
    person: str
    attribute: str
    gold: tuple[str, ...]

    def row(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "response": self.response, "person": self.person,
                "attribute": self.attribute, "gold": list(self.gold)}


@dataclass(frozen=True)
class BiosWorld:
    """People, shuffled training documents, cloze queries (one per person × attribute), questions."""

    config: BiosConfig
    people: tuple[Person, ...]
    documents: tuple[BioDocument, ...]
    queries: tuple[FactQuery, ...]
    questions: tuple[FactQuery, ...]

    def rows(self, split: str) -> list[dict]:
        """Fresh plain-dict rows of ``split`` (``train``, ``queries`` or ``questions``)."""
        items = {"train": self.documents, "queries": self.queries, "questions": self.questions}[split]
        return [item.row() for item in items]


def canonical_prompt(person: Person, attribute: str) -> tuple[str, str]:
    """The canonical cloze ``(prompt, response)`` of a fact, e.g. ``("Alice Smith was born in", " Paris.")``.

    ``prompt + response`` is the canonical template sentence with the full name as subject.
    """
    sentence = FACT_TEMPLATES[attribute][0].format(S=person.name, v=person.value(attribute))
    cut = sentence.rindex(" " + person.value(attribute))
    return sentence[:cut], sentence[cut:]


def question_for(person: Person, attribute: str) -> tuple[str, str]:
    """A natural question and its exact answer, e.g. ``("Where was Alice Smith born?", "Paris")``."""
    return QUESTION_TEMPLATES[attribute].format(name=person.name), person.value(attribute)


def make_people(people: int, seed: int) -> tuple[Person, ...]:
    """``people`` persons with unique full names; depends only on ``(people, seed)``."""
    if not 1 <= people <= MAX_PEOPLE:
        raise ValueError(f"people must be in 1..{MAX_PEOPLE}, got {people}")
    rng = random.Random(f"bios:{seed}:people")
    firsts = [(n, "she") for n in FIRST_NAMES_FEMALE] + [(n, "he") for n in FIRST_NAMES_MALE]
    dates = _date_pool(rng)
    persons = []
    for index in rng.sample(range(MAX_PEOPLE), people):
        (first, pronoun), last = firsts[index // len(LAST_NAMES)], LAST_NAMES[index % len(LAST_NAMES)]
        persons.append(Person(
            name=f"{first} {last}", pronoun=pronoun, birth_date=rng.choice(dates),
            birth_city=rng.choice(CITIES), university=rng.choice(UNIVERSITIES), major=rng.choice(MAJORS),
            employer=rng.choice(EMPLOYERS),
        ))
    return tuple(persons)


def _date_pool(rng: random.Random) -> list[str]:
    """``DATE_POOL_SIZE`` distinct dates like ``"12 March 1984"`` (days 1-28, years 1950-1999)."""
    dates: set[tuple[int, int, int]] = set()
    while len(dates) < DATE_POOL_SIZE:
        dates.add((rng.randint(1, 28), rng.randrange(12), rng.randint(1950, 1999)))
    return [f"{d} {MONTHS[m]} {y}" for d, m, y in sorted(dates)]


def assign_facts(n_docs: int, rng: random.Random) -> tuple[list[list[str]], dict[str, int]]:
    """Which attributes each of a person's ``n_docs`` documents states, and one canonical doc per attribute.

    Each attribute goes to a random set of ``k`` documents, ``k`` uniform in ``[min(2, n), n]``; a document
    left empty then receives one random attribute. Returns ``(facts per doc, canonical doc per attribute)``
    where the canonical doc is one of the docs stating that attribute.
    """
    low = min(2, n_docs)
    stated: list[list[str]] = [[] for _ in range(n_docs)]
    for attribute in ATTRIBUTES:
        for doc in rng.sample(range(n_docs), rng.randint(low, n_docs)):
            stated[doc].append(attribute)
    for doc in range(n_docs):
        if not stated[doc]:
            stated[doc].append(rng.choice(ATTRIBUTES))
    canonical = {a: rng.choice([d for d in range(n_docs) if a in stated[d]]) for a in ATTRIBUTES}
    return stated, canonical


def render_biography(person: Person, attributes: list[str], canonical: set[str], rng: random.Random) -> str:
    """One biography stating exactly ``attributes``, in random order and phrasing.

    The first sentence names the person in full; later sentences use pronouns, except a sentence in the
    canonical phrasing, which always names the person in full (so the query ``prompt + response`` occurs
    verbatim). Attributes in ``canonical`` are forced to the canonical phrasing.
    """
    order = list(attributes)
    rng.shuffle(order)
    subject, possessive = ("He", "His") if person.pronoun == "he" else ("She", "Her")
    mid_possessive = possessive.lower()
    sentences = []
    for position, attribute in enumerate(order):
        templates = FACT_TEMPLATES[attribute]
        choice = 0 if attribute in canonical else rng.randrange(len(templates))
        named = position == 0 or choice == 0
        sentences.append(templates[choice].format(
            S=person.name if named else subject,
            P=f"{person.name}'s" if named else possessive,
            p=mid_possessive,
            v=person.value(attribute),
        ))
    return " ".join(sentences)


def render_distractor(rng: random.Random, dates: list[str]) -> str:
    """3-5 sentences about cities, universities, majors and employers that state no person's fact."""
    templates = rng.sample(DISTRACTOR_TEMPLATES, rng.randint(3, 5))
    return " ".join(t.format(
        city=rng.choice(CITIES), univ=rng.choice(UNIVERSITIES), major=rng.choice(MAJORS),
        employer=rng.choice(EMPLOYERS), month=rng.choice(MONTHS), date=rng.choice(dates),
    ) for t in templates)


def render_reversed(people: tuple[Person, ...], reversals: int, rng: random.Random) -> list[tuple[str, tuple[str, ...]]]:
    """Reversed documents ``(text, reversed facts)``: every fact stated backwards ``reversals`` times in all.

    The ``people × ATTRIBUTES × reversals`` statements are shuffled and packed in order into documents of
    ``REVERSED_DOC_SENTENCES`` sentences (size drawn per document); a statement whose fact is already in the
    open document closes it first, so no document repeats a fact. Each statement's template is drawn
    uniformly from ``REVERSED_TEMPLATES[attribute]``.
    """
    statements = [(p, a) for p in people for a in ATTRIBUTES for _ in range(reversals)]
    rng.shuffle(statements)
    docs: list[list[tuple[Person, str]]] = []
    size = 0
    for person, attribute in statements:
        open_doc = docs[-1] if docs else None
        if open_doc is None or len(open_doc) >= size or (person, attribute) in open_doc:
            docs.append([])
            size = rng.randint(*REVERSED_DOC_SENTENCES)
        docs[-1].append((person, attribute))
    rendered = []
    for doc in docs:
        sentences = [rng.choice(REVERSED_TEMPLATES[a]).format(v=p.value(a), name=p.name) for p, a in doc]
        rendered.append((" ".join(sentences), tuple(f"{p.name}|{a}" for p, a in doc)))
    return rendered


def eligible_realtext(people: tuple[Person, ...]) -> list:
    """The snapshot's documents that may join this world: naming none of ``people`` (full name) and not
    matching ``FACT_WORDING``, in snapshot order."""
    names = re.compile(r"(?<![\w'])(?:" + "|".join(re.escape(p.name) for p in people) + r")(?![\w])")
    return [d for d in realtext_documents() if not names.search(d.text) and not FACT_WORDING.search(d.text)]


def draw_realtext(people: tuple[Person, ...], n: int, rng: random.Random) -> list:
    """``n`` distinct eligible snapshot documents: the first ``n`` of a seeded shuffle (nested in ``n``)."""
    pool = eligible_realtext(people)
    if n > len(pool):
        raise ValueError(f"realtext={n}: only {len(pool)} of the {REALTEXT_SIZE} real-text documents name no "
                         f"person of this world and state nothing like a fact")
    rng.shuffle(pool)
    return pool[:n]


@functools.lru_cache(maxsize=8)
def make_bios(cfg: BiosConfig) -> BiosWorld:
    """Build the bios world for ``cfg`` (deterministic in ``cfg``; cached, the result is immutable)."""
    if cfg.docs_per_person < 1:
        raise ValueError(f"docs_per_person must be >= 1, got {cfg.docs_per_person}")
    if cfg.n_distractors < 0:
        raise ValueError(f"distractors must be >= 0, got {cfg.n_distractors}")
    if cfg.reversals < 0:
        raise ValueError(f"reversals must be >= 0, got {cfg.reversals}")
    if not 0 <= cfg.realtext <= REALTEXT_SIZE:
        raise ValueError(f"realtext must be in 0..{REALTEXT_SIZE}, got {cfg.realtext}")
    people = make_people(cfg.people, cfg.seed)
    rng = random.Random(f"bios:{cfg.seed}:documents")

    # Documents without their ids, which are assigned after the shuffle.
    drafts: list[dict] = []
    for person in people:
        stated, canonical = assign_facts(cfg.docs_per_person, rng)
        for doc, attributes in enumerate(stated):
            forced = {a for a, d in canonical.items() if d == doc}
            drafts.append(dict(text=render_biography(person, attributes, forced, rng), person=person.name,
                               facts=tuple(a for a in ATTRIBUTES if a in attributes), kind="bio"))
    dates = sorted({p.birth_date for p in people})
    for _ in range(cfg.n_distractors):
        drafts.append(dict(text=render_distractor(rng, dates), person=None, facts=(), kind="distractor"))
    # Own generators: `rng` makes the same draws as without reversals / real text until the shuffle.
    if cfg.reversals > 0:
        reversed_rng = random.Random(f"bios:{cfg.seed}:reversals")
        drafts += [dict(text=text, person=None, facts=(), kind="reversed", reversed=facts)
                   for text, facts in render_reversed(people, cfg.reversals, reversed_rng)]
    if cfg.realtext > 0:
        realtext_rng = random.Random(f"bios:{cfg.seed}:realtext")
        drafts += [dict(text=d.text, person=None, facts=(), kind="realtext", source=d.source)
                   for d in draw_realtext(people, cfg.realtext, realtext_rng)]
    rng.shuffle(drafts)

    width = max(4, len(str(len(drafts))))
    documents = tuple(BioDocument(id=f"bio-{i + 1:0{width}d}", **draft) for i, draft in enumerate(drafts))
    queries, questions = _fact_queries(people, documents)
    return BiosWorld(config=cfg, people=people, documents=documents, queries=queries, questions=questions)


def _fact_queries(people: tuple[Person, ...], documents: tuple[BioDocument, ...]):
    """One cloze query and one question per (person, attribute); gold = that person's docs stating it."""
    gold: dict[tuple[str, str], list[str]] = {}
    for doc in documents:
        for attribute in doc.facts:
            gold.setdefault((doc.person, attribute), []).append(doc.id)
    queries, questions = [], []
    width = max(4, len(str(len(people) * len(ATTRIBUTES))))
    for person in people:
        for attribute in ATTRIBUTES:
            n = len(queries) + 1
            ids = tuple(gold[(person.name, attribute)])
            prompt, response = canonical_prompt(person, attribute)
            queries.append(FactQuery(f"q-{n:0{width}d}", prompt, response, person.name, attribute, ids))
            question, answer = question_for(person, attribute)
            questions.append(FactQuery(f"qa-{n:0{width}d}", f"Question: {question}\nAnswer:", " " + answer,
                                       person.name, attribute, ids))
    return tuple(queries), tuple(questions)
