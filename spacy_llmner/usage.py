"""Accounting: LLM calls, tokens and seconds, per doc and per run, plus what parsing had to drop."""

from dataclasses import asdict, dataclass, fields
from typing import Dict

from spacy.tokens import Doc


@dataclass
class Usage:
    docs: int = 0
    calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # generation time reported by the backend (0 for cached answers)
    hallucinated: int = 0  # mentions whose text is not in the source
    unknown_labels: int = 0  # mentions whose label is none of the label set
    malformed: int = 0  # answer fragments that could not be read as a mention
    errors: int = 0  # chunks left unannotated because the backend failed (on_error="skip")
    grammar_ignored: int = 0  # answers that break the grammar sent with them (a server that ignores the field)
    truncated: int = 0  # answers cut by their token limit (max_new_tokens): mentions after the cut are missing

    def add(self, other: "Usage") -> "Usage":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def doc_usage(doc: Doc) -> Dict[str, Dict[str, float]]:
    """A doc's LLM usage per component (``doc._.llm_ner_usage``; empty when no LLM component ran)."""
    return dict((doc._.llm_ner_usage or {}) if doc.has_extension("llm_ner_usage") else {})
