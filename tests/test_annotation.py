"""LLM-assisted annotation: refine (proposals, merge policies), label mixing (groups, weights, the sampling
reader), the review page in a real headless browser, and refine with the real embedded model."""

import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import spacy
from spacy.tokens import Doc, DocBin, Span

from spacy_llmner.annotation import MixSettings, compare, merge, mix_docs, mixing_reader, refine_docs, review_page
from spacy_llmner.annotation.mixing import balance_factors, groups, sample

ROOT = Path(__file__).resolve().parents[1]


def doc_with(nlp, words, ents, spans=None, key="refine_llm", scores=None):
    doc = Doc(nlp.vocab, words=words)
    doc.set_ents([Span(doc, s, e, label=lab) for s, e, lab in ents], default="outside")
    if spans is not None:
        doc.spans[key] = [Span(doc, s, e, label=lab) for s, e, lab in spans]
        doc.spans[key].attrs["scores"] = scores or [None] * len(spans)
    return doc


WORDS = "Tony Blair met Angela Merkel in London and Paris .".split()


def test_compare_classifies_additions_type_and_boundary_conflicts(nlp):
    doc = doc_with(nlp, WORDS, [(0, 2, "politician"), (6, 7, "location"), (3, 5, "person")])
    human = list(doc.ents)
    pred = [
        Span(doc, 0, 2, label="politician"),  # agrees: not a proposal
        Span(doc, 3, 5, label="politician"),  # same extent, other label
        Span(doc, 6, 9, label="location"),  # overlaps London with other boundaries
        Span(doc, 8, 9, label="location"),  # inside the boundary conflict's extent: still a boundary conflict
    ]
    props = compare(human, pred[:3], [0.9, 0.8, 0.7])
    assert [(p.kind, p.label, p.confidence) for p in props] == [
        ("type", "politician", 0.8),
        ("boundary", "location", 0.7),
    ]
    assert props[0].human == ((3, 5, "person"),)
    doc2 = doc_with(nlp, WORDS, [(0, 2, "politician")])
    (p,) = compare(list(doc2.ents), [Span(doc2, 8, 9, label="location")], [0.4])
    assert p.kind == "addition" and p.human == ()
    with pytest.raises(ValueError, match="scores"):
        compare(human, pred, [0.1])


def test_merge_policies(nlp):
    doc = doc_with(nlp, WORDS, [(0, 2, "politician"), (3, 5, "person")])
    human = list(doc.ents)
    pred = [Span(doc, 3, 5, label="politician"), Span(doc, 6, 7, label="location"), Span(doc, 8, 9, label="location")]
    props = compare(human, pred, [0.9, 0.8, 0.3])
    merge(doc, human, props, "keep-human", 0.5)
    assert [(e.text, e.label_) for e in doc.ents] == [("Tony Blair", "politician"), ("Angela Merkel", "person")]
    merge(doc, human, props, "add-llm-above-threshold", 0.5)
    assert [e.text for e in doc.ents] == ["Tony Blair", "Angela Merkel", "London"]  # Paris is below 0.5
    merge(doc, human, props, "flag-conflicts", 0.5)
    assert [e.text for e in doc.ents] == ["Tony Blair", "London"]
    # the disputed tokens are missing annotation (neither entity nor O): a student does not learn from them
    assert [t.ent_iob_ for t in doc[3:5]] == ["", ""] and doc[5].ent_iob_ == "O"
    with pytest.raises(ValueError, match="policy"):
        merge(doc, human, props, "trust-llm", 0.5)


def test_refine_docs_runs_a_pipeline_and_keeps_the_evidence(nlp):
    from fakes import add_fake_ner

    add_fake_ner(nlp, lambda q: "Angela Merkel | person\nLondon | location" if "Merkel" in q else "")
    human = [doc_with(nlp, WORDS, [(0, 2, "person")]), doc_with(nlp, "Nothing here .".split(), [])]
    out = list(refine_docs(nlp, human, "add-llm-above-threshold", threshold=0.0))
    (d1, props1, usage1), (d2, props2, _) = out
    assert [(e.text, e.label_) for e in d1.ents] == [
        ("Tony Blair", "person"),
        ("Angela Merkel", "person"),
        ("London", "location"),
    ]
    assert [s.text for s in d1.spans["refine_human"]] == ["Tony Blair"]
    assert [s.text for s in d1.spans["refine_additions"]] == ["Angela Merkel", "London"]
    assert len(d1.spans["refine_additions"].attrs["scores"]) == 2
    assert usage1["llm_lar_ner"]["calls"] == 1 and not props2 and not list(d2.ents)
    assert [t.text for t in d1] == WORDS  # the human tokenization is kept


def refined_fixture(nlp):
    """Two refined docs: one with additions, one with a type conflict only."""
    a = doc_with(nlp, WORDS, [(0, 2, "politician")])
    b = doc_with(nlp, "The Labour Party won in Wales .".split(), [(1, 3, "organisation")])
    out = []
    for doc, pred, scores in (
        (a, [Span(a, 3, 5, label="politician"), Span(a, 6, 7, label="location")], [0.91, 0.62]),
        (b, [Span(b, 1, 3, label="politicalparty")], [0.77]),
    ):
        refined = list(refine_docs(_Replay(nlp, [(pred, scores)]), [doc], "add-llm-above-threshold", 0.5))
        out.append(refined[0][0])
    return out


class _Replay:
    """A stand-in pipeline that predicts given spans (for the page and mixing fixtures)."""

    def __init__(self, nlp, answers):
        self.vocab, self.answers = nlp.vocab, answers

    def pipe(self, docs, batch_size=None):
        for doc, (spans, scores) in zip(docs, self.answers):
            doc.spans["llm_ner"] = [Span(doc, s.start, s.end, label=s.label_) for s in spans]
            doc.spans["llm_ner"].attrs["scores"] = scores
            yield doc


def test_review_page_in_a_headless_browser(nlp, tmp_path):
    """The page loads in Chromium, its script runs (the filter from the address hides the doc without additions),
    the fixture doc's additions are shown, and a screenshot is written."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is missing: `make test` installs it (apt-get install chromium)"
    page = tmp_path / "review.html"
    page.write_text(review_page(refined_fixture(nlp)), encoding="utf8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path}/p"]
    url = page.as_uri() + "#additions"
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert "1 of 2 docs shown" in dom  # written by the page's script: it ran
    assert 'id="doc-0" data-additions="2"' in dom and "+politician 0.91" in dom and "+location 0.62" in dom
    doc1 = dom[dom.index('id="doc-1"') - 20 : dom.index('id="doc-1"') + 200]
    assert "hidden" in doc1 and "LLM politicalparty 0.77, human organisation (type)" in dom
    shot = tmp_path / "review.png"
    subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1200,900", url], capture_output=True, timeout=120
    )
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_mixing_groups_weights_and_counts(nlp):
    docs = refined_fixture(nlp)
    # doc 0: both additions merged (>= 0.5), so they agree with the reference: no group; doc 1: one type conflict
    assert [len(groups(list(d.ents), list(d.spans["refine_llm"]))) for d in docs] == [0, 1]
    assert [len(groups(list(d.ents), list(d.spans["refine_llm"]), conflicts=False)) for d in docs] == [0, 0]
    assert mix_docs(docs)[1]["groups"] == 0  # by default conflicts keep the human label
    mixed, stats = mix_docs(docs, MixSettings(llm_weight=0.5, conflicts=True))
    (p,) = mixed[1].spans["mix_llm"].attrs["p"]
    b = balance_factors(Counter(stats["reference"]), Counter(stats["llm"]))["politicalparty"]
    assert p == pytest.approx(0.5 * b) and 0 < b <= 1
    assert stats["expected"]["politicalparty"] == pytest.approx(p, abs=0.01)
    assert stats["expected"]["organisation"] == pytest.approx(1 - p, abs=0.01)
    # the class-imbalance factor: a label the LLM over-produces (relative to the reference) is shrunk
    factors = balance_factors(Counter(person=10, location=10), Counter(person=30, location=5))
    assert factors["person"] < 0.6 and factors["location"] == 1.0
    with pytest.raises(ValueError, match="refine_llm"):
        mix_docs([doc_with(nlp, WORDS, [])])


def test_the_mixing_reader_samples_the_soft_target(nlp, tmp_path):
    doc = doc_with(nlp, WORDS, [(0, 2, "person")], spans=[(0, 2, "politician"), (6, 7, "location")], scores=[0.9, 0.9])
    # Paris stays unannotated (missing) in the reference
    doc.set_ents([Span(doc, 0, 2, label="person")], missing=[Span(doc, 8, 9)], default="outside")
    (mixed,), _ = mix_docs([doc], MixSettings(llm_weight=0.8, balance=False, conflicts=True))
    assert sorted(mixed.spans["mix_llm"].attrs["p"]) == [0.8, 0.8]
    rng = random.Random(0)
    draws = [sample(mixed, rng) for _ in range(2000)]
    politician = sum(any(e.label_ == "politician" for e in d.ents) for d in draws) / len(draws)
    london = sum(any(e.text == "London" for e in d.ents) for d in draws) / len(draws)
    assert abs(politician - 0.8) < 0.04 and abs(london - 0.8) < 0.04
    assert all(d[8].ent_iob_ == "" for d in draws)  # missing annotation stays missing
    assert all(len({e.label_ for e in d.ents if e.start == 0}) == 1 for d in draws)  # one version per group
    path = tmp_path / "mixed.spacy"
    DocBin(docs=[mixed], store_user_data=True).to_disk(path)
    read = mixing_reader(str(path), seed=1)
    first = [ex.reference for ex in read(nlp)]  # initialize: both versions, so every label is known
    assert {e.label_ for d in first for e in d.ents} == {"person", "politician", "location"}
    later = [[(e.text, e.label_) for e in ex.reference.ents] for _ in range(40) for ex in read(nlp)]
    assert len(later) == 40 and len({tuple(x) for x in later}) > 1  # drawn afresh on each read


def test_refine_and_mix_commands(tmp_path):
    teacher = spacy.blank("en")
    teacher.add_pipe("entity_ruler").add_patterns(
        [{"label": "politician", "pattern": "Olaf Scholz"}, {"label": "country", "pattern": "Germany"}]
    )
    teacher.to_disk(tmp_path / "teacher")
    nlp = spacy.blank("en")
    human = [doc_with(nlp, "Olaf Scholz visited Germany .".split(), [(3, 4, "location")])]
    DocBin(docs=human).to_disk(tmp_path / "human.spacy")
    run = [sys.executable, "-m", "spacy_llmner.cli"]
    out = subprocess.run(
        [*run, "refine", str(tmp_path / "teacher"), str(tmp_path / "human.spacy"), str(tmp_path / "r.spacy")],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert "1 additions, 1 type" in out and (tmp_path / "r.html").exists()
    (refined,) = DocBin().from_disk(tmp_path / "r.spacy").get_docs(nlp.vocab)
    # ents without scores count as confident: the addition is merged; the conflict keeps the human label
    assert [(e.text, e.label_) for e in refined.ents] == [("Olaf Scholz", "politician"), ("Germany", "location")]
    out = subprocess.run(
        [
            *run,
            "mix",
            str(tmp_path / "r.spacy"),
            str(tmp_path / "m.spacy"),
            "--stats",
            str(tmp_path / "c.json"),
            "--conflicts",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert "1 disagreement groups" in out and "country" in out  # --conflicts: the type conflict is mixed
    bad = subprocess.run(
        [
            *run,
            "refine",
            str(tmp_path / "teacher"),
            str(tmp_path / "human.spacy"),
            str(tmp_path / "x.spacy"),
            "--policy",
            "llm-wins",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode != 0 and "--policy must be one of" in bad.stderr
    # a --cache no component can use is refused, not silently ignored
    cmd = [*run, "refine", str(tmp_path / "teacher"), str(tmp_path / "human.spacy"), str(tmp_path / "y.spacy")]
    nocache = subprocess.run([*cmd, "--cache", str(tmp_path / "c.sqlite")], capture_output=True, text=True, cwd=ROOT)
    assert nocache.returncode != 0 and "no component" in nocache.stderr and "cache_path" in nocache.stderr


@pytest.mark.model
def test_refine_with_the_real_model_proposes_the_omitted_politicians(nlp):
    """The tuned model with two demonstrations: the human labels hold only London; refine proposes the
    demonstrated politicians as additions, never touches the human entity, and scores every proposal."""
    from test_llamacpp_e2e import make

    llm, _ = make()
    text = "Tony Blair met Angela Merkel in London ."
    human = doc_with(nlp, text.split(), [(6, 7, "location")])
    ((doc, props, usage),) = refine_docs(llm, [human], "add-llm-above-threshold", threshold=0.5)
    added = {(s.text, s.label_) for s in doc.spans["refine_additions"]}
    assert added & {("Tony Blair", "politician"), ("Angela Merkel", "politician")}
    assert ("London", "location") in {(e.text, e.label_) for e in doc.ents}
    assert all(p.kind == "addition" or p.human for p in props)
    assert all(s is not None and 0 < s <= 1 for s in doc.spans["refine_llm"].attrs["scores"])
    assert usage["llm_lar_ner"]["calls"] == 1


def test_mixing_against_the_human_labels_weights_additions_by_confidence(nlp):
    """reference_key = refine_human: refine's hard merge is undone and every addition becomes soft, trained on
    with probability llm_weight x b(label) x confidence."""
    docs = refined_fixture(nlp)
    assert len(docs[0].ents) == 3  # refine merged both additions
    settings = MixSettings(llm_weight=1.0, balance=False, use_confidence=True, reference_key="refine_human")
    mixed, stats = mix_docs(docs, settings)
    assert [e.text for e in mixed[0].ents] == ["Tony Blair"]
    assert sorted(mixed[0].spans["mix_llm"].attrs["p"]) == pytest.approx([0.62, 0.91])
    assert stats["expected"]["location"] == pytest.approx(0.62) and stats["reference"].get("location", 0) == 0
