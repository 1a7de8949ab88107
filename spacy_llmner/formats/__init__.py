"""Output formats: how an answer is written, rendered for demonstrations, parsed, and constrained by a grammar."""

from spacy.util import registry

from .inline import BracketFormat, XMLFormat
from .listing import JSONFormat, LinesFormat
from .spans import Located, answer_spans, locate

FORMATS = {f.name: f for f in (BracketFormat, XMLFormat, JSONFormat, LinesFormat)}

# The classes are the registered functions; they take no arguments: {"@misc": "spacy_llmner.LinesFormat.v1"}
make_bracket_format = registry.misc.register("spacy_llmner.BracketFormat.v1", func=BracketFormat)
make_xml_format = registry.misc.register("spacy_llmner.XMLFormat.v1", func=XMLFormat)
make_json_format = registry.misc.register("spacy_llmner.JSONFormat.v1", func=JSONFormat)
make_lines_format = registry.misc.register("spacy_llmner.LinesFormat.v1", func=LinesFormat)

__all__ = ["BracketFormat", "XMLFormat", "JSONFormat", "LinesFormat", "FORMATS", "answer_spans", "locate", "Located"]
