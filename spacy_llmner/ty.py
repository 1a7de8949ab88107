"""The few types every part of the package meets: requests and answers, the ``Backend`` protocol, the
``OutputFormat`` protocol, and ``LLMComponent``, the mark of our pipeline components.

Data flows one way: doc → chunks (``chunking.py``) → prompts (``prompt.py``) → ``Backend`` (``session.py``) →
``OutputFormat.parse`` → ``formats.spans`` (verified character offsets) → ``Span`` objects (``component.py``).
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

from .usage import Usage

if TYPE_CHECKING:
    from .calibration import Calibrations


class BackendError(RuntimeError):
    """A backend could not answer (server down, retries exhausted, prompt too long for the context)."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_tokens: int = 256
    stop: Tuple[str, ...] = ()
    grammar: Optional[str] = None  # GBNF; ignored by backends without grammar support
    # The prompt as (head, demonstration, ..., rest), their concatenation ``prompt``; empty: no such split. An engine
    # may read each demonstration after the head alone and reuse what it computed across prompts (the torch engine's
    # demonstrations = "parallel"); every other backend reads ``prompt``.
    parts: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.parts and (len(self.parts) < 3 or "".join(self.parts) != self.prompt):
            raise ValueError("GenerationRequest: parts must be (head, demonstration, ..., rest) joining to the prompt")


@dataclass
class Generation:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cached: bool = False
    grammar_ignored: bool = False  # the answer breaks the request's grammar: the server did not apply it
    truncated: bool = False  # cut by the request's max_tokens, not ended by the model: mentions may be missing
    # per generated token: (end offset in ``text``, the model's log-probability of it over the whole vocabulary);
    # empty where the backend does not report them. Per-entity confidences come from these.
    token_logprobs: Tuple[Tuple[int, float], ...] = ()


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
    """Prompts in, completions out, batched: what every backend offers (``backends.base.BackendBase`` gives the
    defaults, so a backend writes only what it does differently). Config validation checks a configured backend
    against this protocol."""

    supports_grammar: bool  # honours ``GenerationRequest.grammar`` (GBNF)
    supports_scoring: bool  # ``score`` ranks fixed continuations in one forward pass; else choices are generated
    parallel: int  # requests decoded together: the answers of such a group arrive together
    remote: bool  # waits on a server, not this machine's cores: an ensemble runs it beside in-process members
    # maps raw span confidence -> calibrated, one per number of demonstrations shown (``calibration.Calibrations``),
    # or None: the component applies them
    calibration: Optional["Calibrations"]

    def identity(self) -> Dict[str, Any]:
        """Everything that changes an answer (model, sampling): the answer cache's key."""

    def generate(self, requests: Sequence[GenerationRequest]) -> List[Generation]:
        """One completion per request, in order."""

    def generate_each(
        self, requests: Sequence[GenerationRequest], on_answer: Callable[[int, Generation], None]
    ) -> None:
        """``on_answer(i, generation)`` as each answer arrives (the cache commits it at once)."""

    def score(self, requests: Sequence[ScoreRequest]) -> List[Scores]:
        """The log-probability of each option continuing its context (only where ``supports_scoring``)."""

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` in the model's vocabulary (an estimate where the backend cannot tokenize)."""


@runtime_checkable
class LLMComponent(Protocol):
    """Marks the pipeline components whose entities come from LLM calls (``llm_lar_ner``, ``llm_ner_ensemble``):
    they are never a LAR source or an ensemble's upstream component, write their spans to ``spans_key`` and
    count their calls in ``usage``."""

    spans_key: str
    usage: Usage
    remote: bool  # its calls wait on servers: an ensemble runs it concurrently with in-process members


@dataclass(frozen=True)
class Mention:
    """One entity as an answer states it: its text, its label, for inline formats where it sits in the answer's
    plain text (``None`` for list formats, which name a mention without placing it), and the characters of the raw
    answer that state it (the lines format: its line), from which its confidence is read."""

    text: str
    label: str
    answer_start: Optional[int] = None
    answer_range: Optional[Tuple[int, int]] = None  # where the answer states it (its line), where the format knows


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

    def render(self, text: str, spans: Sequence[Tuple[int, int, str]]) -> str: ...

    def parse(self, answer: str) -> ParsedAnswer: ...

    def grammar(self, text: str, token_offsets: Sequence[Tuple[int, int]], labels: Sequence[str]) -> str: ...
