"""Builds the completion prompt: fixed parts first (instructions, label list with definitions, demonstrations),
the query last, so consecutive prompts share the longest possible prefix (llama.cpp re-evaluates only the rest).

Prompts are plain completion text: they suit base models (Gemma 3 270M) and instruct models alike, and every
demonstration shows the exact answer format the parser reads.
"""

import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from .labels import LabelSet
from .ty import GenerationRequest, OutputFormat

DEFAULT_INSTRUCTIONS = "Find the named entities in each sentence and give the type of each one."
EXTRACT_INSTRUCTIONS = "Find the named entities in each sentence."


@dataclass
class Demonstration:
    text: str
    spans: List[Tuple[int, int, str]] = field(default_factory=list)  # character offsets, target labels

    def to_dict(self):
        return {"text": self.text, "spans": [{"start": s, "end": e, "label": lab} for s, e, lab in self.spans]}

    @classmethod
    def from_dict(cls, data) -> "Demonstration":
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise ValueError(f"A demonstration needs a 'text' string, got {str(data)[:80]!r}")
        spans = []
        for sp in data.get("spans", data.get("entities", [])):
            start, end, label = int(sp["start"]), int(sp["end"]), str(sp["label"])
            if not 0 <= start < end <= len(data["text"]):
                raise ValueError(f"Demonstration span {sp} lies outside its text {data['text'][:60]!r}")
            spans.append((start, end, label))
        return cls(data["text"], spans)


# What the model is never shown, each character replaced by one space so that offsets into the shown text are
# offsets into the source: whitespace (a prompt keeps one line per sentence), C0/C1 control characters (a NUL ends
# a C string: llama.cpp would see the prompt cut there; escape sequences and bells would end up inside entities)
# and lone surrogates (not encodable as UTF-8). Format characters (zero-width joiners, RTL marks) and combining
# marks are text: they stay.
_HIDDEN = re.compile(r"[\s\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# Control characters and lone surrogates that are not whitespace: never part of an entity span.
CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ud800-\udfff]")


def display(text: str) -> str:
    """The text as the prompt shows it: every whitespace or control character becomes a space (offsets kept)."""
    return _HIDDEN.sub(" ", text)


def shown_tokens(shown: str, offsets: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """The tokens' ranges as the model sees them in ``shown``: without the spaces ``display`` put at their edges
    (a control character glued to a word), and none for a token that shows as spaces only."""
    out = []
    for start, end in offsets:
        piece = shown[start:end]
        if piece.strip():
            out.append((start + len(piece) - len(piece.lstrip()), end - len(piece) + len(piece.rstrip())))
    return out


def visible(text: str) -> str:
    """``text`` with control characters (not whitespace) replaced by spaces: for prompt parts that keep their
    line breaks (instructions, label definitions)."""
    return CONTROL.sub(" ", text)


def answer_budget(n_tokens: int) -> int:
    """The default token limit of an answer about a chunk of ``n_tokens`` words: what a full answer can need (a
    whole inline copy with markup; a list naming most of its words) with room to spare, so it scales with the chunk
    and is reached only by an answer that loops on a repeated mention."""
    return 32 + 3 * n_tokens


class PromptBuilder:
    def __init__(self, labels: LabelSet, fmt: OutputFormat, instructions: str = DEFAULT_INSTRUCTIONS):
        self.labels = labels
        self.format = fmt
        self.instructions = instructions

    def header(self) -> str:
        lines = [visible(self.instructions.strip()), "Entity types:"]
        for label in self.labels:
            name = self.labels.prompt_names[label]
            definition = display(self.labels.definitions.get(label) or "").strip()
            lines.append(f"- {name}: {definition}" if definition else f"- {name}")
        return "\n".join(lines) + "\n\n"

    def render_demonstration(self, demo: Demonstration) -> str:
        spans = []
        for s, e, label in demo.spans:
            target = self.labels.resolve(label)
            if target is not None:
                spans.append((s, e, self.labels.prompt_names[target]))
        text = display(demo.text).rstrip()
        return f"Sentence: {text}\n{self.format.cue}{self.format.render(text, spans)}\n\n"

    def build(self, text: str, demonstrations: Sequence[Demonstration] = ()) -> str:
        return "".join(self.parts(text, demonstrations))

    def parts(self, text: str, demonstrations: Sequence[Demonstration] = ()) -> Tuple[str, ...]:
        """The prompt as (header, each demonstration, the question): ``GenerationRequest.parts``."""
        demos = tuple(self.render_demonstration(d) for d in demonstrations)
        return (self.header(), *demos, f"Sentence: {display(text).rstrip()}\n{self.format.cue}")

    def request(
        self,
        shown: str,
        token_offsets: Sequence[Tuple[int, int]],
        demonstrations: Sequence[Demonstration],
        *,
        n_tokens: int,
        max_new_tokens: Optional[int],
        constrained: bool,
    ) -> GenerationRequest:
        """The one-pass request for ``shown`` (a chunk's text of ``n_tokens`` tokens; ``token_offsets``: its
        non-space tokens), with the format's grammar over those tokens when ``constrained``; its answer may have
        ``max_new_tokens`` tokens, or (None) what the chunk can need (``answer_budget``)."""
        grammar = self.format.grammar(shown, token_offsets, self.labels.names()) if constrained else None
        budget = answer_budget(n_tokens) if max_new_tokens is None else max_new_tokens
        parts = self.parts(shown, demonstrations)
        return GenerationRequest(
            "".join(parts), budget, tuple(self.format.stop), grammar, parts if demonstrations else ()
        )

    def for_extraction(self) -> "PromptBuilder":
        """The same prompt with every type shown as ``entity``: EL4NER's span extraction."""
        aliases = {
            a: "entity" for label in self.labels for a in (label, self.labels.prompt_names[label]) if a != "entity"
        }
        return PromptBuilder(LabelSet(["entity"], synonyms=aliases), self.format, EXTRACT_INSTRUCTIONS)

    def for_typing(self) -> "PromptBuilder":
        """The prompt LAR typing continues: this one in the lines format (``Span | label``)."""
        if self.format.name == "lines":
            return self
        from .formats import LinesFormat

        return PromptBuilder(self.labels, LinesFormat(), self.instructions)
