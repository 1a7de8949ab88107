"""Interop with spacy-llm: its registered models as our backend, and our backend inside its ``llm`` component."""

import pytest
import spacy


def test_spacy_llm_registered_model_as_backend():
    nlp = spacy.blank("en")
    ner = nlp.add_pipe(
        "llm_lar_ner",
        config={
            "labels": ["location"],
            "backend": {"@llm_models": "spacy_llmner.SpacyLLM.v1", "model": {"@llm_models": "spacy.NoOp.v1"}},
        },
    )
    assert not ner.constrained  # spacy-llm models take no grammar
    doc = nlp("Paris is big.")
    assert list(doc.ents) == [] and doc._.llm_ner_usage["llm_lar_ner"]["calls"] == 1


@pytest.mark.model
def test_our_llamacpp_backend_serves_spacy_llm_llm_component():
    nlp = spacy.blank("en")
    nlp.add_pipe(
        "llm",
        config={
            "task": {"@llm_tasks": "spacy.NER.v3", "labels": ["PERSON", "LOCATION"]},
            "model": {"@llm_models": "spacy_llmner.LlamaCpp.v1", "model": "gemma3-270m"},
            "save_io": True,
        },
    )
    doc = nlp("Tony Blair lived in London.")
    io = doc.user_data["llm_io"]["llm"]
    assert "Tony Blair lived in London" in io["prompt"][0] and isinstance(io["response"][0], str)
    assert all(e.label_ in ("PERSON", "LOCATION") for e in doc.ents)
