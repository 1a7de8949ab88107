"""Refining human labels with an LLM pipeline: what it proposes beyond the human labels (additions: spans the
human labels miss) and where it disagrees with them (conflicts), and how the two are merged.

Every refined doc keeps the evidence in span groups, whatever the policy, so that a review page and ``mix`` can
use it later:

- ``refine_human``: the human entities as given;
- ``refine_llm``: everything the pipeline predicted, ``attrs["scores"]`` its confidences (None: not scored);
- ``refine_additions``: predicted spans that overlap no human entity;
- ``refine_conflicts``: predicted spans that overlap a human entity with another label or other boundaries
  (``attrs["kinds"]``: "type" or "boundary"; ``attrs["human"]``: the human label(s) they contradict).

Merge policies (what ``doc.ents`` becomes; human labels always win where they exist):

- ``keep-human``: the human entities, unchanged (proposals only go to the review page);
- ``add-llm-above-threshold``: the human entities plus the additions whose confidence is at least the threshold;
- ``flag-conflicts``: as ``add-llm-above-threshold``, and the tokens of every conflict become *missing* annotation
  (neither entity nor "O"): a student learns nothing there until a person has decided.
"""

from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from spacy.tokens import Doc, Span, SpanGroup
from spacy.util import filter_spans

from ..corpora import unannotated
from ..usage import doc_usage

POLICIES = ("keep-human", "add-llm-above-threshold", "flag-conflicts")


@dataclass(frozen=True)
class Proposal:
    """One predicted span that the human labels do not contain. ``kind``: "addition", "type" or "boundary";
    ``human``: the (start, end, label) token spans of the human entities it overlaps."""

    start: int
    end: int
    label: str
    confidence: Optional[float]
    kind: str
    human: Tuple[Tuple[int, int, str], ...] = ()


def overlaps(a, b) -> bool:
    """Whether two token spans (anything with ``start`` / ``end``) share a token."""
    return a.start < b.end and b.start < a.end


def group(doc: Doc, key: str) -> SpanGroup:
    """``doc.spans[key]``, or an empty group (with empty ``attrs``) when the doc has none."""
    return doc.spans[key] if key in doc.spans else SpanGroup(doc, name=key)


def scored(spans: SpanGroup) -> List[Tuple[Span, Optional[float]]]:
    """A span group's spans with their ``attrs["scores"]`` (None each where the group carries no scores)."""
    scores = list(spans.attrs.get("scores", []))
    return list(zip(spans, scores if len(scores) == len(spans) else [None] * len(spans)))


def compare(human: Sequence[Span], predicted: Sequence[Span], scores: Sequence[Optional[float]]) -> List[Proposal]:
    """The predicted spans that are not human entities, classified against the human entities (a pure function of
    token offsets and labels)."""
    if len(scores) != len(predicted):
        raise ValueError(f"refine: {len(predicted)} predicted spans but {len(scores)} scores")
    gold = {(h.start, h.end, h.label_) for h in human}
    out = []
    for span, conf in zip(predicted, scores):
        key = (span.start, span.end, span.label_)
        if key in gold:
            continue
        over = tuple(sorted((h.start, h.end, h.label_) for h in human if overlaps(h, span)))
        if not over:
            kind = "addition"
        elif any((s, e) == (span.start, span.end) for s, e, _ in over):
            kind = "type"
        else:
            kind = "boundary"
        out.append(Proposal(span.start, span.end, span.label_, conf, kind, over))
    return out


def merge(doc: Doc, human: Sequence[Span], proposals: Sequence[Proposal], policy: str, threshold: float) -> None:
    """Sets ``doc.ents`` by ``policy`` (see the module docstring)."""
    if policy not in POLICIES:
        raise ValueError(f"refine: unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    ents = [Span(doc, h.start, h.end, label=h.label_) for h in human]
    missing: List[Span] = []
    if policy != "keep-human":
        added = [
            Span(doc, p.start, p.end, label=p.label)
            for p in proposals
            if p.kind == "addition" and (p.confidence if p.confidence is not None else 1.0) >= threshold
        ]
        ents += filter_spans(added)  # additions overlap no human entity, only (possibly) each other
    if policy == "flag-conflicts":
        for p in proposals:
            if p.kind != "addition":
                lo = min([p.start] + [s for s, _, _ in p.human])
                hi = max([p.end] + [e for _, e, _ in p.human])
                ents = [e for e in ents if not (e.start < hi and lo < e.end)]
                missing.append(Span(doc, lo, hi))
        taken = {i for e in ents for i in range(e.start, e.end)}
        missing = [m for m in filter_spans(missing) if not any(i in taken for i in range(m.start, m.end))]
    doc.set_ents(ents, missing=missing, default="outside")


def predicted_spans(doc: Doc, spans_key: Optional[str]) -> Tuple[List[Span], List[Optional[float]]]:
    """What a pipeline predicted: ``doc.spans[spans_key]`` with its ``attrs["scores"]`` when the group exists,
    else ``doc.ents`` without scores."""
    if spans_key and spans_key in doc.spans:
        pairs = scored(doc.spans[spans_key])
        return [s for s, _ in pairs], [c for _, c in pairs]
    return list(doc.ents), [None] * len(doc.ents)


def refine_docs(
    nlp,
    docs: Iterable[Doc],
    policy: str = "add-llm-above-threshold",
    threshold: float = 0.5,
    spans_key: Optional[str] = "llm_ner",
    batch_size: int = 64,
) -> Iterator[Tuple[Doc, List[Proposal], Dict[str, Dict[str, float]]]]:
    """Runs ``nlp`` over the text of each human-labelled doc and yields (refined doc, proposals, LLM usage of that
    doc). The refined doc is a copy in ``nlp.vocab`` with ``doc.ents`` merged by ``policy`` and the span groups of
    the module docstring."""
    if policy not in POLICIES:
        raise ValueError(f"refine: unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"refine: threshold is a confidence in [0, 1], not {threshold}")
    docs = list(docs)
    inputs = (unannotated(d, nlp.vocab) for d in docs)  # the human tokenization is kept
    for human_doc, pred in zip(docs, nlp.pipe(inputs, batch_size=batch_size)):
        predicted, scores = predicted_spans(pred, spans_key)
        out = unannotated(human_doc, nlp.vocab)
        human = [Span(out, e.start, e.end, label=e.label_) for e in human_doc.ents]
        proposals = compare(human, predicted, scores)
        out.spans["refine_human"] = human
        out.spans["refine_llm"] = [Span(out, s.start, s.end, label=s.label_) for s in predicted]
        out.spans["refine_llm"].attrs["scores"] = scores
        additions = [p for p in proposals if p.kind == "addition"]
        conflicts = [p for p in proposals if p.kind != "addition"]
        out.spans["refine_additions"] = [Span(out, p.start, p.end, label=p.label) for p in additions]
        out.spans["refine_additions"].attrs["scores"] = [p.confidence for p in additions]
        out.spans["refine_conflicts"] = [Span(out, p.start, p.end, label=p.label) for p in conflicts]
        out.spans["refine_conflicts"].attrs["scores"] = [p.confidence for p in conflicts]
        out.spans["refine_conflicts"].attrs["kinds"] = [p.kind for p in conflicts]
        out.spans["refine_conflicts"].attrs["human"] = [" / ".join(lab for _, _, lab in p.human) for p in conflicts]
        merge(out, human, proposals, policy, threshold)
        yield out, proposals, doc_usage(pred)
