"""The one place that turns the mentions an answer states into verified character offsets in the source text.

Every returned ``(start, end, label)`` satisfies ``source[start:end] == mention.text``: a mention whose text is not
in the source is a hallucination, dropped and counted. Inline mentions are placed on the occurrence they mark
(the answer's plain text is aligned to the source); list mentions mark every whole-word occurrence.
"""

import math
import re
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from typing import List, Optional, Sequence, Tuple

from ..labels import LabelSet
from ..ty import Mention, OutputFormat
from ..usage import Usage


@dataclass
class Located:
    spans: List[Tuple[int, int, str]] = field(default_factory=list)
    hallucinated: List[Mention] = field(default_factory=list)
    mentions: List[Mention] = field(default_factory=list)  # the mention each span came from


def confidence(token_logprobs: Sequence[Tuple[int, float]], answer_range: Optional[Tuple[int, int]]) -> Optional[float]:
    """The geometric-mean probability of the tokens that wrote ``answer_range`` of the answer (the whole answer
    when None): ``exp(mean log p)``. None without log-probabilities."""
    lps, prev = [], 0
    for end, lp in token_logprobs:
        if answer_range is None or (end > answer_range[0] and prev < answer_range[1]):
            lps.append(lp)
        prev = end
    return math.exp(sum(lps) / len(lps)) if lps else None


def _occurrences(source: str, text: str) -> List[int]:
    """Starts of ``text`` in ``source`` that do not cut a word (an alphanumeric run) at either edge."""
    starts = []
    for m in re.finditer(re.escape(text), source):
        s, e = m.start(), m.end()
        if text[0].isalnum() and s > 0 and source[s - 1].isalnum():
            continue
        if text[-1].isalnum() and e < len(source) and source[e].isalnum():
            continue
        starts.append(s)
    return starts


class _AnswerToSource:
    """Maps character offsets of an inline answer's plain text onto the source text."""

    def __init__(self, plain: str, source: str):
        self.identity = plain == source
        self.blocks = (
            [] if self.identity else SequenceMatcher(None, plain, source, autojunk=False).get_matching_blocks()
        )

    def __call__(self, pos: int) -> Optional[int]:
        if self.identity:
            return pos
        for a, b, size in self.blocks:
            if a <= pos < a + size:
                return b + pos - a
        return None


def locate(mentions: Sequence[Mention], source: str, plain_text: Optional[str] = None) -> Located:
    out = Located()
    seen = set()
    mapper = _AnswerToSource(plain_text, source) if plain_text is not None else None
    for mention in mentions:
        text = mention.text
        if not text:
            continue
        starts: List[int] = []
        if mapper is not None and mention.answer_start is not None:
            mapped = mapper(mention.answer_start)
            if mapped is not None and source[mapped : mapped + len(text)] == text:
                starts = [mapped]
            else:
                # The copy drifted: take the occurrence closest to where the answer put the mention.
                found = [m.start() for m in re.finditer(re.escape(text), source)]
                if found:
                    want = mention.answer_start * len(source) / max(len(plain_text or ""), 1)
                    starts = [min(found, key=lambda s: abs(s - want))]
        else:
            starts = _occurrences(source, text)
        if not starts:
            out.hallucinated.append(mention)
            continue
        for s in starts:
            key = (s, s + len(text), mention.label)
            if key not in seen:
                seen.add(key)
                out.spans.append(key)
                out.mentions.append(mention)
    return out


def answer_spans(
    fmt: OutputFormat,
    answer: str,
    shown: str,
    labels: LabelSet,
    usage: Usage,
    extract: bool = False,
    token_logprobs: Sequence[Tuple[int, float]] = (),
) -> List[Tuple[int, int, Optional[str], Optional[float]]]:
    """(start, end, label, confidence) in ``shown`` (the text the prompt showed) for each verified mention of
    ``answer``; label None when ``extract`` (spans only); confidence from the answer's ``token_logprobs`` (see
    ``confidence``: the mention's own line where the format places it, else the whole answer), None without them.
    Malformed fragments, hallucinated mentions and unknown labels are dropped and counted in ``usage``."""
    parsed = fmt.parse(answer)
    usage.malformed += parsed.malformed
    located = locate(parsed.mentions, shown, parsed.plain_text)
    usage.hallucinated += len(located.hallucinated)
    out = []
    for (start, end, answer_label), mention in zip(located.spans, located.mentions):
        label = None if extract else labels.resolve(answer_label)
        if label is None and not extract:
            usage.unknown_labels += 1
            continue
        out.append((start, end, label, confidence(token_logprobs, mention.answer_range)))
    return out
