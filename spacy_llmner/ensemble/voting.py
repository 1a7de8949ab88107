"""The ensemble's vote, as pure functions on token spans (testable without any model): ``tally`` every proposed
boundary, ``vote`` to keep those with enough support (``union``: all of them, overlaps going to the earlier
member, optionally only the members a label's ``sources`` name), ``flat`` non-overlapping output, ``fit`` member
weights and threshold on a dev set, ``fit_sources`` the union's sources per label, ``prf`` strict span scores
(spaCy's ``PRFScore``)."""

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from spacy.scorer import PRFScore

TokenSpan = Tuple[int, int, str]  # token start, token end, label
WEIGHT_GRID = (0.0, 0.5, 1.0, 2.0, 3.0)
THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(20))  # support > t; 0.0 keeps the union


@dataclass
class Vote:
    start: int
    end: int
    label: str
    support: float  # share of the total member weight that proposed these boundaries
    label_share: float  # the chosen label's share of the type vote
    members: Tuple[str, ...]  # who proposed these boundaries


def tally(
    outputs: Dict[str, Sequence[TokenSpan]],
    weights: Dict[str, float],
    label_weights: Optional[Dict[str, Dict[str, float]]] = None,
) -> List[Vote]:
    """Every proposed boundary with its support and its type vote. Ties in the type vote go to the label of the
    earliest member (in ``outputs`` order) that proposed it."""
    total = sum(max(0.0, weights.get(m, 1.0)) for m in outputs)
    proposed: Dict[Tuple[int, int], Dict[str, List[str]]] = {}
    for member, spans in outputs.items():
        for start, end, label in dict.fromkeys(spans):  # a member proposing the same span twice votes once
            proposed.setdefault((start, end), {}).setdefault(label, []).append(member)
    order = {m: i for i, m in enumerate(outputs)}
    votes = []
    for (start, end), by_label in proposed.items():
        members = tuple(sorted({m for ms in by_label.values() for m in ms}, key=order.get))
        support = sum(max(0.0, weights.get(m, 1.0)) for m in members) / total if total else 0.0
        scored = {}
        for label, ms in by_label.items():
            scored[label] = sum(max(0.0, weights.get(m, 1.0)) * _accuracy(label_weights, m, label) for m in ms)
        label = max(scored, key=lambda lab: (scored[lab], -min(order[m] for m in by_label[lab])))
        mass = sum(scored.values())
        votes.append(Vote(start, end, label, support, scored[label] / mass if mass else 0.0, members))
    votes.sort(key=lambda v: (v.start, -v.end))
    return votes


@dataclass
class Ballot:
    """One doc's vote: every proposed span and whether it is kept."""

    votes: List[Vote]
    keep: List[bool]
    precedence: Tuple[str, ...] = ()  # members whose spans win overlaps, earliest first (``union``)

    def kept(self) -> List[Vote]:
        return [v for v, k in zip(self.votes, self.keep) if k]

    def spans(self) -> List[TokenSpan]:
        """The non-overlapping kept spans (``flat``), the ensemble's ``doc.ents``."""
        return [(v.start, v.end, v.label) for v in flat(self.kept(), self.precedence)]


def vote(
    outputs: Dict[str, Sequence[TokenSpan]],
    weights: Optional[Dict[str, float]] = None,
    label_weights: Optional[Dict[str, Dict[str, float]]] = None,
    threshold: float = 0.5,
) -> Ballot:
    """The ensemble's decision on one doc: ``tally`` (weights default to 1) and keep support > ``threshold``."""
    votes = tally(outputs, weights or {}, label_weights)
    return Ballot(votes, [v.support > threshold for v in votes])


Sources = Dict[str, Tuple[str, ...]]  # label → the members whose spans of that label a union keeps


def union(outputs: Dict[str, Sequence[TokenSpan]], sources: Optional[Sources] = None) -> Ballot:
    """Every member's spans kept. Where spans of different members overlap, those of the member earliest in
    ``outputs`` win; boundaries several members propose take the label of the type vote (``tally``: ties to the
    earliest member). For a member that recalls little beside one that recalls what it misses (an LLM beside a
    spaCy model trained on the same few sentences). ``sources``: for a label it names, only those members' spans
    of that label count (``fit_sources``); every other label, every member's."""
    if sources:
        outputs = {m: [s for s in spans if m in sources.get(s[2], (m,))] for m, spans in outputs.items()}
    votes = tally(outputs, {})
    return Ballot(votes, [True] * len(votes), tuple(outputs))


def fit_sources(
    outputs: Sequence[Dict[str, Sequence[TokenSpan]]],
    gold: Sequence[Sequence[TokenSpan]],
    members: Sequence[str],
    rounds: int = 2,
) -> Tuple[Sources, float, float]:
    """Per label, whose spans the ``union`` keeps: every member's (the default, left out of the result) or one
    member's alone, chosen by coordinate ascent on the micro F1 of the flat output on ``gold``, labels in order of
    their gold frequency; a label changes only where that strictly raises F1. Returns the sources, their F1 and the
    plain union's F1."""
    everyone = tuple(members)
    choices = [everyone] + [(m,) for m in members]
    counts = {label: 0 for out in outputs for spans in out.values() for *_, label in spans}
    for spans in gold:
        for *_, label in spans:
            counts[label] = counts.get(label, 0) + 1
    labels = sorted(counts, key=lambda lab: (-counts[lab], lab))

    def score(sources: Sources) -> float:
        return micro_f1([union(out, sources).spans() for out in outputs], gold)

    sources: Sources = {}
    plain = best = score(sources)
    for _ in range(rounds):
        changed = False
        for label in labels:
            for choice in choices:
                if choice == sources.get(label, everyone):
                    continue
                trial = {**sources, label: choice}
                if choice == everyone:
                    del trial[label]
                f = score(trial)
                if f > best + 1e-9:
                    sources, best, changed = trial, f, True
        if not changed:
            break
    return sources, best, plain


def _accuracy(label_weights: Optional[Dict[str, Dict[str, float]]], member: str, label: str) -> float:
    if label_weights is None:  # an unweighted vote
        return 1.0
    return label_weights.get(member, {}).get(label, 0.5)  # never seen at gold boundaries on dev: a coin flip


def _non_overlapping(items, bounds, preference):
    """Greedy: items in ``preference`` order, each kept unless it overlaps one already kept; in text order."""
    taken, used = [], set()
    for item in sorted(items, key=preference):
        start, end = bounds(item)
        if not any(t in used for t in range(start, end)):
            taken.append(item)
            used.update(range(start, end))
    return sorted(taken, key=lambda item: bounds(item))


def flat(votes: Sequence[Vote], precedence: Sequence[str] = ()) -> List[Vote]:
    """Non-overlapping spans: those of the member earliest in ``precedence`` first (none given: all alike), then the
    most supported, then longer, then earlier."""
    rank = {m: i for i, m in enumerate(precedence)}

    def first(v: Vote) -> int:
        return min((rank.get(m, len(rank)) for m in v.members), default=len(rank))

    return _non_overlapping(
        votes, lambda v: (v.start, v.end), lambda v: (first(v), -v.support, -(v.end - v.start), v.start)
    )


def prf(predicted: Sequence[Iterable[TokenSpan]], gold: Sequence[Iterable[TokenSpan]]) -> PRFScore:
    """Strict span-level precision, recall and F1 over docs (spaCy's ``PRFScore``)."""
    score = PRFScore()
    for p, g in zip(predicted, gold):
        score.score_set(set(p), set(g))
    return score


def micro_f1(predicted: Sequence[Iterable[TokenSpan]], gold: Sequence[Iterable[TokenSpan]]) -> float:
    return prf(predicted, gold).fscore


def label_accuracy(
    outputs: Sequence[Dict[str, Sequence[TokenSpan]]], gold: Sequence[Sequence[TokenSpan]]
) -> Dict[str, Dict[str, float]]:
    """Per member and label: how often a span it typed with that label, at gold boundaries, has that gold label
    (add-one smoothed, so an unseen label counts 0.5)."""
    counts: Dict[str, Dict[str, List[int]]] = {}
    for out, g in zip(outputs, gold):
        truth = {(s, e): lab for s, e, lab in g}
        for member, spans in out.items():
            for s, e, lab in spans:
                if (s, e) in truth:
                    c = counts.setdefault(member, {}).setdefault(lab, [0, 0])
                    c[0] += truth[(s, e)] == lab
                    c[1] += 1
    return {m: {lab: (ok + 1) / (n + 2) for lab, (ok, n) in by.items()} for m, by in counts.items()}


def fit(
    outputs: Sequence[Dict[str, Sequence[TokenSpan]]],
    gold: Sequence[Sequence[TokenSpan]],
    members: Sequence[str],
    rounds: int = 2,
) -> Tuple[Dict[str, float], Dict[str, Dict[str, float]], float, float]:
    """Member weights (coordinate ascent over ``WEIGHT_GRID``), label accuracies and the support threshold that
    maximise micro F1 of the flat output on ``gold``. Returns weights, label weights, threshold, dev F1."""
    label_weights = label_accuracy(outputs, gold)

    def score(weights: Dict[str, float]) -> Tuple[float, float]:
        tallies = [tally(out, weights, label_weights) for out in outputs]
        best = (-1.0, 0.5)
        for t in THRESHOLD_GRID:
            pred = [Ballot(vs, [v.support > t for v in vs]).spans() for vs in tallies]
            f = micro_f1(pred, gold)
            if f > best[0]:
                best = (f, t)
        return best

    weights = {m: 1.0 for m in members}
    f1, threshold = score(weights)
    for _ in range(rounds):
        changed = False
        for m in members:
            for w in WEIGHT_GRID:
                if w == weights[m] or (w == 0 and sum(v > 0 for v in weights.values()) == 1 and weights[m] > 0):
                    continue
                trial = {**weights, m: w}
                f, t = score(trial)
                if f > f1 + 1e-9:
                    weights, f1, threshold, changed = trial, f, t, True
        if not changed:
            break
    return weights, label_weights, threshold, f1


def flat_spans(spans: Sequence[TokenSpan]) -> List[TokenSpan]:
    """A member's own flat output: longest first, then earlier (what ``filter_spans`` gives)."""
    return _non_overlapping(set(spans), lambda x: (x[0], x[1]), lambda x: (-(x[1] - x[0]), x[0], x[2]))
