"""What a component learns from its pool (``spacy_llmner.pool_fit``): the lexicon, the per-label thresholds, the
component fitting them by annotating its own pool (never shown a doc's own labels), and saving them. The real
model's end-to-end check is the last test."""

import math

import pytest
import spacy
from spacy.tokens import Doc, Span

from spacy_llmner.lar import Candidate
from spacy_llmner.pool_fit import Lexicon, PoolFit, fit_thresholds, merge, micro_prf
from spacy_llmner.ty import Generation

from fakes import FakeBackend, add_fake_ner

LABELS = ["location", "misc", "organisation", "person"]
# what the fake model says of each text it finds: (label, confidence). "Borrower" is a person in this pool's
# convention and the model says organisation; "Loan Agreement" is never annotated and the model says misc.
MODEL = {
    "Borrower": ("organisation", 0.6),
    "Ashford Bank": ("organisation", 0.9),
    "Loan Agreement": ("misc", 0.8),
    "Paris": ("location", 0.9),
}
POOL = [
    ("The Borrower shall pay Ashford Bank .", [("Borrower", "person"), ("Ashford Bank", "organisation")]),
    ("The Borrower signed the Loan Agreement in Paris .", [("Borrower", "person"), ("Paris", "location")]),
    ("Ashford Bank may end the Loan Agreement .", [("Ashford Bank", "organisation")]),
    ("The Loan Agreement was signed in Paris .", [("Paris", "location")]),
    ("Nothing was owed by the Borrower .", [("Borrower", "person")]),
    ("Paris is far from Ashford Bank .", [("Paris", "location"), ("Ashford Bank", "organisation")]),
]


def offsets(text, ents):
    return [(text.index(t), text.index(t) + len(t), label) for t, label in ents]


class ConfidentFake(FakeBackend):
    """Answers each known text in the query, one line each, with that line's probability."""

    def __init__(self):
        super().__init__(lambda q: "\n".join(f"{t} | {MODEL[t][0]}" for t in MODEL if t in q) + "\n\n")

    def generate(self, requests):
        out = []
        for g, r in zip(super().generate(requests), requests):
            query = r.prompt.rsplit("Sentence: ", 1)[1].split("\n", 1)[0]
            ends, end = [], 0
            for t in (t for t in MODEL if t in query):
                end += len(f"{t} | {MODEL[t][0]}") + 1
                ends.append((end - 1, math.log(MODEL[t][1])))
            out.append(Generation(g.text, g.prompt_tokens, len(ends) + 1, token_logprobs=(*ends, (len(g.text), 0.0))))
        return out


def pool_docs(nlp):
    docs = []
    for text, ents in POOL:
        doc = nlp.make_doc(text)
        doc.ents = [doc.char_span(s, e, label=lab) for s, e, lab in offsets(text, ents)]
        docs.append(doc)
    return docs


def fitted_nlp(**settings):
    nlp = spacy.blank("en")
    ner = add_fake_ner(
        nlp,
        None,
        labels=LABELS,
        zero_shot=False,
        retriever={"@misc": "spacy_llmner.Retriever.v1", "strategy": "sentence", "k": 2},
        pool_fit={"@misc": "spacy_llmner.PoolFit.v1", **settings},
    )
    ner.backend = ConfidentFake()
    ner.initialize(pool=pool_docs(nlp))
    return nlp, ner


def test_the_lexicon_counts_texts_as_words_and_can_leave_a_doc_out():
    pool = [(text, offsets(text, ents)) for text, ents in POOL]
    lexicon = Lexicon.build(pool)
    assert lexicon.annotated["Borrower"] == {"person": 3} and lexicon.seen["Borrower"] == 3
    assert "Loan Agreement" not in lexicon.annotated  # never annotated
    text = "Borrowers met the Borrower ."  # whole words only
    assert lexicon.matches(text) == [(18, 26, "person", 1.0)]
    # whole words: not inside another word, even where the text ends or starts with punctuation
    dotted = Lexicon.build([("The U.S. and .NET met .", [(4, 8, "location"), (13, 17, "misc")])])
    assert [m[:3] for m in dotted.matches("U.S.A. and ASP.NET but U.S. and .NET")] == [
        (23, 27, "location"),
        (32, 36, "misc"),
    ]
    # a text annotated once, in the doc left out, is not in the lexicon the doc sees
    once = [("Acme sold Paris .", [(0, 4, "organisation"), (10, 15, "location")]), ("Paris slept .", [])]
    alone = Lexicon.build(once)
    assert [m[2] for m in alone.matches("Acme and Paris")] == ["organisation", "location"]
    assert alone.matches("Acme and Paris", leave_out=once[0]) == []  # Paris: seen once, annotated 0 times
    # a rate under min_rate: Paris is annotated in one of its two occurrences
    assert not [m for m in Lexicon.build(once, min_rate=0.6).matches("Paris") if m[2] == "location"]


def test_merge_relabels_same_boundaries_adds_free_matches_and_leaves_overlaps():
    found = {(4, 12): Candidate(4, 12, label="organisation", confidence=0.6), (20, 30): Candidate(20, 30, "misc")}
    merge(found, [(4, 12, "person", 1.0), (22, 25, "location", 0.9), (40, 45, "location", 0.7)])
    assert (found[(4, 12)].label, found[(4, 12)].from_lexicon) == ("person", True)
    assert (22, 25) not in found and found[(40, 45)].from_lexicon and found[(40, 45)].confidence == 0.7


def test_thresholds_keep_confident_spans_and_close_a_label_that_only_harms():
    gold = [[(0, 5, "person")], [(0, 5, "person")], [], []]
    predicted = [
        [(0, 5, "person", 0.9, False)],
        [(0, 5, "person", 0.7, False)],
        [(0, 5, "person", 0.3, False), (6, 9, "misc", 0.95, False)],
        [(0, 4, "misc", 0.8, False), (0, 9, "location", 0.2, True)],  # a lexicon span: kept whatever the threshold
    ]
    thresholds = fit_thresholds(predicted, gold, ["person", "misc", "location"])
    assert 0.3 < thresholds["person"] <= 0.7 and thresholds["misc"] == 1.0 and thresholds["location"] == 0.0
    assert micro_prf(predicted, gold, thresholds)[2] > micro_prf(predicted, gold, {})[2]


def test_initialize_fits_the_pool_without_showing_a_doc_its_own_labels():
    nlp, ner = fitted_nlp()
    fit = ner.pool_fit
    assert fit.thresholds["misc"] == 1.0 and fit.lexicon.annotated["Borrower"] == {"person": 3}
    assert fit.report["docs"] == len(POOL) and fit.report["fitted_f"] > fit.report["generated_f"]
    assert fit.report["fitted_f"] == 1.0  # every pool doc right once the fit applies
    for request in ner.backend.requests:  # fitting prompts: the pool's docs, each without itself
        query = request.prompt.rsplit("Sentence: ", 1)[1].split("\n", 1)[0]
        shown = request.prompt.rsplit("Sentence: ", 1)[0]
        assert f"Sentence: {query}\n" not in shown
    doc = nlp("The Borrower met Ashford Bank about the Loan Agreement .")
    assert [(e.text, e.label_) for e in doc.ents] == [("Borrower", "person"), ("Ashford Bank", "organisation")]
    assert doc.spans["llm_ner"].attrs["scores"] == [1.0, 1.0]  # both in the lexicon: their rate in the pool
    plain = spacy.blank("en")
    add_fake_ner(plain, None, labels=LABELS).backend = ConfidentFake()
    before = plain("The Borrower met Ashford Bank about the Loan Agreement .")
    assert {(e.text, e.label_) for e in before.ents} == {
        ("Borrower", "organisation"),
        ("Ashford Bank", "organisation"),
        ("Loan Agreement", "misc"),
    }


def test_the_fit_is_saved_loaded_and_forgotten_with_the_labels(tmp_path):
    nlp, ner = fitted_nlp(thresholds=False)
    assert ner.pool_fit.thresholds == {} and ner.pool_fit.lexicon is not None
    nlp.to_disk(tmp_path / "p")
    loaded = spacy.load(tmp_path / "p").get_pipe("llm_lar_ner")
    assert loaded.pool_fit == PoolFit.from_dict(ner.pool_fit.to_dict())
    assert "pool_fit.json" in (tmp_path / "p" / "llm_lar_ner" / "files.json").read_text()
    again = spacy.blank("en")
    add_fake_ner(
        again,
        None,
        labels=LABELS,
        retriever={"@misc": "spacy_llmner.Retriever.v1"},
        pool_fit={"@misc": "spacy_llmner.PoolFit.v1"},
    ).from_bytes(ner.to_bytes())
    assert again.get_pipe("llm_lar_ner").pool_fit.lexicon.annotated == ner.pool_fit.lexicon.annotated
    ner.set_labels(["person"])
    assert ner.pool_fit is None


def test_a_damaged_fit_file_names_the_component_and_the_file(tmp_path):
    nlp, _ = fitted_nlp()
    nlp.to_disk(tmp_path / "p")
    (tmp_path / "p" / "llm_lar_ner" / "pool_fit.json").write_text('{"thresholds": {"misc": 3}, "lexicon": null}')
    with pytest.raises(ValueError, match=r"llm_lar_ner.*pool_fit.json"):
        spacy.load(tmp_path / "p")


def test_pool_fit_needs_a_retriever_and_sane_settings():
    with pytest.raises(ValueError, match="pool_fit learns from the retriever's pool"):
        add_fake_ner(spacy.blank("en"), None, pool_fit={"@misc": "spacy_llmner.PoolFit.v1"})
    with pytest.raises(ValueError, match="min_rate"):
        fitted_nlp(min_rate=0.0)


def test_real_model_pool_fit_learns_the_pools_convention(tmp_path):
    """The shipped model and adapter, span retrieval k = 2 from six pool sentences whose convention no model
    knows ("Borrower" is a person): after the fit the convention holds in new text, and the fit never lowers
    the pool's F1 (coordinate ascent starts from keeping everything)."""
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "llm_lar_ner",
        config={
            "labels": LABELS,
            "retriever": {"@misc": "spacy_llmner.Retriever.v1", "strategy": "span", "k": 2},
            "pool_fit": {"@misc": "spacy_llmner.PoolFit.v1"},
            "cache_path": str(tmp_path / "answers.sqlite"),
        },
    )
    ner = nlp.get_pipe("llm_lar_ner")
    ner.initialize(pool=pool_docs(nlp))
    report = ner.pool_fit.report
    assert report["docs"] == len(POOL) and report["fitted_f"] >= report["lexicon_f"]
    doc = nlp("Yesterday the Borrower wrote to the bank in London .")
    assert ("Borrower", "person") in [(e.text, e.label_) for e in doc.ents]
    assert all(Span(doc, e.start, e.end).text == e.text for e in doc.ents) and isinstance(doc, Doc)
