"""Builds the completion prompt: fixed parts first (instructions, label list with definitions, demonstrations),
the query last, so consecutive prompts share the longest possible prefix (llama.cpp re-evaluates only the rest).

Prompts are plain completion text: they suit base models (Gemma 3 270M) and instruct models alike, and every
demonstration shows the exact answer format the parser reads.
"""

import re
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

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


def display(text: str) -> str:
    """The text as the prompt shows it: every whitespace character becomes a space (keeps offsets, keeps one line)."""
    return re.sub(r"\s", " ", text)


class PromptBuilder:
    def __init__(self, labels: LabelSet, fmt: OutputFormat, instructions: str = DEFAULT_INSTRUCTIONS):
        self.labels = labels
        self.format = fmt
        self.instructions = instructions

    def header(self) -> str:
        lines = [self.instructions.strip(), "Entity types:"]
        for label in self.labels:
            name = self.labels.prompt_names[label]
            definition = self.labels.definitions.get(label)
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
        demos = "".join(self.render_demonstration(d) for d in demonstrations)
        return f"{self.header()}{demos}Sentence: {display(text).rstrip()}\n{self.format.cue}"

    def request(
        self,
        shown: str,
        token_offsets: Sequence[Tuple[int, int]],
        demonstrations: Sequence[Demonstration],
        *,
        n_tokens: int,
        max_new_tokens: int,
        constrained: bool,
    ) -> GenerationRequest:
        """The one-pass request for ``shown`` (a chunk's text of ``n_tokens`` tokens; ``token_offsets``: its
        non-space tokens), with the format's grammar over those tokens when ``constrained``."""
        grammar = self.format.grammar(shown, token_offsets, self.labels.names()) if constrained else None
        # An answer needs at most about two tokens per input token (a full inline copy plus markup); the budget
        # stops greedy decoding that loops on a repeated mention from running to the hard cap.
        budget = min(max_new_tokens, 24 + 2 * n_tokens)
        return GenerationRequest(self.build(shown, demonstrations), budget, tuple(self.format.stop), grammar)

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
