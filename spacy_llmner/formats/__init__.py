"""Output formats: how an answer is written, rendered for demonstrations, parsed, and constrained by a grammar."""

from spacy.util import registry

from .inline import BracketFormat, XMLFormat
from .listing import JSONFormat, LinesFormat
from .spans import Located, locate

FORMATS = {f.name: f for f in (BracketFormat, XMLFormat, JSONFormat, LinesFormat)}


@registry.misc("spacy_llmner.BracketFormat.v1")
def make_bracket_format() -> BracketFormat:
    return BracketFormat()


@registry.misc("spacy_llmner.XMLFormat.v1")
def make_xml_format() -> XMLFormat:
    return XMLFormat()


@registry.misc("spacy_llmner.JSONFormat.v1")
def make_json_format() -> JSONFormat:
    return JSONFormat()


@registry.misc("spacy_llmner.LinesFormat.v1")
def make_lines_format() -> LinesFormat:
    return LinesFormat()


def get_format(name: str):
    try:
        return FORMATS[name]()
    except KeyError:
        raise ValueError(f"Unknown output format {name!r}; choose one of {sorted(FORMATS)}") from None


__all__ = ["BracketFormat", "XMLFormat", "JSONFormat", "LinesFormat", "FORMATS", "get_format", "locate", "Located"]
