"""The real embedded model (Gemma 3 270M, and SmolLM2-135M by short name) end to end on a few sentences."""

import pytest
import spacy

from spacy_llmner.formats import FORMATS

pytestmark = pytest.mark.model

DEMOS = [
    {"text": "Angela Merkel visited Paris with the Social Democratic Party.",
     "spans": [{"start": 0, "end": 13, "label": "politician"}, {"start": 22, "end": 27, "label": "location"},
               {"start": 37, "end": 60, "label": "party"}]},
    {"text": "The weather was cold and wet.", "spans": []},
    {"text": "Tony Blair led the Labour Party in London.",
     "spans": [{"start": 0, "end": 10, "label": "politician"}, {"start": 19, "end": 31, "label": "party"},
               {"start": 35, "end": 41, "label": "location"}]},
]
LABELS = ["politician", "party", "location"]


def make(fmt="lines", constrained=True, model="gemma3-270m"):
    nlp = spacy.blank("en")
    ner = nlp.add_pipe(
        "llm_lar_ner",
        config={
            "labels": LABELS,
            "format": {"@misc": f"spacy_llmner.{FORMATS[fmt].__name__}.v1"},
            "backend": {"@llm_models": "spacy_llmner.LlamaCpp.v1", "model": model},
            "constrained": constrained,
        },
    )
    ner.set_demonstrations(DEMOS)
    return nlp, ner


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("constrained", [False, True])
def test_demonstrated_sentence_is_recovered(fmt, constrained):
    """A sentence given verbatim as a demonstration must come back with its demonstrated entities."""
    nlp, ner = make(fmt, constrained)
    doc = nlp(DEMOS[2]["text"])
    got = {(e.text, e.label_) for e in doc.ents}
    assert ("Tony Blair", "politician") in got and ("London", "location") in got
    usage = doc._.llm_ner_usage["llm_lar_ner"]
    assert usage["calls"] == 1 and usage["completion_tokens"] > 0 and usage["prompt_tokens"] > 100
    if constrained:
        assert usage["hallucinated"] == 0 and usage["unknown_labels"] == 0 and usage["malformed"] == 0


@pytest.mark.parametrize("fmt", ["lines", "bracket"])
def test_structural_invariants_on_unseen_sentences(fmt):
    nlp, ner = make(fmt, constrained=True)
    texts = [
        "Gordon Brown spoke to the Conservative Party in Manchester.",
        "Nothing happened here.",
        "Jacinda Ardern met Emmanuel Macron in Wellington and Paris 🙂.",
    ]
    docs = list(nlp.pipe(texts))
    for doc in docs:
        spans = list(doc.spans["llm_ner"])
        assert all(s.label_ in LABELS for s in spans)
        ents = list(doc.ents)
        assert all(a.end <= b.start for a, b in zip(ents, ents[1:]))  # non-overlapping, ordered
        assert set((e.start, e.end, e.label_) for e in ents) <= set((s.start, s.end, s.label_) for s in spans)
    assert ner.usage.docs == 3 and ner.usage.calls == 3 and ner.usage.hallucinated == 0


def test_smollm2_loads_by_short_name_and_answers():
    nlp, ner = make("lines", constrained=True, model="smollm2-135m")
    doc = nlp(DEMOS[0]["text"])
    assert doc._.llm_ner_usage["llm_lar_ner"]["completion_tokens"] > 0
    assert all(s.label_ in LABELS for s in doc.spans["llm_ner"])


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_grammars_compile_for_awkward_text(fmt):
    from llama_cpp import LlamaGrammar

    text = 'He said "hi" \\ 東京 🙂 [x|y] <b> {"a": 1}'
    offsets = [(m.start(), m.end()) for m in __import__("re").finditer(r"\S+", text)]
    grammar = FORMATS[fmt]().grammar(text, offsets, ["person", "city_town"])
    assert LlamaGrammar.from_string(grammar, verbose=False) is not None
