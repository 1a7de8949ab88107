"""What a component learns from its own pool beyond demonstrations: the pool's conventions as a lexicon, and a
confidence threshold per label (``spacy_llmner.PoolFit.v1``, fitted by ``LLMNER.fit_to_pool``).

A pool of a few hundred labelled sentences says things no demonstration conveys to a small model: that a filing's
"Borrower" is annotated as a person every time, or that a label the model over-proposes (a financial set's
``misc``) is almost never right. ``initialize`` can measure both by annotating the pool itself, each doc with its
own text kept out of its demonstrations (``Retriever.exclude_identical``), and scoring the answers against the
pool's labels:

- the **lexicon**: each entity text of the pool, with the label it was given and how often the text was annotated
  where it occurs (its *rate*). A text annotated at least ``min_count`` times, at a rate of at least ``min_rate``,
  is an entity wherever it occurs as whole words; a generated span with exactly its boundaries takes its label.
  Its confidence is the rate. While fitting, each pool doc sees the lexicon of the other docs only.
- the **thresholds**: per label, the confidence under which generated spans are dropped, chosen by coordinate
  ascent on the pool's micro F1 (each label's candidates are the midpoints between its spans' confidences; a label
  whose spans do more harm than good gets 1.0). Lexicon spans are kept whatever the threshold.

Everything here is pure: the component supplies the answers (``LLMNER.fit_to_pool``).
"""

import re
from dataclasses import dataclass, field
from typing import Container, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import srsly
from spacy.util import registry

from .lar.config import Candidate

Gold = Sequence[Tuple[int, int, str]]  # character offsets and label
Scored = Tuple[int, int, str, Optional[float], bool]  # ... confidence (None: unmeasured), from the lexicon
FILE = "pool_fit.json"


@registry.misc("spacy_llmner.PoolFit.v1")
@dataclass(frozen=True)
class PoolFitSettings:
    """What ``initialize`` fits on the pool (see the module docstring).

    thresholds (bool): fit a confidence threshold per label.
    lexicon (bool): keep the pool's entity texts as a lexicon.
    sample (int): the most pool docs annotated to fit the thresholds (seeded sample); the lexicon uses all.
    min_count (int): times a text must be annotated in the pool to enter the lexicon.
    min_rate (float): share of a text's occurrences in the pool that are annotated with its label.
    seed (int): seeds the sample.
    """

    thresholds: bool = True
    lexicon: bool = True
    sample: int = 300
    min_count: int = 1
    min_rate: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if self.sample < 1 or self.min_count < 1 or not 0.0 < self.min_rate <= 1.0:
            raise ValueError(
                f"PoolFit: sample and min_count must be positive and min_rate in (0, 1], not sample = {self.sample}, "
                f"min_count = {self.min_count}, min_rate = {self.min_rate}"
            )


TOKEN = re.compile(r"\w+|[^\w\s]")  # a run of word characters, or one other visible character
WORD = re.compile(r"\w")


def occurrences(text: str, surfaces: Container[str], longest: int) -> Iterator[Tuple[int, int, str]]:
    """Whole-word occurrences in ``text`` of the ``surfaces`` (each at most ``longest`` TOKENs long), left to
    right, the longest at each place, none overlapping: dictionary lookups of token n-grams, whatever the number of
    surfaces."""
    tokens = [(m.start(), m.end()) for m in TOKEN.finditer(text)]
    i = 0
    while i < len(tokens):
        if tokens[i][0] and WORD.match(text, tokens[i][0] - 1):  # glued to a word before it: not a whole word
            i += 1
            continue
        for n in range(min(longest, len(tokens) - i), 0, -1):
            start, end = tokens[i][0], tokens[i + n - 1][1]
            if text[start:end] in surfaces and not WORD.match(text, end):
                yield start, end, text[start:end]
                i += n
                break
        else:
            i += 1


def longest_of(surfaces: Iterable[str]) -> int:
    return max((len(TOKEN.findall(t)) for t in surfaces), default=0)


@dataclass(frozen=True)
class Lexicon:
    """Entity texts of a pool: ``annotated[text][label]`` times labelled, ``seen[text]`` occurrences as words."""

    annotated: Mapping[str, Mapping[str, int]]
    seen: Mapping[str, int]
    min_count: int = 1
    min_rate: float = 0.5
    _longest: int = field(default=0, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_longest", longest_of(self.annotated))

    @classmethod
    def build(cls, pool: Sequence[Tuple[str, Gold]], min_count: int = 1, min_rate: float = 0.5) -> "Lexicon":
        annotated: Dict[str, Dict[str, int]] = {}
        for text, spans in pool:
            for label, surface in own_entities(text, spans):
                annotated.setdefault(surface, {}).setdefault(label, 0)
                annotated[surface][label] += 1
        longest, seen = longest_of(annotated), {}
        for text, _ in pool:
            for _, _, surface in occurrences(text, annotated, longest):
                seen[surface] = seen.get(surface, 0) + 1
        return cls(annotated, seen, min_count, min_rate)

    def __len__(self) -> int:
        return len(self.annotated)

    def matches(self, text: str, leave_out: Optional[Tuple[str, Gold]] = None) -> List[Tuple[int, int, str, float]]:
        """The lexicon's entities in ``text``: (start, end, label, rate); ``leave_out``: as if that pool doc (its
        text and entities) had not been in the pool."""
        found = list(occurrences(text, self.annotated, self._longest))
        own_annotated: Dict[Tuple[str, str], int] = {}
        own_seen: Dict[str, int] = {}
        if leave_out is not None:
            for label, surface in own_entities(*leave_out):
                own_annotated[(surface, label)] = own_annotated.get((surface, label), 0) + 1
            own = found if leave_out[0] == text else occurrences(leave_out[0], self.annotated, self._longest)
            for _, _, surface in own:
                own_seen[surface] = own_seen.get(surface, 0) + 1
        out = []
        for start, end, surface in found:
            seen = self.seen.get(surface, 0) - own_seen.get(surface, 0)
            counts = {lab: n - own_annotated.get((surface, lab), 0) for lab, n in self.annotated[surface].items()}
            label, n = max(sorted(counts.items()), key=lambda kv: kv[1])
            if n >= self.min_count and seen > 0 and n / seen >= self.min_rate:
                out.append((start, end, label, min(1.0, n / seen)))
        return out

    def to_dict(self) -> Dict:
        return {
            "annotated": {k: dict(v) for k, v in self.annotated.items()},
            "seen": dict(self.seen),
            "min_count": self.min_count,
            "min_rate": self.min_rate,
        }

    @classmethod
    def from_dict(cls, data: Dict) -> "Lexicon":
        return cls(data["annotated"], data["seen"], int(data["min_count"]), float(data["min_rate"]))


def own_entities(text: str, spans: Gold) -> List[Tuple[str, str]]:
    """(label, surface) of a doc's entities that are words: no space at either end, a word character within."""
    return [(label, text[s:e]) for s, e, label in spans if text[s:e] == text[s:e].strip() and WORD.search(text[s:e])]


def merge(found: Dict[Tuple[int, int], Candidate], matches: Sequence[Tuple[int, int, str, float]]) -> None:
    """The lexicon's matches into one text's candidates (by offsets): a match with a candidate's boundaries
    relabels it; one that overlaps no labelled candidate is added; one that overlaps another is left out."""
    for s, e, label, rate in matches:
        if (s, e) in found:
            c = found[(s, e)]
            c.label, c.confidence, c.from_lexicon = label, rate, True
        elif not any(cs < e and s < ce for (cs, ce), c in found.items() if c.label is not None):
            found[(s, e)] = Candidate(s, e, label=label, confidence=rate, from_lexicon=True)


def kept(label: str, confidence: Optional[float], from_lexicon: bool, thresholds: Mapping[str, float], default: float):
    """Whether a span stays: lexicon spans and spans without a confidence always; others at their label's
    threshold (``default`` for a label without one)."""
    return from_lexicon or confidence is None or confidence >= thresholds.get(label, default)


def micro_prf(
    predicted: Sequence[Sequence[Scored]], gold: Sequence[Gold], thresholds: Mapping[str, float], default: float = 0.0
) -> Tuple[float, float, float]:
    """Micro precision, recall and F1 (fractions) of the spans ``kept`` under ``thresholds``."""
    return _prf(predicted, [set(map(tuple, truth)) for truth in gold], thresholds, default)


def _prf(predicted, gold: Sequence[set], thresholds: Mapping[str, float], default: float = 0.0):
    """``micro_prf`` of gold already made sets of (start, end, label)."""
    tp = fp = fn = 0
    for spans, truth in zip(predicted, gold):
        found = {(s, e, lab) for s, e, lab, c, lex in spans if kept(lab, c, lex, thresholds, default)}
        tp, fp, fn = tp + len(found & truth), fp + len(found - truth), fn + len(truth - found)
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def fit_thresholds(
    predicted: Sequence[Sequence[Scored]], gold: Sequence[Gold], labels: Sequence[str], passes: int = 4
) -> Dict[str, float]:
    """Per label, the threshold that maximises the micro F1 of ``predicted`` against ``gold`` given the others'
    (coordinate ascent from 0 for every label, the lowest of equal choices kept)."""
    thresholds = {label: 0.0 for label in labels}
    options = {}  # per label: the midpoints between its spans' confidences, and 1.0
    for label in labels:
        values = sorted({c for spans in predicted for _, _, lab, c, lex in spans if lab == label and c is not None})
        options[label] = [(a + b) / 2 for a, b in zip(values, values[1:])] + [1.0]
    gold = [set(map(tuple, truth)) for truth in gold]  # once, not per trial
    best = _prf(predicted, gold, thresholds)[2]
    for _ in range(passes):
        changed = False
        for label in labels:
            for t in options[label]:
                trial = {**thresholds, label: t}
                f1 = _prf(predicted, gold, trial)[2]
                if f1 > best + 1e-9:
                    best, thresholds, changed = f1, trial, True
        if not changed:
            break
    return thresholds


@dataclass(frozen=True)
class PoolFit:
    """What was fitted: thresholds per label (absent: the component's ``threshold``), the lexicon, and the pool
    figures that chose them (micro P / R / F1 of the fitted docs before and after)."""

    thresholds: Mapping[str, float]
    lexicon: Optional[Lexicon]
    report: Mapping[str, float]

    def to_dict(self) -> Dict:
        return {
            "thresholds": dict(self.thresholds),
            "lexicon": self.lexicon.to_dict() if self.lexicon is not None else None,
            "report": dict(self.report),
        }

    @classmethod
    def from_dict(cls, data: Dict) -> "PoolFit":
        if not isinstance(data, dict) or not {"thresholds", "lexicon", "report"} <= set(data):
            raise ValueError("not a pool fit: expected thresholds, lexicon and report")
        lexicon = Lexicon.from_dict(data["lexicon"]) if data["lexicon"] is not None else None
        thresholds = {str(k): float(v) for k, v in data["thresholds"].items()}
        if not all(0.0 <= v <= 1.0 for v in thresholds.values()):
            raise ValueError(f"thresholds must lie in [0, 1], not {thresholds}")
        return cls(thresholds, lexicon, dict(data["report"]))

    def to_bytes(self) -> bytes:
        return srsly.json_dumps(self.to_dict()).encode("utf8")

    @classmethod
    def from_bytes(cls, data: bytes) -> "PoolFit":
        return cls.from_dict(srsly.json_loads(data))

    def to_disk(self, path) -> None:
        srsly.write_json(path, self.to_dict())
