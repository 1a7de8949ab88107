"""The few types every part of the package meets.

Data flows one way: doc → prompt (``prompt.py``) → ``Backend`` → ``OutputFormat.parse`` → mentions →
``formats.spans.locate`` → verified character offsets → ``Span`` objects (``component.py``).
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable


class BackendError(RuntimeError):
    """A backend could not answer (server down, retries exhausted, prompt too long for the context)."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_tokens: int = 256
    stop: Tuple[str, ...] = ()
    grammar: Optional[str] = None  # GBNF; ignored by backends without grammar support


@dataclass
class Generation:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cached: bool = False
    grammar_ignored: bool = False  # the answer breaks the request's grammar: the server did not apply it


@dataclass(frozen=True)
class ScoreRequest:
    """A constrained choice: the log-probability of each option continuing the context (label names, yes/no)."""

    context: str
    options: Tuple[str, ...]


@dataclass
class Scores:
    logprobs: List[float]  # one per option, summed over its tokens
    prompt_tokens: int = 0  # tokens evaluated for this request (context and options)
    seconds: float = 0.0
    cached: bool = False


@runtime_checkable
class Backend(Protocol):
    """Prompts in, completions out, batched. ``identity`` names everything that changes an answer (the cache key)."""

    supports_grammar: bool

    def identity(self) -> Dict[str, Any]:
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> List[Generation]:
        ...


@runtime_checkable
class Scorer(Protocol):
    """Backends that can score fixed continuations (llama.cpp) make LAR's typing and verification one forward
    pass per option instead of a generation; others answer the same choice with a grammar-restricted generation."""

    def score(self, requests: Sequence[ScoreRequest]) -> List[Scores]:
        ...


@dataclass(frozen=True)
class Mention:
    """One entity as an answer states it: its text, its label, and for inline formats where it sits in the
    answer's plain text (``None`` for list formats, which name a mention without placing it)."""

    text: str
    label: str
    answer_start: Optional[int] = None


@dataclass
class ParsedAnswer:
    mentions: List[Mention] = field(default_factory=list)
    plain_text: Optional[str] = None  # inline formats: the answer with its markup removed
    malformed: int = 0  # fragments of the answer that could not be read as a mention


@runtime_checkable
class OutputFormat(Protocol):
    """How an answer is written: renders demonstrations, parses answers, builds a GBNF grammar for an input."""

    name: str
    cue: str  # what the prompt says just before an answer ("Entities:")
    lead: str  # what every answer starts with (a space after a cue on the same line)
    stop: Tuple[str, ...]
    inline: bool  # True: the answer rewrites the sentence with markup; False: it lists mentions

    def render(self, text: str, spans: Sequence[Tuple[int, int, str]]) -> str:
        ...

    def parse(self, answer: str) -> ParsedAnswer:
        ...

    def grammar(self, text: str, token_offsets: Sequence[Tuple[int, int]], labels: Sequence[str]) -> str:
        ...
