"""Reports and the value ledger: highlighted token contributions add up to the scores shown, the ledger equals
explicit loops over the score matrix, data strings are escaped, and a real headless Chromium renders the page.

One module-scoped pipeline (tiny Llama → store → KFAC → scores → report) is shared by every test: the machine
is small and the pipeline is the slow part.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import build_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from dataworth.errors import InputError

# Hostile document texts, each short enough to be shown whole (max_length 96, display limit 80 tokens).
SCRIPT_DOC = '<script>window.__pwned=1</script>'
IMG_DOC = '<img src=x onerror="window.__pwned=2">'
ENTITY_DOC = '&amp; &lt;b&gt;not bold&lt;/b&gt; "q" \'a\' </textarea> -->'
MAX_LENGTH = 96
SOURCES = ["wiki", "forum", "books"]
TOP_K = 5
DISPLAY_LIMIT = 80
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_tokenizer):
    """Train JSONL (10 docs: three hostile, one non-ASCII, one longer than max_length, one without 'source'),
    3 queries, a float32 LoGra store, KFAC curvature, full scores with self-influence, and one report."""
    from dataworth.gradients.extract import ExtractConfig, extract
    from dataworth.influence.curvature import fit
    from dataworth.influence.score import score
    from dataworth.reports.report import report

    root = tmp_path_factory.mktemp("report")
    model = build_llama(len(tiny_tokenizer), seed=3)
    model.save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    texts = [
        "Alice Smith was born in Paris on 3 May 1970.",
        "Bob Jones studied physics at Oxford and works for Acme.",
        SCRIPT_DOC,
        "The capital of France is Paris. Oxford is a university town.",
        "café 日本語 🙂 naïve — résumé\tafter a tab\nand a new line \x00 null",
        "Reverse the word cat: tac. " * 8,
        "What is 2 plus 3? It is 5. See gnp\u202e.exe",
        IMG_DOC,
        "Acme hires physicists from Oxford.",
        ENTITY_DOC,
    ]
    rows = [{"id": f"d{i}", "text": t, **({"source": SOURCES[i % 3]} if i != 9 else {})} for i, t in enumerate(texts)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    queries = [
        {"id": "q-alice", "prompt": "Where was Alice Smith born?", "response": " Paris."},
        {"id": "q-bob", "prompt": "What did Bob study? \u2067gnp\u202e.exe\u2069\u200b",
         "response": " physics at Oxford"},
        {"id": "q-<b>evil</b>", "prompt": "<script>alert(1)</script>", "response": " tac &amp; cat"},
    ]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    config = ExtractConfig(model=str(root / "model"), data=str(root / "train.jsonl"), out=str(root / "store"),
                           modules="mlp", projection="random", rank_in=4, rank_out=3, seed=1, dtype="float32",
                           batch_size=4, shard_rows=4, max_length=MAX_LENGTH, device="cpu")
    extract(config, progress=False)
    fit(root / "store", "kfac")
    scores = score(root / "store", str(root / "queries.jsonl"), mode="dot", curvature="kfac", top_k=TOP_K,
                   full=True, self_influence=True, out=root / "scores", device="cpu")
    html_path = report(root / "scores", root / "out", by="source", max_display_tokens=DISPLAY_LIMIT)
    return {"root": root, "scores": scores, "html": html_path, "texts": texts}


class _Page(HTMLParser):
    """Collects, per document card, its attributes and the data-c values of its token / cut spans."""

    def __init__(self):
        super().__init__()
        self.docs, self.sections, self.scripts, self.imgs, self.tokens = [], [], 0, [], 0
        self.section, self.in_token = None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "section" and "query" in classes:
            self.section = attrs["data-query-id"]
            self.sections.append(self.section)
        elif tag == "article" and "doc" in classes:
            self.docs.append({**attrs, "query_id": self.section, "c": [], "text": ""})
        elif tag == "span" and ("tok" in classes or "cut" in classes) and "data-c" in attrs:
            self.docs[-1]["c"].append(float(attrs["data-c"]))
            self.tokens += "tok" in classes
            self.in_token = "tok" in classes
        elif tag == "script":
            self.scripts += 1
        elif tag == "img":
            self.imgs.append(attrs)

    def handle_endtag(self, tag):
        if tag == "span":
            self.in_token = False

    def handle_data(self, data):
        if self.in_token:
            self.docs[-1]["text"] += data


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def topk_only_scores(pipeline, target: Path, keep=None) -> Path:
    """The pipeline's scores without the full matrix (and with only the top-k rows ``keep`` selects), saved to
    ``target`` as a run of their own: files edited in place would no longer match their summary."""
    from dataworth.influence.scores import load_scores

    scores = load_scores(pipeline["root"] / "scores")
    scores.matrix = None
    if keep is not None:
        scores.table = keep(scores.table.copy()).reset_index(drop=True)
    scores.save(target)
    return target


def _expected_token_count(pipeline) -> int:
    """Σ over shown (query, direction, rank) of min(tokens of the document as stored, DISPLAY_LIMIT)."""
    from dataworth.data.encode import encode_rows
    from dataworth.data.rows import load_rows
    from dataworth.model.load import load_model

    tok = load_model(str(pipeline["root"] / "model"), device="cpu").tokenizer
    encoded, _ = encode_rows(load_rows(str(pipeline["root"] / "train.jsonl")), tok, max_length=MAX_LENGTH)
    lengths = {e.id: len(e.input_ids) for e in encoded}
    return int(sum(min(lengths[i], DISPLAY_LIMIT) for i in _shown_rows(pipeline)["train_id"]))


def _shown_rows(pipeline) -> pd.DataFrame:
    """The kept top-k rows a report shows: under "helps" positive scores, under "hurts" negative ones."""
    table = pipeline["scores"].to_pandas()
    signed = np.where(table.direction == "positive", table.score > 0, table.score < 0)
    return table[signed].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------
# Truth of what is shown


def test_every_shown_document_has_token_contributions_summing_to_its_score(pipeline):
    page = _parse(pipeline["html"])
    table = _shown_rows(pipeline)
    assert page.sections == pipeline["scores"].query_ids
    assert len(page.docs) == len(table) > 0
    shown = {(d["query_id"], d["data-direction"], int(d["data-rank"]), d["data-train-id"]) for d in page.docs}
    assert shown == set(zip(table.query_id, table.direction, table["rank"], table.train_id))
    for doc in page.docs:
        expected = table[(table.query_id == doc["query_id"]) & (table.direction == doc["data-direction"])
                         & (table["rank"] == int(doc["data-rank"]))]["score"].item()
        assert float(doc["data-score"]) == pytest.approx(expected, rel=1e-6)
        assert sum(doc["c"]) == pytest.approx(expected, rel=2e-4, abs=1e-7 * max(1.0, max(map(abs, doc["c"]))))
    assert page.tokens == _expected_token_count(pipeline)


def test_highlighted_tokens_read_back_as_the_exact_document_text(pipeline):
    """The escaped token spans, parsed back by an HTML parser, give each document's text character for
    character (with <s> / </s>; the NUL and the right-to-left override shown as visible \\x00 and \\u202e) —
    escaping loses and adds nothing."""
    page = _parse(pipeline["html"])
    texts = {f"d{i}": t for i, t in enumerate(pipeline["texts"])}
    for doc in page.docs:
        original = texts[doc["data-train-id"]].replace("\x00", "\\x00").replace("\u202e", "\\u202e")
        if doc["data-train-id"] == "d5":  # cut at extraction and for display: a prefix
            assert ("<s>" + original).startswith(doc["text"]) and len(doc["text"]) > 100
        else:
            assert doc["text"] == "<s>" + original + "</s>"


def test_cosine_and_relative_contributions_sum_to_those_scores(pipeline, tmp_path):
    from dataworth.influence.score import score
    from dataworth.reports.report import report

    root = pipeline["root"]
    for mode in ("cosine", "relative"):
        out = tmp_path / mode
        scores = score(root / "store", str(root / "queries.jsonl"), mode=mode, curvature="kfac", top_k=2,
                       out=out / "scores", device="cpu")
        page = _parse(report(out / "scores", out / "report"))
        table = scores.to_pandas()
        assert len(page.docs) == len(table) == 3 * 2 * 2
        for doc in page.docs:
            assert sum(doc["c"]) == pytest.approx(float(doc["data-score"]), rel=2e-4, abs=1e-6)


def test_long_documents_are_cut_for_display_with_a_marker_not_dropped(pipeline):
    text = pipeline["html"].read_text(encoding="utf-8")
    assert "truncated for display: 16 more tokens" in text  # the 'Reverse the word' row: 96 tokens, limit 80
    assert "truncated to max_length at extraction" in text  # it had 122 tokens before extraction cut it to 96
    md = (pipeline["html"].parent / "report.md").read_text(encoding="utf-8")
    assert md.count("## Query ") == 3


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_token_texts_concatenate_to_the_decoded_text(tiny_tokenizer, text):
    from dataworth.reports.report import token_texts

    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    pieces = token_texts(tiny_tokenizer, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tiny_tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_enormous_texts_are_cut_with_a_marker_that_counts_what_is_left_out():
    from dataworth.reports.render import truncate_text

    assert truncate_text("abc", 3) == "abc"
    cut = truncate_text("x" * 1000, 10)
    assert cut.startswith("x" * 10 + "\n") and cut.endswith("[truncated for display: 990 more characters]")


def test_displayable_replaces_surrogates_and_controls_visibly():
    from dataworth.reports.render import displayable, esc

    assert displayable("a\ud800b\x00c\x1bd\te\nf") == "a\\ud800b\\x00c\\x1bd\te\nf"
    assert esc('<img src=x onerror="x">&') == "&lt;img src=x onerror=&quot;x&quot;&gt;&amp;"
    esc("\udcff").encode("utf-8")  # encodable after sanitising


# ---------------------------------------------------------------------------------------------------------
# Safety


def test_data_strings_are_escaped_and_the_page_is_self_contained(pipeline):
    text = pipeline["html"].read_text(encoding="utf-8")
    page = _parse(pipeline["html"])
    assert page.scripts == 1 and "window.__pwned" not in text.split("<script>")[-1]
    assert "<img src=x" not in text and "<script>window" not in text and "<script>alert" not in text
    assert "</textarea> -->" not in text
    assert "&lt;script&gt;" in text and "&amp;amp;" in text and "q-&lt;b&gt;evil&lt;/b&gt;" in text
    assert all(img["src"].startswith("data:image/png;base64,") for img in page.imgs) and len(page.imgs) >= 6
    assert "http://" not in text and "https://" not in text
    assert "Content-Security-Policy" in text
    md = (pipeline["html"].parent / "report.md").read_text(encoding="utf-8")
    assert "<script" not in md and "<img" not in md and "&lt;script&gt;" in md


def test_no_bidi_or_invisible_character_from_the_data_reaches_the_report(pipeline):
    """U+202E in a document or a query would let "gnp\u202e.exe" show as "exe.png"; every such character of the
    data (bidi controls, zero-width and other format characters, controls) appears as a visible escape."""
    import unicodedata

    for name, backslash in (("report.html", "\\"), ("report.md", "\\\\")):  # Markdown escapes a backslash
        text = (pipeline["html"].parent / name).read_text(encoding="utf-8")
        raw = sorted({f"U+{ord(c):04X}" for c in text
                      if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") and c not in "\n\t\r"})
        assert raw == [], f"{name} holds {raw}"
        shown = f"{backslash}u2067gnp{backslash}u202e.exe{backslash}u2069{backslash}u200b"
        assert shown in text, name


def test_plots_are_written_beside_the_report_and_embedded(pipeline):
    import base64

    out = pipeline["html"].parent
    text = pipeline["html"].read_text(encoding="utf-8")
    names = {p.name for p in (out / "plots").iterdir()}
    assert {"spectra.png", "factors.png", "self_influence.png", "scores_q0000.png", "scores_q0002.png"} <= names
    for name in ("spectra.png", "factors.png", "self_influence.png"):
        data = (out / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and base64.b64encode(data).decode() in text


def test_layer_selection_by_name_index_and_substring():
    from dataworth.reports.report import select_layer

    names = ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    assert select_layer(names, None) == names[0]
    assert select_layer(names, "2") == names[2] and select_layer(names, -1) == names[2]
    assert select_layer(names, "0.mlp.down") == names[1]
    for bad in ("up_proj", "nothing", "7"):
        with pytest.raises(InputError, match="--layer"):
            select_layer(names, bad)


# ---------------------------------------------------------------------------------------------------------
# The value ledger


def _reference_ledger(matrix: np.ndarray, table: pd.DataFrame, ids: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    q, n = matrix.shape
    for j, train_id in enumerate(ids):
        pos = sum(float(matrix[i, j]) for i in range(q) if matrix[i, j] > 0)
        neg = sum(float(matrix[i, j]) for i in range(q) if matrix[i, j] < 0)
        rows = table[table.train_row == j]
        out[train_id] = {"positive_sum": pos, "negative_sum": neg, "net_sum": pos + neg, "positive_mean": pos / q,
                         "negative_mean": neg / q, "net_mean": (pos + neg) / q,
                         "topk_positive": int((rows.direction == "positive").sum()),
                         "topk_negative": int((rows.direction == "negative").sum())}
    return out


def test_value_ledger_equals_explicit_sums_over_the_score_matrix(pipeline):
    from dataworth.reports.ledger import value_ledger

    scores = pipeline["scores"]
    ids = [f"d{i}" for i in range(10)]
    reference = _reference_ledger(np.asarray(scores.matrix), scores.to_pandas(), ids)
    ledger = value_ledger(pipeline["root"] / "scores")
    assert ledger.attrs["basis"] == "full" and sorted(ledger.train_id) == ids
    assert list(ledger.net_sum) == sorted(ledger.net_sum, reverse=True)
    for rec in ledger.itertuples(index=False):
        for key, value in reference[rec.train_id].items():
            assert getattr(rec, key) == pytest.approx(value, rel=1e-9, abs=1e-12), (rec.train_id, key)

    by_source = value_ledger(pipeline["root"] / "scores", "source")
    groups = {"wiki": [0, 3, 6], "forum": [1, 4, 7], "books": [2, 5, 8], "<missing>": [9]}
    assert set(by_source.source) == set(groups) and by_source.n_docs.sum() == 10
    for rec in by_source.itertuples(index=False):
        members = [reference[f"d{i}"] for i in groups[rec.source]]
        assert rec.n_docs == len(members)
        assert rec.net_sum == pytest.approx(sum(m["net_sum"] for m in members), rel=1e-9)
        assert rec.negative_mean == pytest.approx(sum(m["negative_sum"] for m in members) / (3 * len(members)))
        assert rec.topk_positive == sum(m["topk_positive"] for m in members)
    with pytest.raises(InputError, match="--by nope: no training row has field 'nope'"):
        value_ledger(pipeline["root"] / "scores", "nope")


def test_value_ledger_without_the_full_matrix_sums_the_topk_entries_once(pipeline, tmp_path):
    from dataworth.reports.ledger import value_ledger

    scores_dir = topk_only_scores(pipeline, tmp_path / "scores")
    table = pipeline["scores"].to_pandas()
    ledger = value_ledger(scores_dir, out=tmp_path / "ledger").set_index("train_id")
    assert ledger.attrs["basis"] == "topk" and len(ledger) == 10
    pairs = table.drop_duplicates(["query_id", "train_row"])
    for train_id, rec in ledger.iterrows():
        mine = pairs[pairs.train_id == train_id]["score"]
        assert rec.positive_sum == pytest.approx(mine[mine > 0].sum()) and rec.negative_sum == pytest.approx(mine[mine < 0].sum())
    saved = pd.read_csv(tmp_path / "ledger" / "value.csv")
    assert list(saved.columns[:2]) == ["train_row", "train_id"] and len(saved) == 10
    parquet = pd.read_parquet(tmp_path / "ledger" / "value.parquet")
    assert list(parquet.train_id) == list(saved.train_id) and np.allclose(parquet.net_sum, saved.net_sum)


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_old_or_incomplete_scores_directories_get_one_line_errors(pipeline, tmp_path):
    from dataworth.reports.ledger import value_ledger
    from dataworth.reports.report import report

    with pytest.raises(InputError, match="not a scores directory"):
        report(tmp_path / "nothing", tmp_path / "out")
    old = tmp_path / "old"
    shutil.copytree(pipeline["root"] / "scores", old)
    summary = json.loads((old / "summary.json").read_text())
    (old / "summary.json").write_text(json.dumps({**summary, "version": 0}))
    with pytest.raises(InputError, match="field 'version' is 0"):
        value_ledger(old)
    (old / "summary.json").write_text(json.dumps(summary))
    (old / "topk.parquet").unlink()
    with pytest.raises(InputError, match="topk.parquet: missing"):
        report(old, tmp_path / "out")
    with pytest.raises(InputError, match="--layer nothing"):
        report(pipeline["root"] / "scores", tmp_path / "out2", layer="nothing")
    with pytest.raises(InputError, match="--top-k"):
        report(pipeline["root"] / "scores", tmp_path / "out2", top_k=0)


def test_hurts_most_lists_only_negative_scores_and_says_when_there_are_none(pipeline, tmp_path):
    """The negative direction's top-k are the lowest scores; positive ones among them are not shown as
    hurting, and a query whose kept scores are all positive says that no training row hurts it."""
    from dataworth.reports.report import report

    def all_positive_for_bob(table):
        bob = table.query_id == "q-bob"
        table.loc[bob, "score"] = table.loc[bob, "score"].abs() + 1e-3  # every kept score of q-bob positive
        return table

    scores_dir = topk_only_scores(pipeline, tmp_path / "scores", all_positive_for_bob)
    page_path = report(scores_dir, tmp_path / "out")
    html = page_path.read_text(encoding="utf-8")
    section = html.split('data-query-id="q-bob"')[1].split("</section>")[0]
    assert "No training row has a negative score for this query: none hurts it." in section
    docs = _parse(page_path).docs
    assert not [d for d in docs if d["query_id"] == "q-bob" and d["data-direction"] == "negative"]
    assert all((float(d["data-score"]) > 0) == (d["data-direction"] == "positive") for d in docs)
    markdown = (page_path.parent / "report.md").read_text(encoding="utf-8")
    assert "_No training row has a negative score for this query: none hurts it._" in markdown


def test_a_query_with_no_scored_rows_gets_a_visible_message(pipeline, tmp_path):
    from dataworth.reports.report import report

    scores_dir = topk_only_scores(pipeline, tmp_path / "scores", lambda t: t[t.query_id != "q-bob"])
    page_path = report(scores_dir, tmp_path / "out", top_k=1)
    text = page_path.read_text(encoding="utf-8")
    bob = text.split('data-query-id="q-bob"')[1].split("</section>")[0]
    assert bob.count("No training rows were scored for this query.") == 2
    assert "1 query has no scored training rows: q-bob" in text
    assert len(_parse(page_path).docs) == 2 * 2


def test_cli_report_and_value(pipeline, tmp_path):
    from click.testing import CliRunner

    from dataworth.cli import cli

    runner = CliRunner()
    scores_dir = str(pipeline["root"] / "scores")
    res = runner.invoke(cli, ["report", "--scores", scores_dir, "--out", str(tmp_path / "r"), "--top-k", "1",
                              "--layer", "1"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == f"report: {tmp_path / 'r' / 'report.html'}"
    res = runner.invoke(cli, ["value", "--scores", scores_dir, "--by", "source", "--out", str(tmp_path / "v")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "v" / "value_by_source.csv").is_file() and "full matrix" in res.output
    res = runner.invoke(cli, ["value", "--scores", str(tmp_path / "missing")])
    assert res.exit_code == 2 and res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1
    for name in ("report", "value"):
        assert "Example" in runner.invoke(cli, [name, "--help"]).output


# ---------------------------------------------------------------------------------------------------------
# A real browser


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def test_headless_chromium_renders_the_report_without_errors_or_injected_script(pipeline, tmp_path):
    found = _chromium()
    if found is None:
        pytest.skip("no chromium + chromedriver on PATH (Debian: apt-get install chromium chromium-driver; "
                    "`make install` does it where apt-get is available as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)
    try:
        driver.get(pipeline["html"].resolve().as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        assert driver.title == "dataworth report"
        assert driver.execute_script("return typeof window.__pwned") == "undefined"
        assert len(driver.find_elements(By.CSS_SELECTOR, "section.query")) == 3
        assert len(driver.find_elements(By.CSS_SELECTOR, "span.tok")) == _expected_token_count(pipeline)
        body = driver.find_element(By.TAG_NAME, "body").text
        for hostile in (SCRIPT_DOC, IMG_DOC, ENTITY_DOC, "<script>alert(1)</script>", "q-<b>evil</b>"):
            assert hostile in body
        assert len(driver.find_elements(By.CSS_SELECTOR, "img")) == len(_parse(pipeline["html"]).imgs)
        assert all(driver.execute_script("return arguments[0].naturalWidth", img) > 0
                   for img in driver.find_elements(By.CSS_SELECTOR, "img"))
        driver.save_screenshot(str(tmp_path / "report-overview.png"))
        driver.execute_script("document.getElementById('q-0').scrollIntoView()")
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
        search = driver.find_element(By.ID, "search")
        search.send_keys("q-alice")
        visible = [s.get_attribute("id") for s in driver.find_elements(By.CSS_SELECTOR, "section.query") if s.is_displayed()]
        assert visible == ["q-0"]
        assert driver.find_element(By.ID, "shown-count").text == f"{len(visible)} of 3 queries shown"
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        driver.quit()
    assert shot.read_bytes().startswith(b"\x89PNG")
    # Whoever changes the report looks at the screenshot: DATAWORTH_UPDATE_SCREENSHOT=1 refreshes the committed
    # copy in docs/ (off by default so that `make test` leaves the tree clean).
    if os.environ.get("DATAWORTH_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "report-screenshot.png")


def test_value_and_report_refuse_a_store_with_other_rows_in_the_same_number(pipeline, tmp_path):
    """Issue 16's reproduction: ``tac train.jsonl > rev.jsonl``, extract it with the same settings, then
    ``value --store rev`` / ``report --store rev``: same row count, other documents at each row — refused,
    naming both store digests, instead of crediting r9's value to r20."""
    from click.testing import CliRunner

    from dataworth.cli import cli
    from dataworth.gradients.extract import ExtractConfig, extract
    from dataworth.store.reader import open_store

    root = pipeline["root"]
    lines = (root / "train.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "rev.jsonl").write_text("".join(reversed(lines)))
    rev = extract(ExtractConfig(model=str(root / "model"), data=str(tmp_path / "rev.jsonl"), out=str(tmp_path / "rev"),
                                modules="mlp", projection="random", rank_in=4, rank_out=3, seed=1, dtype="float32",
                                batch_size=4, shard_rows=4, max_length=MAX_LENGTH, device="cpu"), progress=False)
    scored = open_store(root / "store")
    assert rev.rows == scored.rows and rev.ids != scored.ids
    runner = CliRunner()
    for args in (["value", "--scores", str(root / "scores"), "--store", str(rev.path), "--out", str(tmp_path / "v")],
                 ["report", "--scores", str(root / "scores"), "--store", str(rev.path), "--out", str(tmp_path / "r")]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
        assert rev.digest[:16] in result.output and scored.digest[:16] in result.output, result.output
    assert not (tmp_path / "v").exists() and not (tmp_path / "r").exists()
    ok = runner.invoke(cli, ["value", "--scores", str(root / "scores"), "--store", str(root / "store"),
                             "--out", str(tmp_path / "v")])
    assert ok.exit_code == 0, ok.output
