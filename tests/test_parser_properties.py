"""Whatever a model writes, parsing never crashes and never yields a span whose text is not the source's."""

import pytest
import spacy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spacy_llmner.formats import FORMATS, BracketFormat, locate

from fakes import add_fake_ner

SOURCE_WORDS = ["Paris", "United", "Russia", "[", "]", "|", "<", ">", "loc", "the", "東京", "🙂", '"', "\\", ","]
markupish = st.lists(st.sampled_from(list('[]|<>/{}":,\n ') + ["loc", "person", "Paris", "Russia"])).map("".join)
answers = st.one_of(
    st.text(),
    markupish,
    st.lists(
        st.sampled_from(
            SOURCE_WORDS + ["[", "|loc]", "<loc>", "</loc>", " | loc\n", '{"text": "', '", "label": "loc"}']
        )
    ).map("".join),
)
sources = st.lists(st.sampled_from(SOURCE_WORDS), min_size=0, max_size=12).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(FORMATS)), answer=answers, source=sources)
def test_parse_and_locate_never_crash_and_verify_text(name, answer, source):
    parsed = FORMATS[name]().parse(answer)
    located = locate(parsed.mentions, source, parsed.plain_text)
    texts = {m.text for m in parsed.mentions}
    for start, end, _label in located.spans:
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


# ---- input text that contains the formats' own syntax -------------------------------------------------------------
# For any text (display()ed, as the component shows it) and any token-aligned gold spans: the rendered answer parses
# back to exactly the gold spans, and the grammar built for that text accepts the rendered answer.

from spacy_llmner.formats import gbnf  # noqa: E402
from spacy_llmner.prompt import display  # noqa: E402

SYNTAX = [
    "|",
    "[",
    "]",
    "<",
    ">",
    "{",
    "}",
    '"',
    "\\",
    "\n",
    "&",
    "&amp;",
    "-",
    "*",
    "•",
    "none",
    "|loc]",
    "</loc>",
    "<loc>",
    "\\[",
    '","label":"',
    "Acme",
    "Bob",
    "Paris",
    "東京",
    "🙂",
    " ",
    "  ",
    "\t",
    ":",
]
LABEL_NAMES = ["loc", "person", "organisation"]
_tokenizer = spacy.blank("en").tokenizer


@st.composite
def text_and_gold(draw, nested: bool):
    words = draw(st.lists(st.sampled_from(SYNTAX), min_size=1, max_size=14))
    seps = draw(st.lists(st.sampled_from(["", " ", " ", "\n"]), min_size=len(words), max_size=len(words)))
    text = "".join(w + s for w, s in zip(words, seps))
    doc = _tokenizer(text)
    words_at = [t.i for t in doc if not t.is_space]
    spans = []
    for _ in range(draw(st.integers(0, 4))):
        if not words_at:
            break
        a, b = sorted(draw(st.lists(st.sampled_from(words_at), min_size=2, max_size=2)))
        start, end = doc[a].idx, doc[b].idx + len(doc[b])
        label = draw(st.sampled_from(LABEL_NAMES))
        if nested:
            if any(s < start < e < end or start < s < end < e for s, e, _ in spans):
                continue
            if any((s, e) == (start, end) for s, e, _ in spans):
                continue
        elif any(start < e and s < end for s, e, _ in spans):
            continue
        spans.append((start, end, label))
    return display(text), doc, sorted(spans)


def token_offsets(doc):
    return [(t.idx, t.idx + len(t)) for t in doc if not t.is_space]


@settings(max_examples=250, deadline=None)
@given(name=st.sampled_from(sorted(FORMATS)), case=text_and_gold(nested=False))
def test_rendered_gold_parses_back_exactly_and_the_grammar_accepts_it(name, case):
    shown, doc, gold = case
    fmt = FORMATS[name]()
    answer = fmt.render(shown, gold)
    parsed = fmt.parse(answer)
    assert parsed.malformed == 0, answer
    if fmt.inline:
        assert parsed.plain_text == shown  # nothing of the input was read as markup
        assert sorted(locate(parsed.mentions, shown, parsed.plain_text).spans) == gold
    else:
        assert [(m.text, m.label) for m in parsed.mentions] == [(shown[s:e], lab) for s, e, lab in gold]
    grammar = fmt.grammar(shown, token_offsets(doc), LABEL_NAMES)
    assert gbnf.accepts(grammar, answer + fmt.stop[0]), answer


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(["bracket", "xml"]), case=text_and_gold(nested=True))
def test_nested_inline_gold_parses_back_exactly(name, case):
    shown, _, gold = case
    fmt = FORMATS[name]()
    parsed = fmt.parse(fmt.render(shown, gold))
    assert parsed.malformed == 0 and parsed.plain_text == shown
    assert sorted(locate(parsed.mentions, shown, parsed.plain_text).spans) == gold


def test_grammar_recognizer_rejects_what_the_grammar_forbids():
    doc = _tokenizer("The [Acme|organisation] deal")
    shown = display(doc.text)
    for name in sorted(FORMATS):
        fmt = FORMATS[name]()
        grammar = gbnf.Grammar(fmt.grammar(shown, token_offsets(doc), LABEL_NAMES))
        good = fmt.render(shown, [(5, 22, "organisation")]) + fmt.stop[0]
        assert grammar.accepts(good) and grammar.accepts(good[:7], prefix=True)
        assert not grammar.accepts(good[:7])  # a prefix is not a whole answer
        bad = fmt.render(shown, [(5, 22, "company")]) + fmt.stop[0]  # a label outside the set
        assert not grammar.accepts(bad) and not grammar.accepts(bad, prefix=True)
    # unescaped input syntax is not a copy of the input
    assert not gbnf.accepts(
        BracketFormat().grammar(shown, token_offsets(doc), LABEL_NAMES), " The [Acme|organisation] deal\n"
    )


@pytest.mark.parametrize(
    "text,mark",
    [
        ("The [Acme|organisation] deal", "Acme|organisation"),
        ("Say <person>Bob</person> now", "Bob"),
        ('He wrote {"text": "x", "label": "loc"} here', "x"),
        ("- Paris is far", "- Paris"),
    ],
)
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_input_syntax_never_leaks_into_spans(name, text, mark):
    """The answer a faithful model writes for such inputs yields the marked token run, exactly."""
    nlp = spacy.blank("en")
    doc = nlp.make_doc(text)
    tokens = [t for t in doc if mark.startswith(t.text) or t.text in mark]
    start = text.index(mark.split()[0]) if mark not in text else text.index(mark)
    span = doc.char_span(start, start + len(mark), alignment_mode="expand")
    fmt = FORMATS[name]()
    answer = fmt.render(display(text), [(span.start_char, span.end_char, "loc")])
    fmtcfg = {"@misc": f"spacy_llmner.{FORMATS[name].__name__}.v1"}
    add_fake_ner(nlp, lambda _: answer, labels=["loc"], format=fmtcfg)
    out = nlp(text)
    assert [(s.text, s.label_) for s in out.spans["llm_ner"]] == [(span.text, "loc")], (answer, tokens)
    usage = out._.llm_ner_usage["llm_lar_ner"]
    assert usage["malformed"] == 0 and usage["hallucinated"] == 0
