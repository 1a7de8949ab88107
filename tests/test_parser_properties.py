"""Whatever a model writes, parsing never crashes and never yields a span whose text is not the source's."""

import spacy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spacy_llmner.formats import FORMATS, locate

from fakes import add_fake_ner

SOURCE_WORDS = ["Paris", "United", "Russia", "[", "]", "|", "<", ">", "loc", "the", "東京", "🙂", "\"", "\\", ","]
markupish = st.lists(st.sampled_from(list("[]|<>/{}\":,\n ") + ["loc", "person", "Paris", "Russia"])).map("".join)
answers = st.one_of(st.text(), markupish, st.lists(st.sampled_from(SOURCE_WORDS + ["[", "|loc]", "<loc>", "</loc>",
                                                                                  " | loc\n", '{"text": "', '", "label": "loc"}']))
                    .map("".join))
sources = st.lists(st.sampled_from(SOURCE_WORDS), min_size=0, max_size=12).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(FORMATS)), answer=answers, source=sources)
def test_parse_and_locate_never_crash_and_verify_text(name, answer, source):
    parsed = FORMATS[name]().parse(answer)
    located = locate(parsed.mentions, source, parsed.plain_text)
    texts = {m.text for m in parsed.mentions}
    for start, end, label in located.spans:
        assert 0 <= start < end <= len(source)
        assert source[start:end] in texts
    assert len(located.hallucinated) <= len(parsed.mentions)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(FORMATS)), answer=answers, source=sources)
def test_component_spans_always_match_the_doc(name, answer, source):
    nlp = spacy.blank("en")
    fmt = {"@misc": f"spacy_llmner.{FORMATS[name].__name__}.v1"}
    add_fake_ner(nlp, lambda _: answer, labels=["loc", "person"], format=fmt, alignment_mode="strict")
    doc = nlp(source)
    mentions = {m.text for m in FORMATS[name]().parse(answer).mentions}
    for span in doc.spans["llm_ner"]:
        assert span.text in mentions and span.label_ in ("loc", "person")
        assert doc.text[span.start_char : span.end_char] == span.text
