"""Retrieval on a tiny hand-written pool: correctness per strategy, selection options, persistence."""

import numpy as np
import pytest
import spacy

from spacy_llmner.prompt import Demonstration
from spacy_llmner.retrieval import STRATEGIES, Pool, Retriever, candidate_spans

from fakes import add_fake_ner


def demo(text, *ents):
    spans = []
    for t, label in ents:
        i = text.index(t)
        spans.append((i, i + len(t), label))
    return Demonstration(text, spans)


POOL = [
    demo("The Labour Party won the election in Manchester.", ("Labour Party", "party"), ("Manchester", "location")),
    demo("Voters went to the polls across the country on Thursday."),
    demo("Parliament debated the budget for many hours."),
    demo(
        "Zbigniew Brzezinski advised President Carter on foreign policy.",
        ("Zbigniew Brzezinski", "person"),
        ("Carter", "person"),
    ),
    demo("The senator campaigned for re-election in her home state."),
    demo(
        "Angela Merkel met the Social Democratic Party in Berlin.",
        ("Angela Merkel", "person"),
        ("Social Democratic Party", "party"),
        ("Berlin", "location"),
    ),
    demo("The minister resigned after the vote of no confidence."),
    demo("Tokyo hosted the summit of the Group of Seven.", ("Tokyo", "location"), ("Group of Seven", "organisation")),
]


@pytest.fixture(scope="module")
def built():
    """One encoder pass for the module: every strategy shares the built pool."""
    r = Retriever("word", k=3)
    r.build(POOL)
    return r


def with_strategy(built, strategy, **kw):
    r = Retriever(strategy, **{"k": 3, **kw})
    r.encoder, r.pool = built.encoder, built.pool
    return r


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "random"])
def test_exact_duplicate_ranks_first(built, strategy):
    r = with_strategy(built, strategy)
    for i in (0, 3, 5, 7):
        picked = r.retrieve([POOL[i].text])[0]
        assert picked[-1].text == POOL[i].text  # most similar sits last, closest to the query


@pytest.mark.parametrize("strategy", ["word", "span"])
def test_exclude_identical_never_shows_a_doc_its_own_labels(built, strategy):
    """refine over the pool's own docs: the doc itself (its labels, omissions included) is never a demonstration;
    the next most similar ones are shown instead."""
    r = with_strategy(built, strategy, exclude_identical=True)
    for i in (0, 3, 5, 7):
        picked = r.retrieve([POOL[i].text])[0]
        assert len(picked) == 3 and POOL[i].text not in [d.text for d in picked]


def test_exclude_identical_ignores_the_whitespace_a_file_or_the_prompt_adds():
    """A doc read from a BIO or .spacy file ends in a space, and a prompt shows a newline as a space: it is still
    the query's own text, never shown as its demonstration."""
    r = Retriever("span", k=3, exclude_identical=True)
    r.build([demo(d.text + " ", *[(d.text[s:e], lab) for s, e, lab in d.spans]) for d in POOL[:5]])
    for i in (0, 3):
        query = POOL[i].text.replace(" ", "\n", 1)
        picked = r.retrieve([query])[0]
        assert len(picked) == 3 and all(d.text.split() != query.split() for d in picked)


def test_word_level_prefers_a_shared_rare_entity_word_over_topical_similarity(built):
    query = "Brzezinski wrote a book about chess."
    word = with_strategy(built, "word", k=len(POOL)).retrieve([query])[0]
    ranking = [d.text for d in reversed(word)]
    rare = ranking.index(POOL[3].text)
    topical = ranking.index(POOL[1].text)
    assert rare < topical and rare == 0


def test_span_level_matches_entity_spans(built):
    assert candidate_spans("Yesterday Angela Merkel flew to Paris , France .") == [
        "Yesterday Angela Merkel",
        "Paris",
        "France",
    ]
    picked = with_strategy(built, "span").retrieve(["Merkel spoke with the Social Democrats in Hamburg."])[0]
    assert picked[-1].text == POOL[5].text


def test_caseless_text_still_has_candidate_spans():
    # lower-cased queries: capitalised runs find nothing, content-word runs and their words do
    assert candidate_spans("any cheap italian restaurants open after 10 pm") == [
        "cheap italian restaurants open",
        "cheap",
        "italian",
        "restaurants",
        "open",
        "10 pm",
        "10",
        "pm",
    ]
    assert candidate_spans("the the and of") == []
    assert len(candidate_spans(" ".join(f"word{i} of" for i in range(40)))) == 24  # bounded
    # cased text keeps its capitalised runs (repeats included, as before)
    assert candidate_spans("Paris and Paris") == ["Paris", "Paris"]


def test_random_is_seeded_and_deterministic(built):
    a = with_strategy(built, "random", seed=1).retrieve(["Some query."])[0]
    b = with_strategy(built, "random", seed=1).retrieve(["Some query."])[0]
    c = with_strategy(built, "random", seed=2).retrieve(["Some query."])[0]
    assert [d.text for d in a] == [d.text for d in b] and len(a) == 3
    assert [d.text for d in a] != [d.text for d in c]


def test_retrieval_is_deterministic(built):
    r = with_strategy(built, "word")
    q = ["The Labour Party lost in Leeds.", "Tokyo hosted talks."]
    assert [[d.text for d in x] for x in r.retrieve(q)] == [[d.text for d in x] for x in r.retrieve(q)]


def test_label_coverage_shows_more_labels(built):
    q = ["Merkel met Brzezinski."]
    plain = with_strategy(built, "sentence", k=2).retrieve(q)[0]
    covered = with_strategy(built, "sentence", k=2, label_coverage=True).retrieve(q)[0]
    labels = lambda ds: {lab for d in ds for _, _, lab in d.spans}  # noqa: E731
    assert len(labels(covered)) >= len(labels(plain)) and len(labels(covered)) >= 2


def test_mmr_avoids_near_duplicates(built):
    r = Retriever("sentence", k=2, mmr=0.7)
    r.encoder = built.encoder
    r.build(POOL + [demo("The Labour Party won the election in Manchester today.", ("Labour Party", "party"))])
    picked = [d.text for d in r.retrieve(["The Labour Party won the election in Manchester."])[0]]
    assert not all("Labour Party won" in t for t in picked)


def test_pool_roundtrip_without_pickle(built, tmp_path):
    built.pool.to_disk(tmp_path / "pool")
    loaded = Pool.from_disk(tmp_path / "pool")
    assert [d.text for d in loaded.demonstrations] == [d.text for d in POOL]
    assert isinstance(loaded.pieces, np.memmap) and loaded.pieces.dtype == np.float16
    r = Retriever("word", k=3)
    r.encoder, r.pool = built.encoder, loaded
    q = ["Brzezinski met Carter."]
    assert [d.text for d in r.retrieve(q)[0]] == [d.text for d in built.retrieve(q)[0]]
    for f in (tmp_path / "pool").glob("*.npy"):
        np.load(f, allow_pickle=False)  # raises if anything needed pickle


def test_component_uses_retrieved_demos_and_saves_the_pool(tmp_path, built):
    nlp = spacy.blank("en")
    ner = add_fake_ner(
        nlp,
        lambda q: "none",
        labels=["person", "party", "location", "organisation"],
        retriever={"@misc": "spacy_llmner.Retriever.v1", "strategy": "word", "k": 2},
    )
    ner.retriever.encoder = built.encoder
    ner.initialize(pool=POOL)
    nlp("Zbigniew Brzezinski met Carter.")
    prompt = ner.backend.requests[-1].prompt
    # the best match is the last demonstration, right before the query
    assert prompt.index("Entity types:") < prompt.index("Sentence: Zbigniew Brzezinski advised")
    assert prompt.rindex("Sentence: Zbigniew Brzezinski advised") < prompt.rindex("Sentence: Zbigniew Brzezinski met")
    assert "Sentence: Tokyo" not in prompt
    nlp.to_disk(tmp_path / "p")
    loaded = spacy.load(tmp_path / "p")
    lner = loaded.get_pipe("llm_lar_ner")
    assert len(lner.retriever.pool) == len(POOL)
    assert [d.text for d in lner.demonstrations_for(["Zbigniew Brzezinski met Carter."])[0]] == [
        d.text for d in ner.demonstrations_for(["Zbigniew Brzezinski met Carter."])[0]
    ]
    # to_bytes carries the pool too (nlp.pipe with n_process > 1 ships components as bytes)
    again = spacy.blank("en").from_config(nlp.config)
    again.from_bytes(nlp.to_bytes())
    bner = again.get_pipe("llm_lar_ner")
    assert len(bner.retriever.pool) == len(POOL)
    assert np.array_equal(np.asarray(bner.retriever.pool.pieces), np.asarray(built.pool.pieces))


def test_demonstration_budget_drops_whole_demos(built):
    nlp = spacy.blank("en")
    ner = add_fake_ner(
        nlp,
        lambda q: "none",
        labels=["person", "party", "location", "organisation"],
        retriever={"@misc": "spacy_llmner.Retriever.v1", "strategy": "sentence", "k": 5},
        max_demo_tokens=40,
    )
    ner.retriever.encoder, ner.retriever.pool = built.encoder, built.pool
    demos = ner.demonstrations_for(["The Labour Party won in Leeds."])[0]
    cost = sum(len(ner.prompts.render_demonstration(d)) // 4 + 1 for d in demos)
    assert 0 < len(demos) < 5 and cost <= 40
    assert demos[-1].text == ner.retriever.retrieve(["The Labour Party won in Leeds."])[0][-1].text


def test_initialize_builds_the_pool_from_training_examples(built):
    from spacy.tokens import Doc
    from spacy.training import Example

    nlp = spacy.blank("en")
    ner = add_fake_ner(nlp, lambda q: "none", retriever={"@misc": "spacy_llmner.Retriever.v1", "k": 1})
    ner.retriever.encoder = built.encoder
    gold = Doc(nlp.vocab, words=["Ana", "likes", "Paris"], ents=["B-person", "O", "B-location"])
    nlp.initialize(lambda: [Example(Doc(nlp.vocab, words=["Ana", "likes", "Paris"]), gold)])
    assert len(ner.retriever.pool) == 1 and ner.retriever.pool.demonstrations[0].spans[0][2] == "person"


@pytest.mark.model
def test_real_model_with_retrieved_demonstrations(built):
    """Gemma with word-level retrieval: the pool's own sentence comes back with its gold entity spans."""
    nlp = spacy.blank("en")
    ner = nlp.add_pipe(
        "llm_lar_ner",
        config={
            "labels": ["person", "party", "location", "organisation"],
            "retriever": {"@misc": "spacy_llmner.Retriever.v1", "strategy": "word", "k": 3},
        },
    )
    ner.retriever.encoder = built.encoder
    ner.initialize(pool=POOL)
    docs = list(nlp.pipe([POOL[5].text, "Gordon Brown spoke to the Labour Party in Leeds."]))
    got = {(e.text, e.label_) for e in docs[0].ents}
    assert {t for t, _ in got} == {"Angela Merkel", "Social Democratic Party", "Berlin"}
    assert ("Berlin", "location") in got
    assert ner.usage.calls == 2 and ner.usage.hallucinated == 0


def test_retriever_without_pool_is_a_clear_error():
    nlp = spacy.blank("en")
    add_fake_ner(nlp, lambda q: "none", retriever={"@misc": "spacy_llmner.Retriever.v1"})
    with pytest.raises(ValueError, match="llm_lar_ner: a retriever is configured but has no pool"):
        nlp("Paris is big.")
