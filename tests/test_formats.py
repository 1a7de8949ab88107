import pytest

from spacy_llmner.formats import FORMATS, BracketFormat, JSONFormat, LinesFormat, XMLFormat, locate

TEXT = "Parties are the ruling United Russia , and Russia itself ."
UR = (TEXT.index("United Russia"), TEXT.index("United Russia") + len("United Russia"), "party")
RU_IN = (TEXT.index("Russia"), TEXT.index("Russia") + 6, "country")
RU = (TEXT.rindex("Russia"), TEXT.rindex("Russia") + 6, "country")


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_render_parse_roundtrip_flat(name):
    fmt = FORMATS[name]()
    answer = fmt.render(TEXT, [UR, RU])
    parsed = fmt.parse(answer)
    assert parsed.malformed == 0
    located = locate(parsed.mentions, TEXT, parsed.plain_text)
    assert not located.hallucinated
    assert (UR in located.spans) and (RU in located.spans)
    if fmt.inline:  # inline formats place each mention on the occurrence it marks
        assert sorted(located.spans) == sorted([UR, RU])


@pytest.mark.parametrize("fmt", [BracketFormat(), XMLFormat()])
def test_inline_nested_spans_roundtrip(fmt):
    answer = fmt.render(TEXT, [UR, RU_IN, RU])
    parsed = fmt.parse(answer)
    assert parsed.plain_text == TEXT
    assert sorted(locate(parsed.mentions, TEXT, parsed.plain_text).spans) == sorted([UR, RU_IN, RU])


def test_bracket_render_exact():
    assert BracketFormat().render("in Paris now", [(3, 8, "loc")]) == " in [Paris|loc] now"
    assert XMLFormat().render("in Paris now", [(3, 8, "loc")]) == " in <loc>Paris</loc> now"


def test_list_formats_mark_every_whole_word_occurrence():
    parsed = LinesFormat().parse("Russia | country\n")
    spans = locate(parsed.mentions, TEXT).spans
    # both standalone "Russia"s and the one inside "United Russia" (a whole word there too)
    assert len(spans) == 2 and all(TEXT[s:e] == "Russia" for s, e, _ in spans)
    assert locate(LinesFormat().parse("Rus | country").mentions, TEXT).spans == []  # never cuts a word


def test_hallucinated_mentions_are_dropped_and_counted():
    parsed = JSONFormat().parse('[{"text": "Moscow", "label": "city"}, {"text": "Russia", "label": "country"}]')
    located = locate(parsed.mentions, TEXT)
    assert [m.text for m in located.hallucinated] == ["Moscow"]
    assert {TEXT[s:e] for s, e, _ in located.spans} == {"Russia"}


def test_inline_answer_that_drifts_from_the_source_still_places_mentions():
    answer = "Parties are ruling [United Russia|party] , and [Russia|country] itself ."  # "the" dropped
    parsed = BracketFormat().parse(answer)
    spans = locate(parsed.mentions, TEXT, parsed.plain_text).spans
    assert sorted(spans) == sorted([UR, RU])


def test_broken_answers_are_counted_not_raised():
    assert BracketFormat().parse("[United Russia ,").malformed == 1
    assert XMLFormat().parse("<party>United Russia</country>").malformed >= 1
    assert LinesFormat().parse("United Russia\nRussia | country").malformed == 1
    truncated = JSONFormat().parse('[{"text": "Russia", "label": "country"}, {"text": "Uni')
    assert [m.text for m in truncated.mentions] == ["Russia"]


def test_lines_none_means_no_entities():
    assert LinesFormat().render("nothing here", []) == "none"
    assert LinesFormat().parse("none\n\n").mentions == []


def test_gbnf_literals_are_decoded_in_order():
    from spacy_llmner.formats.gbnf import literals

    grammar = 'root ::= "a\\"b" ( "\\n" | " | " )? item\n# a comment "x"\nitem ::= "\\x41\\\\" item?'
    assert literals(grammar) == ['a"b', "\n", " | ", "A\\"]
