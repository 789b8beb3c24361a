"""Built-in worlds: determinism, ground truth that really holds in the text, exact answers, param errors.

Checks re-derive the truth from the rows themselves (values from the query table, answers from the question
text with a parser written here), never by calling the generator's own helpers.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest
from conftest import load_benchmark
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataworth.data.worlds import BUILTIN_NAMES, builtin_rows
from dataworth.data.worlds.bios import FACT_WORDING, BiosConfig, make_bios
from dataworth.data.worlds.instruct import InstructConfig, make_instruct
from dataworth.data.worlds.realtext import REALTEXT_SIZE
from dataworth.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
BIOS_SPLITS = ("train", "queries", "questions")
INSTRUCT_SPLITS = ("train", "valid", "test")
ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer")
FACT_PHRASES = re.compile(r"was born|works for|studied at|majored in|\b(he|she|his|her)\b", re.IGNORECASE)


def _dump(name: str, splits: tuple[str, ...], params: dict[str, str]) -> str:
    return json.dumps({s: builtin_rows(name, s, params) for s in splits}, sort_keys=True)


def _clear_caches() -> None:
    make_bios.cache_clear()
    make_instruct.cache_clear()


def _word(value: str) -> re.Pattern:
    return re.compile(rf"(?<![\w']){re.escape(value)}(?![\w])")


# ------------------------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("name,splits", [("bios", BIOS_SPLITS), ("instruct", INSTRUCT_SPLITS)])
def test_same_seed_gives_byte_identical_rows_and_other_seed_differs(name, splits):
    _clear_caches()
    first = _dump(name, splits, {"seed": "3"})
    _clear_caches()
    assert _dump(name, splits, {"seed": "3"}) == first
    assert _dump(name, splits, {"seed": "4"}) != first


def test_rows_do_not_depend_on_python_hash_seed():
    code = ("import hashlib, json; from dataworth.data.worlds import builtin_rows; "
            "print(hashlib.sha256(json.dumps([builtin_rows(n, s, {}) for n, ss in "
            "[('bios', ('train', 'queries', 'questions')), ('instruct', ('train', 'valid', 'test'))] "
            "for s in ss], sort_keys=True).encode()).hexdigest())")
    here = hashlib.sha256(json.dumps(
        [builtin_rows(n, s, {}) for n, ss in [("bios", BIOS_SPLITS), ("instruct", INSTRUCT_SPLITS)] for s in ss],
        sort_keys=True).encode()).hexdigest()
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here


def test_returned_rows_are_fresh_copies():
    rows = builtin_rows("bios", "train", {})
    rows[0]["facts"].append("tampered")
    rows[0]["text"] = "x"
    assert builtin_rows("bios", "train", {})[0] != rows[0]


# ----------------------------------------------------------------------------------------- bios: truth

def check_bios(params: dict[str, str], people: int, docs_per_person: int, distractors: int,
               reversals: int = 0, realtext: int = 0) -> None:
    """Every ground-truth claim of a bios world, re-derived from the text."""
    train = builtin_rows("bios", "train", params)
    queries = builtin_rows("bios", "queries", params)
    questions = builtin_rows("bios", "questions", params)
    by_id = {d["id"]: d for d in train}

    # Sizes and unique ids; only reversed documents carry the "reversed" key, only real text "source".
    assert len(by_id) == len(train)
    assert sum(d["kind"] in ("bio", "distractor") for d in train) == people * docs_per_person + distractors
    assert sum(d["kind"] == "realtext" for d in train) == realtext
    assert all(("reversed" in d) == (d["kind"] == "reversed") for d in train)
    assert all(("source" in d) == (d["kind"] == "realtext") for d in train)
    assert len({q["id"] for q in queries + questions}) == len(queries) + len(questions) == 2 * people * 5
    assert all(re.fullmatch(r"bio-\d{4,}", d["id"]) for d in train)

    # The value table, read from the queries (response " Paris." -> "Paris").
    values: dict[str, dict[str, str]] = {}
    for q in queries:
        assert q["prompt"] == q["prompt"].rstrip() and q["response"].startswith(" ")
        assert not q["response"].startswith("  ") and q["response"].endswith(".")
        values.setdefault(q["person"], {})[q["attribute"]] = q["response"][1:-1]
    assert len(values) == people and all(sorted(v) == sorted(ATTRIBUTES) for v in values.values())
    names = list(values)

    # Biographies: own name only, and a value occurs iff its attribute is listed (one value per sentence).
    docs_of: Counter = Counter()
    stated: Counter = Counter()
    for doc in train:
        text = doc["text"]
        if doc["kind"] in ("reversed", "realtext"):
            continue  # check_reversed, check_realtext
        if doc["kind"] == "distractor":
            assert doc["person"] is None and doc["facts"] == []
            assert not FACT_PHRASES.search(text), text
            assert not any(_word(n).search(text) for n in names), text
            continue
        assert doc["kind"] == "bio" and doc["person"] in values and doc["facts"]
        person = doc["person"]
        docs_of[person] += 1
        assert _word(person).search(text)
        assert not any(_word(n).search(text) for n in names if n != person), text
        for attribute in ATTRIBUTES:
            assert bool(_word(values[person][attribute]).search(text)) == (attribute in doc["facts"]), (text, attribute)
            stated[(person, attribute)] += attribute in doc["facts"]
        sentences = [s for s in re.split(r"(?<=\.) ", text)]
        assert len(sentences) == len(doc["facts"])
        for sentence in sentences:
            assert sum(bool(_word(v).search(sentence)) for v in values[person].values()) == 1, sentence
    assert set(docs_of.values()) == {docs_per_person}
    assert min(stated.values()) >= min(2, docs_per_person)

    # Gold: exactly the person's documents listing the attribute; each contains the answer; one has the
    # canonical sentence verbatim.
    for q in queries:
        gold = set(q["gold"])
        expected = {d["id"] for d in train if d["person"] == q["person"] and q["attribute"] in d["facts"]}
        assert gold == expected and len(q["gold"]) == len(gold) >= min(2, docs_per_person)
        answer = q["response"].strip().rstrip(".")
        assert all(answer in by_id[g]["text"] and q["person"] in by_id[g]["text"] for g in gold)
        assert any(q["prompt"] + q["response"] in by_id[g]["text"] for g in gold)
        others = [d for d in train if d["id"] not in gold]
        assert not any(q["prompt"] + q["response"] in d["text"] for d in others)

    # Questions ask about the same facts with the same gold documents.
    for q, a in zip(queries, questions):
        assert (a["person"], a["attribute"], a["gold"]) == (q["person"], q["attribute"], q["gold"])
        assert a["response"] == q["response"][:-1] and a["person"] in a["prompt"]

    check_reversed(train, queries, reversals)
    check_realtext(train, queries)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def check_reversed(train: list[dict], queries: list[dict], reversals: int) -> None:
    """Reversed documents state each fact ``reversals`` times backwards, never forwards, and are never gold."""
    canonical = {(q["person"], q["attribute"]): q for q in queries}
    reversed_docs = [d for d in train if d["kind"] == "reversed"]
    counts: Counter = Counter()
    for doc in reversed_docs:
        text = doc["text"]
        assert doc["person"] is None and doc["facts"] == [] and 1 <= len(doc["reversed"]) <= 3
        facts = [tuple(f.split("|")) for f in doc["reversed"]]
        assert len(set(facts)) == len(facts), doc  # never the same fact twice in one document
        sentences = re.split(r"(?<=\.) ", text)
        assert len(sentences) == len(facts), doc
        for sentence, (name, attribute) in zip(sentences, facts):
            q = canonical[(name, attribute)]
            value = q["response"][1:-1]
            value_at, name_at = _word(value).search(sentence), _word(name).search(sentence)
            assert value_at and name_at and value_at.start() < name_at.start(), (sentence, name, value)
            assert not any(_word(n).search(sentence) for (n, _) in canonical if n != name), sentence
            # Every word of the forward query is there (so BM25 matches it), but not the forward sentence.
            assert _words(q["prompt"] + q["response"]) <= _words(sentence), (sentence, q["prompt"])
            counts[(name, attribute)] += 1
        for q in queries:
            assert q["prompt"] not in text and q["prompt"] + q["response"] not in text, (text, q["prompt"])
    assert counts == (Counter({fact: reversals for fact in canonical}) if reversals else Counter())
    gold = {g for q in queries for g in q["gold"]}
    assert not gold & {d["id"] for d in reversed_docs}


def test_default_bios_world_ground_truth_holds():
    check_bios({}, people=48, docs_per_person=3, distractors=48)


def test_default_bios_documents_are_short_and_values_repeat():
    train = builtin_rows("bios", "train", {})
    words = [len(d["text"].split()) for d in train]
    assert 200 * 0.9 <= len(train) <= 300 and max(words) <= 60 and 25 <= sum(words) / len(words)
    cities = Counter(q["response"] for q in builtin_rows("bios", "queries", {}) if q["attribute"] == "birth_city")
    assert max(cities.values()) >= 2  # a city does not identify the person


def test_bios_persons_do_not_depend_on_document_counts():
    small = builtin_rows("bios", "queries", {"docs_per_person": "1", "distractors": "0"})
    large = builtin_rows("bios", "queries", {"docs_per_person": "5", "distractors": "9"})
    assert [(q["person"], q["response"]) for q in small] == [(q["person"], q["response"]) for q in large]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(people=st.integers(1, 12), docs=st.integers(1, 5), distractors=st.integers(0, 10),
       seed=st.integers(-(10**6), 10**6), reversals=st.integers(0, 4), realtext=st.integers(0, 30))
def test_random_bios_sizes_and_seeds_give_consistent_worlds(people, docs, distractors, seed, reversals, realtext):
    params = {"people": str(people), "docs_per_person": str(docs), "distractors": str(distractors),
              "seed": str(seed), "reversals": str(reversals), "realtext": str(realtext)}
    check_bios(params, people, docs, distractors, reversals, realtext)


# ------------------------------------------------------------------------------------ bios: reversals

# sha256 of the default bios world's three splits, computed before the `reversals` option existed.
DEFAULT_BIOS_SHA256 = "c6331877ae8f81b95d8424ec81a361517da627b4d5dec44627e23f809d2928fe"


@pytest.mark.parametrize("params", [{}, {"reversals": "0"}])
def test_default_bios_rows_are_byte_identical_to_before_reversals_existed(params):
    assert hashlib.sha256(_dump("bios", BIOS_SPLITS, params).encode()).hexdigest() == DEFAULT_BIOS_SHA256


@pytest.mark.parametrize("reversals", [1, 3])
def test_reversed_documents_state_each_fact_backwards_exactly_reversals_times(reversals):
    check_bios({"people": "10", "reversals": str(reversals)}, 10, 3, 10, reversals)


def test_default_world_with_reversals_ground_truth_holds():
    check_bios({"reversals": "2"}, people=48, docs_per_person=3, distractors=48, reversals=2)


def test_reversals_add_documents_without_changing_biographies_distractors_or_gold():
    plain = builtin_rows("bios", "train", {"people": "12"})
    rev = builtin_rows("bios", "train", {"people": "12", "reversals": "3"})
    kept = [d for d in rev if d["kind"] != "reversed"]
    assert sorted((d["text"], d["kind"], d["person"], d["facts"]) for d in kept) == sorted(
        (d["text"], d["kind"], d["person"], d["facts"]) for d in plain)
    text_of = {"plain": {d["id"]: d["text"] for d in plain}, "rev": {d["id"]: d["text"] for d in rev}}
    plain_q = builtin_rows("bios", "queries", {"people": "12"})
    rev_q = builtin_rows("bios", "queries", {"people": "12", "reversals": "3"})
    for p, r in zip(plain_q, rev_q):
        assert (p["prompt"], p["response"]) == (r["prompt"], r["response"])
        assert sorted(text_of["plain"][g] for g in p["gold"]) == sorted(text_of["rev"][g] for g in r["gold"])
    # The reversed documents are shuffled in, not appended at the end.
    kinds = [d["kind"] for d in rev]
    assert kinds[len(plain):] != ["reversed"] * (len(rev) - len(plain))


# ------------------------------------------------------------------------------------ bios: real text

def _snapshot() -> list[dict]:
    raw = resources.files("dataworth.data.worlds").joinpath("realtext.jsonl.gz").read_bytes()
    return [json.loads(line) for line in gzip.decompress(raw).decode("ascii").splitlines()]


def check_realtext(train: list[dict], queries: list[dict]) -> None:
    """Real-text documents are distinct snapshot documents, name nobody, state nothing, and are never gold."""
    snapshot = {d["text"]: d["source"] for d in _snapshot()}
    names = {q["person"] for q in queries}
    docs = [d for d in train if d["kind"] == "realtext"]
    assert len({d["text"] for d in docs}) == len(docs)
    for doc in docs:
        text = doc["text"]
        assert doc["person"] is None and doc["facts"] == [] and snapshot[text] == doc["source"], doc
        assert not FACT_PHRASES.search(text) and not FACT_WORDING.search(text), text
        assert not any(_word(n).search(text) for n in names), text
        assert not any(q["prompt"] in text for q in queries), text
    assert not {g for q in queries for g in q["gold"]} & {d["id"] for d in docs}


def test_the_snapshot_is_small_real_prose_with_one_source_each():
    docs = _snapshot()
    assert len(docs) == REALTEXT_SIZE and 400 <= len(docs) <= 600
    assert len({d["text"].lower() for d in docs}) == len({d["source"] for d in docs}) == len(docs)
    for doc in docs:
        text = doc["text"]
        sentences = re.split(r"(?<=\.) (?=[A-Z])", text)
        assert set(doc) == {"source", "text"}
        assert re.fullmatch(r"stdlib:[a-z][a-z0-9_]*(\.[A-Za-z0-9_]+)*", doc["source"]), doc
        assert all(" " <= c <= "~" for c in text) and not re.search(r">>>|`|::|=|_|\w\(", text), text
        assert 20 <= len(text.split()) <= 60 and 1 <= len(sentences) <= 3 and text.endswith("."), text
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in resources.files("dataworth.data.worlds").joinpath(
        "realtext.LICENSE.txt").read_text(encoding="utf-8")


def test_the_snapshot_file_is_small():
    path = Path(str(resources.files("dataworth.data.worlds").joinpath("realtext.jsonl.gz")))
    assert path.stat().st_size < 150_000


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="the snapshot was made from CPython 3.11.7's stdlib")
def test_the_committed_snapshot_is_what_the_script_makes(tmp_path):
    script = load_benchmark("benchmarks_make_realtext_snapshot", ROOT / "benchmarks" / "make_realtext_snapshot.py")
    script.main(["--out", str(tmp_path / "realtext.jsonl.gz")])
    here = Path(str(resources.files("dataworth.data.worlds")))
    for name in ("realtext.jsonl.gz", "realtext.LICENSE.txt"):
        assert (tmp_path / name).read_bytes() == (here / name).read_bytes(), name


@pytest.mark.parametrize("realtext", [1, 25])
def test_realtext_documents_join_the_world_without_touching_its_ground_truth(realtext):
    check_bios({"people": "10", "realtext": str(realtext)}, 10, 3, 10, realtext=realtext)


def test_default_world_with_the_whole_snapshot_and_reversals_ground_truth_holds():
    check_bios({"realtext": str(REALTEXT_SIZE), "reversals": "1"}, people=48, docs_per_person=3, distractors=48,
               reversals=1, realtext=REALTEXT_SIZE)
    drawn = [d["source"] for d in builtin_rows("bios", "train", {"realtext": str(REALTEXT_SIZE)}) if "source" in d]
    assert sorted(drawn) == sorted(d["source"] for d in _snapshot())


def test_realtext_adds_documents_without_changing_the_others_or_the_queries():
    plain = builtin_rows("bios", "train", {"people": "12"})
    mixed = builtin_rows("bios", "train", {"people": "12", "realtext": "40"})
    key = lambda d: (d["text"], d["kind"], d["person"], d["facts"])  # noqa: E731
    assert sorted(key(d) for d in mixed if d["kind"] != "realtext") == sorted(key(d) for d in plain)
    for split in ("queries", "questions"):
        strip = lambda rows: [(q["id"], q["prompt"], q["response"], len(q["gold"])) for q in rows]  # noqa: E731
        assert strip(builtin_rows("bios", split, {"people": "12", "realtext": "40"})) == strip(
            builtin_rows("bios", split, {"people": "12"}))
    kinds = [d["kind"] for d in mixed]
    assert kinds[len(plain):] != ["realtext"] * 40  # shuffled in, not appended


def test_realtext_draws_are_seeded_nested_and_deterministic():
    def drawn(params):
        return [d["source"] for d in builtin_rows("bios", "train", params) if d["kind"] == "realtext"]

    _clear_caches()
    first = _dump("bios", BIOS_SPLITS, {"people": "5", "realtext": "30"})
    _clear_caches()
    assert _dump("bios", BIOS_SPLITS, {"people": "5", "realtext": "30"}) == first
    small, large = set(drawn({"people": "5", "realtext": "10"})), set(drawn({"people": "5", "realtext": "30"}))
    assert len(small) == 10 and small < large
    assert set(drawn({"people": "5", "realtext": "30", "seed": "1"})) != large


def test_snapshot_documents_naming_a_person_or_a_fact_are_never_drawn(monkeypatch):
    from dataworth.data.worlds import bios
    from dataworth.data.worlds.realtext import RealTextDocument

    person = bios.make_people(3, 0)[0]
    clean = [RealTextDocument(f"stdlib:m.f{i}", f"Plain sentence number {i} about files.") for i in range(4)]
    bad = [RealTextDocument("stdlib:m.name", f"Ask {person.name} about the socket."),
           RealTextDocument("stdlib:m.fact", "The parser grew up in a small module."),
           RealTextDocument("stdlib:m.pronoun", "Call it when she returns.")]
    monkeypatch.setattr(bios, "realtext_documents", lambda: tuple(clean[:2] + bad + clean[2:]))
    make_bios.cache_clear()
    try:
        rows = builtin_rows("bios", "train", {"people": "3", "realtext": "4"})
        assert sorted(d["source"] for d in rows if d["kind"] == "realtext") == [d.source for d in clean]
        with pytest.raises(InputError, match=r"builtin:bios: realtext=5: only 4 of the"):
            builtin_rows("bios", "train", {"people": "3", "realtext": "5"})
    finally:
        make_bios.cache_clear()


# ------------------------------------------------------------------------------------- instruct: truth

def _bios_answers() -> dict[tuple[str, str], str]:
    return {(q["person"], q["attribute"]): q["response"][1:-1] for q in builtin_rows("bios", "queries", {})}


def expected_answer(task: str, subtask: str, question: str, facts: dict[tuple[str, str], str]) -> str | None:
    """The exact answer, computed from the question text by a parser independent of the generator."""
    nums = [int(n) for n in re.findall(r"\d+", question)]
    if task == "arithmetic":
        if subtask == "add":
            assert re.search(r"plus|Add|\+", question)
            return str(nums[0] + nums[1])
        a, b = (nums[1], nums[0]) if question.startswith("Subtract") else (nums[0], nums[1])
        return str(a - b)
    if task == "units":
        factor = {("km", "metres"): 1000, ("kg", "grams"): 1000, ("hours", "minutes"): 60}
        (unit_pair,) = [k for k in factor if re.search(rf"\b{k[0]}\b", question) and k[1] in question]
        assert len(nums) == 1
        return str(nums[0] * factor[unit_pair])
    if task == "sort":
        listed = [int(n) for n in question.split(":", 1)[1].split(",")]
        descending = "descending" in question or "largest to smallest" in question
        assert descending == (subtask == "descending") and len(listed) in (3, 4)
        return ", ".join(str(n) for n in sorted(listed, reverse=descending))
    if task == "reverse":
        if subtask == "word":
            (word,) = re.findall(r"'([a-z]+)'", question)
            return "".join(word[k] for k in range(len(word) - 1, -1, -1))
        words = [w.strip() for w in question.split(":", 1)[1].split(",")]
        assert len(words) == 3
        return ", ".join(words[::-1])
    if task == "facts":
        name = re.search(r"([A-Z][a-z]+ [A-Z][a-z]+)", question).group(1)
        attribute = ("birth_city" if question.startswith("Where") else "birth_date" if question.startswith("When")
                     else "university" if "university" in question else "employer")
        assert attribute == subtask or (subtask == "affiliation" and attribute in ("university", "employer"))
        return facts[(name, attribute)]
    assert task == "chat"
    return None


def check_instruct(params: dict[str, str], pool: int, valid_per_subtask: int, test_per_task: int) -> None:
    rows = {s: builtin_rows("instruct", s, params) for s in INSTRUCT_SPLITS}
    families = {"arithmetic", "reverse", "facts", "units", "sort"}
    facts = _bios_answers() if "facts_people" not in params else None

    ids = [r["id"] for split in rows.values() for r in split]
    assert len(ids) == len(set(ids))
    assert len(rows["train"]) == pool
    assert {r["task"] for r in rows["test"]} == families
    assert Counter(r["task"] for r in rows["test"]) == {f: test_per_task for f in families}
    valid_counts = Counter((r["task"], r["subtask"]) for r in rows["valid"])
    assert set(valid_counts.values()) == {valid_per_subtask} and {t for t, _ in valid_counts} == families
    assert len(valid_counts) >= 2 * len(families)
    assert all(r["task"] != "chat" for r in rows["valid"] + rows["test"])

    users = {s: [r["messages"][0]["content"] for r in rows[s]] for s in rows}
    assert len(set(users["train"])) == len(users["train"]) and len(set(users["valid"])) == len(users["valid"])
    assert not set(users["test"]) & (set(users["train"]) | set(users["valid"]))
    assert not set(users["valid"]) & set(users["train"])

    for split in rows.values():
        for r in split:
            user, assistant = r["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            assert assistant["content"] == assistant["content"].strip() != ""
            if facts is None and r["task"] == "facts":
                continue
            want = expected_answer(r["task"], r["subtask"], user["content"], facts)
            assert want is None or assistant["content"] == want, r


def test_default_instruct_world_families_splits_and_answers():
    check_instruct({}, pool=2000, valid_per_subtask=8, test_per_task=50)
    counts = Counter(r["task"] for r in builtin_rows("instruct", "train", {}))
    assert counts["chat"] > 2000 / 2
    for family in ("arithmetic", "reverse", "facts", "units", "sort"):
        assert 0.04 * 2000 <= counts[family] <= 0.10 * 2000  # a minority, so a random 5 % holds few


def test_instruct_facts_match_the_default_bios_world():
    facts = _bios_answers()
    asked = [r for s in INSTRUCT_SPLITS for r in builtin_rows("instruct", s, {}) if r["task"] == "facts"]
    assert len(asked) == 50 + 3 * 8 + 100
    assert all(expected_answer("facts", r["subtask"], r["messages"][0]["content"], facts)
               == r["messages"][1]["content"] for r in asked)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pool=st.integers(1, 400), valid=st.integers(1, 6), test=st.integers(1, 40), seed=st.integers(0, 10**9))
def test_random_instruct_sizes_and_seeds_give_consistent_worlds(pool, valid, test, seed):
    params = {"pool": str(pool), "valid_per_subtask": str(valid), "test_per_task": str(test), "seed": str(seed)}
    check_instruct(params, pool, valid, test)


def test_instruct_with_other_facts_population_is_consistent():
    check_instruct({"facts_people": "30", "facts_seed": "7", "pool": "300"}, 300, 8, 50)


# ------------------------------------------------------------------------------------------- bad input

def test_unknown_name_lists_known_names():
    with pytest.raises(InputError, match="'nope'.*bios, instruct"):
        builtin_rows("nope", None, {})
    assert BUILTIN_NAMES == ("bios", "instruct")


@pytest.mark.parametrize("name,split,allowed", [("bios", "valid", "train, queries, questions"),
                                                ("instruct", "queries", "train, valid, test")])
def test_unknown_split_names_it_and_the_allowed_ones(name, split, allowed):
    with pytest.raises(InputError, match=f"'{split}'.*{allowed}"):
        builtin_rows(name, split, {})


def test_unknown_parameter_names_it_and_the_allowed_ones():
    with pytest.raises(InputError, match="'persons'.*people, docs_per_person, distractors, seed"):
        builtin_rows("bios", "train", {"persons": "3"})
    with pytest.raises(InputError, match="'people'.*pool, valid_per_subtask, test_per_task, seed"):
        builtin_rows("instruct", "train", {"people": "3"})


@pytest.mark.parametrize("name,key,value", [
    ("bios", "people", "abc"), ("bios", "people", "0"), ("bios", "people", "1.5"), ("bios", "people", ""),
    ("bios", "people", "99999"), ("bios", "docs_per_person", "0"), ("bios", "distractors", "-1"),
    ("bios", "seed", "x"), ("bios", "reversals", "-1"), ("bios", "reversals", "51"), ("bios", "reversals", "two"),
    ("bios", "realtext", "-1"), ("bios", "realtext", str(REALTEXT_SIZE + 1)), ("bios", "realtext", "1.5"),
    ("bios", "realtext", "ten"), ("bios", "realtext", ""),
    ("instruct", "pool", "0"), ("instruct", "test_per_task", "ten"),
])
def test_bad_parameter_value_is_named(name, key, value):
    with pytest.raises(InputError, match=f"parameter '{key}'"):
        builtin_rows(name, None, {key: value})


@pytest.mark.parametrize("params,named", [({"test_per_task": "500"}, "test_per_task"),
                                          ({"pool": "100000"}, "pool")])
def test_unmeetable_instruct_sizes_are_input_errors(params, named):
    with pytest.raises(InputError, match=named):
        builtin_rows("instruct", "test", params)


@settings(max_examples=60, deadline=None)
@given(text=st.one_of(st.text(max_size=6), st.integers(-5, 2000).map(str)))
def test_people_parameter_parses_exactly_the_ascii_integers_in_range(text):
    is_valid = re.fullmatch(r"\s*[+-]?[0-9]+\s*", text) is not None and 1 <= int(text) <= 1600
    if is_valid and int(text) <= 40:  # keep generation cheap; larger valid values are checked via config
        rows = builtin_rows("bios", "queries", {"people": text, "distractors": "0"})
        assert len(rows) == 5 * int(text)
    elif not is_valid:
        with pytest.raises(InputError, match="parameter 'people'"):
            builtin_rows("bios", "queries", {"people": text})


def test_negative_reversals_in_a_typed_config_is_a_value_error():
    with pytest.raises(ValueError, match="reversals must be >= 0"):
        make_bios(BiosConfig(people=2, reversals=-1))


@pytest.mark.parametrize("realtext", [-1, REALTEXT_SIZE + 1])
def test_realtext_outside_the_snapshot_in_a_typed_config_is_a_value_error(realtext):
    with pytest.raises(ValueError, match=f"realtext must be in 0..{REALTEXT_SIZE}"):
        make_bios(BiosConfig(people=2, realtext=realtext))


@settings(max_examples=40, deadline=None)
@given(text=st.one_of(st.text(max_size=5), st.integers(-3, REALTEXT_SIZE + 3).map(str)))
def test_realtext_parameter_parses_exactly_the_ascii_integers_in_range(text):
    if re.fullmatch(r"\s*[+-]?[0-9]+\s*", text) and 0 <= int(text) <= REALTEXT_SIZE:
        rows = builtin_rows("bios", "train", {"people": "2", "distractors": "0", "realtext": text})
        assert sum(d["kind"] == "realtext" for d in rows) == int(text)
    else:
        with pytest.raises(InputError, match="parameter 'realtext'"):
            builtin_rows("bios", "train", {"realtext": text})


def test_typed_configs_equal_string_params():
    assert make_bios(BiosConfig(people=5, seed=2)).rows("train") == builtin_rows(
        "bios", "train", {"people": "5", "seed": "2"})
    assert make_instruct(InstructConfig(pool=50)).rows("valid") == builtin_rows("instruct", "valid", {"pool": "50"})
