import json
import warnings

import pytest
import spacy
from spacy.tokens import Doc
from spacy.training import Example

from spacy_llmner.ty import BackendError

from fakes import FakeBackend, add_fake_ner


def lines_for(entities):
    """A canned lines-format answer naming ``entities`` (text → label) that occur in the query."""
    return lambda query: "\n".join(f"{t} | {lab}" for t, lab in entities.items() if t in query) or "none"


def test_entities_and_nested_spans_are_written(nlp):
    add_fake_ner(nlp, lines_for({"Bank of England": "organisation", "England": "location", "Mark Carney": "person"}))
    doc = nlp("Mark Carney led the Bank of England until 2020.")
    assert [(e.text, e.label_) for e in doc.ents] == [("Mark Carney", "person"), ("Bank of England", "organisation")]
    # the nested "England" is kept in doc.spans only
    assert ("England", "location") in [(s.text, s.label_) for s in doc.spans["llm_ner"]]


def test_unknown_labels_and_hallucinations_are_counted(nlp):
    ner = add_fake_ner(nlp, lambda q: "Paris | city\nBerlin | location\nParis | location")
    doc = nlp("I love Paris.")
    assert [(e.text, e.label_) for e in doc.ents] == [("Paris", "location")]
    usage = doc._.llm_ner_usage["llm_lar_ner"]
    assert usage["unknown_labels"] == 1 and usage["hallucinated"] == 1 and usage["calls"] == 1
    assert ner.usage.docs == 1


def test_label_synonyms_and_labels_with_spaces(nlp):
    add_fake_ner(
        nlp,
        lambda q: "Labour | political_party\nLondon | LOC",
        labels=["political party", "city/town"],
        label_synonyms={"LOC": "city/town"},
    )
    doc = nlp("Labour won in London.")
    assert [(e.text, e.label_) for e in doc.ents] == [("Labour", "political party"), ("London", "city/town")]
    prompt = nlp.get_pipe("llm_lar_ner").backend.requests[0].prompt
    assert "- political_party" in prompt and "- city_town" in prompt


def test_labels_that_collide_in_prompts_are_rejected(nlp):
    with pytest.raises(ValueError, match="indistinguishable"):
        add_fake_ner(nlp, lambda q: "", labels=["political party", "political_party"])


def test_empty_whitespace_emoji_and_cjk_input(nlp):
    fake = FakeBackend(lines_for({"東京": "location", "Ana": "person"}))
    ner = add_fake_ner(nlp, lambda q: "")
    ner.backend = fake
    docs = list(nlp.pipe(["", "   \n\t ", "Ana 🙂 visited 東京 yesterday 🎉", "🙂🙂"]))
    assert [len(d.ents) for d in docs[:2]] == [0, 0]
    assert [(e.text, e.label_) for e in docs[2].ents] == [("Ana", "person"), ("東京", "location")]
    assert len(fake.requests) == 2  # nothing is sent for empty or whitespace-only docs


def test_long_doc_is_split_by_sentence_never_truncated(nlp):
    fake = FakeBackend(lines_for({"Zorbania": "location"}))
    ner = add_fake_ner(nlp, lambda q: "", max_chunk_tokens=100)
    ner.backend = fake
    sentence = "The delegation from Zorbania arrived on a very long and slow train today ."
    n_sent = 20000 // len(sentence.split()) + 1
    text = " ".join([sentence] * n_sent)
    doc = nlp(text)
    assert len(doc) >= 20000
    chunks = ner.chunks(doc)
    # chunks tile the doc exactly, each within the limit, each starting a sentence
    assert chunks[0][0] == 0 and chunks[-1][1] == len(doc)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert all(0 < e - s <= 100 for s, e in chunks)
    assert all(doc[s].text == "The" for s, _ in chunks)
    assert len([e for e in doc.ents if e.text == "Zorbania"]) == n_sent  # every sentence was annotated
    assert len(fake.requests) == len(chunks)


def test_a_document_is_asked_about_one_sentence_at_a_time(nlp):
    """A model tuned on single sentences stops early on a paragraph: each sentence gets its own prompt (the
    sentencizer's boundaries where the pipeline sets none, else the pipeline's), batched; offsets stay exact."""
    ner = add_fake_ner(nlp, lines_for({"Ana": "person", "Oslo": "location", "Acme": "organisation"}))
    text = "Ana flew to Oslo. She met Acme there!  Then Ana went home? Yes."
    doc = nlp(text)
    shown = [r.prompt.rsplit("Sentence: ", 1)[1].split("\n", 1)[0] for r in ner.backend.requests]
    assert shown == ["Ana flew to Oslo.", "She met Acme there!", "Then Ana went home?", "Yes."]
    assert [(e.text, e.label_, e.start_char) for e in doc.ents] == [
        ("Ana", "person", 0),
        ("Oslo", "location", 12),
        ("Acme", "organisation", 26),
        ("Ana", "person", 44),
    ]
    assert doc.text == text
    # boundaries a pipeline sets are the ones used
    nlp2 = spacy.blank("en")
    nlp2.add_pipe("sentencizer", config={"punct_chars": ["!"]})
    ner2 = add_fake_ner(nlp2, lines_for({"Ana": "person"}))
    nlp2(text)
    assert len(ner2.backend.requests) == 2
    # packing: as many sentences as fit one prompt
    nlp3 = spacy.blank("en")
    ner3 = add_fake_ner(nlp3, lines_for({"Ana": "person"}), max_chunk_sentences=None)
    assert len(nlp3(text).ents) == 2 and len(ner3.backend.requests) == 1
    ner4 = add_fake_ner(spacy.blank("en"), lines_for({"Ana": "person"}), name="two", max_chunk_sentences=2)
    assert [len(ner4.chunks(nlp.make_doc(text)))] == [2]


def test_a_sentence_longer_than_the_limit_is_cut_not_dropped(nlp):
    fake = FakeBackend(lines_for({"Quux": "location"}))
    ner = add_fake_ner(nlp, lambda q: "", max_chunk_tokens=10)
    ner.backend = fake
    doc = nlp(" ".join(["word"] * 25 + ["Quux"] + ["word"] * 5))
    assert [(e.text, e.label_) for e in doc.ents] == [("Quux", "location")]
    assert sum(e - s for s, e in ner.chunks(doc)) == len(doc)


class DownBackend(FakeBackend):
    def generate(self, requests):
        raise BackendError("connection refused")


def test_backend_down_raises_naming_component_and_keeps_earlier_docs(nlp):
    ner = add_fake_ner(nlp, lines_for({"Paris": "location"}))
    done = []
    stream = nlp.pipe(["Paris one.", "Paris two.", "Paris three."], batch_size=1)
    done.append(next(stream))
    ner.backend = DownBackend(lambda q: "")
    with pytest.raises(BackendError, match="llm_lar_ner.*connection refused"):
        done.append(next(stream))
    assert [e.text for e in done[0].ents] == ["Paris"]


def test_backend_down_with_on_error_skip_marks_docs(nlp):
    ner = add_fake_ner(nlp, lambda q: "", on_error="skip")
    ner.backend = DownBackend(lambda q: "")
    doc = nlp("Paris is big.")
    assert not doc.ents and "connection refused" in doc.user_data["llm_ner_errors"][0]
    assert doc._.llm_ner_usage["llm_lar_ner"]["errors"] == 1


def test_save_io_and_accounting(nlp):
    add_fake_ner(nlp, lines_for({"Paris": "location"}), save_io=True)
    doc = nlp("Paris is big.")
    io = doc._.llm_ner_io["llm_lar_ner"]
    assert io[0]["response"] == "Paris | location" and io[0]["prompt"].endswith("Sentence: Paris is big.\nEntities:\n")
    usage = doc._.llm_ner_usage["llm_lar_ner"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] == 5


def test_demonstrations_are_in_the_prompt_before_the_query(nlp, tmp_path):
    demo = tmp_path / "demos.jsonl"
    demo.write_text(json.dumps({"text": "Ada lived in London.", "spans": [{"start": 0, "end": 3, "label": "person"}]}))
    ner = add_fake_ner(nlp, lambda q: "none", demonstrations=str(demo))
    nlp("Bob is here.")
    prompt = ner.backend.requests[0].prompt
    assert prompt.index("Sentence: Ada lived in London.\nEntities:\nAda | person\n\n") < prompt.index("Bob is here")


def test_serialization_roundtrip_without_the_demo_file_or_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SECRET_KEY", "sk-very-secret")
    demo = tmp_path / "demos.jsonl"
    demo.write_text(
        json.dumps({"text": "Ada lived in London.", "spans": [{"start": 13, "end": 19, "label": "location"}]})
    )
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "llm_lar_ner",
        config={
            "labels": ["person", "location"],
            "label_definitions": {"location": "a place"},
            "format": {"@misc": "spacy_llmner.XMLFormat.v1"},
            "backend": {
                "@llm_models": "spacy_llmner.OpenAICompat.v1",
                "api_key_env": "MY_SECRET_KEY",
                "base_url": "http://127.0.0.1:9/v1",
            },
            "demonstrations": str(demo),
        },
    )
    nlp.initialize()
    nlp.to_disk(tmp_path / "pipe")
    demo.unlink()  # the loaded pipeline carries its own copy
    everything = "".join(p.read_text(errors="ignore") for p in (tmp_path / "pipe").rglob("*") if p.is_file())
    assert "sk-very-secret" not in everything and "MY_SECRET_KEY" in everything
    loaded = spacy.load(tmp_path / "pipe")  # no network: constructing the backend contacts nothing
    ner = loaded.get_pipe("llm_lar_ner")
    assert ner.labels == ("person", "location")
    assert ner.label_set.definitions == {"location": "a place"}
    assert ner.format.name == "xml"
    assert [d.spans for d in ner.demonstrations] == [[(13, 19, "location")]]
    assert ner.from_bytes(ner.to_bytes()).demonstrations[0].text == "Ada lived in London."


def test_cache_answers_once_and_survives_a_new_process_object(nlp, tmp_path):
    calls = []

    def answer(q):
        calls.append(q)
        return "Paris | location"

    ner = add_fake_ner(nlp, answer, cache_path=str(tmp_path / "cache.sqlite"))
    from spacy_llmner.backends.cache import CachedBackend

    ner.backend = CachedBackend(FakeBackend(answer), tmp_path / "cache.sqlite")
    nlp("Paris is big.")
    doc = nlp("Paris is big.")
    assert len(calls) == 1 and doc._.llm_ner_usage["llm_lar_ner"]["cached_calls"] == 1
    # another cache object on the same file (as after a crash and restart) answers from disk
    again = CachedBackend(FakeBackend(answer), tmp_path / "cache.sqlite")
    ner.backend = again
    assert [e.text for e in nlp("Paris is big.").ents] == ["Paris"] and len(calls) == 1


def test_cache_key_changes_with_backend_identity(tmp_path):
    from spacy_llmner.backends.cache import CachedBackend
    from spacy_llmner.ty import GenerationRequest

    class Named(FakeBackend):
        def __init__(self, name):
            super().__init__(lambda q: name)
            self.name = name

        def identity(self):
            return {"model": self.name}

    req = [GenerationRequest("Sentence: x\n")]
    assert CachedBackend(Named("a"), tmp_path / "c.sqlite").generate(req)[0].text == "a"
    assert CachedBackend(Named("b"), tmp_path / "c.sqlite").generate(req)[0].text == "b"


def test_cache_keeps_answers_given_before_a_failure(tmp_path):
    from spacy_llmner.backends.cache import CachedBackend
    from spacy_llmner.ty import GenerationRequest

    class FailsOnThird(FakeBackend):
        def generate(self, requests):
            if "three" in requests[0].prompt:
                raise BackendError("crash")
            return super().generate(requests)

    cached = CachedBackend(FailsOnThird(lambda q: q), tmp_path / "c.sqlite")
    reqs = [GenerationRequest(f"Sentence: {w}\n") for w in ("one", "two", "three")]
    with pytest.raises(BackendError):
        cached.generate(reqs)
    assert len(cached.cache) == 2


def test_nlp_evaluate_uses_the_ner_scorer(nlp):
    add_fake_ner(nlp, lines_for({"Paris": "location", "Ana": "location"}))
    gold = Doc(nlp.vocab, words=["Ana", "likes", "Paris"], ents=["B-person", "O", "B-location"])
    scores = nlp.evaluate([Example(Doc(nlp.vocab, words=["Ana", "likes", "Paris"]), gold)])
    assert scores["ents_p"] == 0.5 and scores["ents_r"] == 0.5
    assert scores["ents_per_type"]["location"]["p"] == 0.5


def test_no_labels_is_a_clear_error(nlp):
    add_fake_ner(nlp, lambda q: "", labels=[])
    with pytest.raises(ValueError, match="llm_lar_ner: no labels"):
        nlp("text")


def test_initialize_takes_labels_from_examples(nlp):
    ner = add_fake_ner(nlp, lambda q: "", labels=[])
    gold = Doc(nlp.vocab, words=["Ana", "likes", "Paris"], ents=["B-PER", "O", "B-LOC"])
    nlp.initialize(lambda: [Example(Doc(nlp.vocab, words=["Ana", "likes", "Paris"]), gold)])
    assert ner.labels == ("LOC", "PER")


def test_generation_budget_scales_with_input(nlp):
    """By default an answer may hold what its chunk can need (32 + 3 per word); a set max_new_tokens is the cap."""
    ner = add_fake_ner(nlp, lambda q: "none")
    nlp("Short one.")
    nlp(" ".join(["word"] * 150))
    assert [r.max_tokens for r in ner.backend.requests] == [32 + 3 * 3, 32 + 3 * 150]
    nlp2 = spacy.blank("en")
    ner2 = add_fake_ner(nlp2, lambda q: "none", max_new_tokens=64)
    nlp2("Short one.")
    nlp2(" ".join(["word"] * 150))
    assert [r.max_tokens for r in ner2.backend.requests] == [64, 64]


def test_cut_answers_are_counted_and_warned_once(nlp):
    """An answer cut by its token limit loses the mentions after the cut: counted per doc and warned about once,
    naming the setting."""

    class Cut(FakeBackend):
        def generate(self, requests):
            out = super().generate(requests)
            for gen, req in zip(out, requests):
                gen.truncated = "cut" in req.prompt.rsplit("Sentence: ", 1)[1]
            return out

    ner = add_fake_ner(nlp, lambda q: "Paris | location", max_new_tokens=5)
    ner.backend = Cut(lambda q: "Paris | location")
    with pytest.warns(UserWarning, match=r"cut at their token limit, max_new_tokens = 5") as caught:
        docs = list(nlp.pipe(["Paris is cut here.", "Paris is whole.", "Paris is cut again."]))
    assert [d._.llm_ner_usage["llm_lar_ner"]["truncated"] for d in docs] == [1, 0, 1]
    assert ner.usage.truncated == 2
    assert sum("token limit" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per component
        nlp("Paris is cut once more.")
    assert ner.usage.truncated == 3
    assert [e.text for e in docs[0].ents] == ["Paris"]  # what the answer held before the cut is kept


def test_progress_bar_counts_docs(nlp, capsys):
    add_fake_ner(nlp, lines_for({"Paris": "location"}), show_progress=True)
    docs = list(nlp.pipe(["Paris one.", "Paris two.", "Paris three."], batch_size=2))
    assert len(docs) == 3
    err = capsys.readouterr().err
    assert "llm_lar_ner" in err and "3doc" in err.replace(" ", "")


def test_labels_learned_in_initialize_are_saved_with_the_pipeline(tmp_path):
    nlp = spacy.blank("en")
    ner = nlp.add_pipe("llm_lar_ner")  # no labels configured
    ner.initialize(
        demonstrations=[
            {
                "text": "Bob went to Rome.",
                "spans": [{"start": 0, "end": 3, "label": "person"}, {"start": 12, "end": 16, "label": "city"}],
            }
        ]
    )
    assert ner.labels == ("city", "person")
    nlp.to_disk(tmp_path / "p")
    assert spacy.load(tmp_path / "p").get_pipe("llm_lar_ner").labels == ("city", "person")
    back = spacy.blank("en")
    assert back.add_pipe("llm_lar_ner").from_bytes(ner.to_bytes()).labels == ("city", "person")
