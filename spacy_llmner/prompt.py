"""Builds the completion prompt: fixed parts first (instructions, label list with definitions, demonstrations),
the query last, so consecutive prompts share the longest possible prefix (llama.cpp re-evaluates only the rest).

Prompts are plain completion text: they suit base models (Gemma 3 270M) and instruct models alike, and every
demonstration shows the exact answer format the parser reads.
"""

import re
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

from .labels import LabelSet
from .ty import OutputFormat

DEFAULT_INSTRUCTIONS = "Find the named entities in each sentence and give the type of each one."


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
