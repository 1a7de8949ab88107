"""Constrained choices: the log-probability of each option (scoring backends) or a grammar-restricted generation,
the best option and its margin, calibrated P(yes), and the batch of choices a stage asks with its content-free
priors (the one calibration helper of the typing and verification stages)."""

import math
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

from ..formats import gbnf
from ..ty import Backend, GenerationRequest, ScoreRequest


def choose(backend: Backend, requests: Sequence[ScoreRequest]) -> Tuple[List[List[float]], int, int]:
    """Log-probabilities per option (scoring backends), or a one-hot from a grammar-restricted generation.
    Returns the scores, tokens evaluated and calls made."""
    if not requests:
        return [], 0, 0
    if backend.supports_scoring:
        scores = backend.score(requests)
        return [s.logprobs for s in scores], sum(s.prompt_tokens for s in scores), sum(not s.cached for s in scores)
    gens = backend.generate(
        [
            GenerationRequest(
                r.context,
                max_tokens=16,
                stop=("\n",) if not any("\n" in o[:-1] for o in r.options) else (),
                grammar="root ::= " + gbnf.alternatives(r.options),
            )
            for r in requests
        ]
    )
    out = []
    for r, g in zip(requests, gens):
        text = g.text.strip()
        out.append([0.0 if o.strip() == text else -math.inf for o in r.options])
    return out, sum(g.prompt_tokens + g.completion_tokens for g in gens), sum(not g.cached for g in gens)


def best(scores: Sequence[float]) -> Tuple[int, float]:
    """Index of the best option and its margin over the runner-up."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if len(order) == 1:
        return order[0], math.inf
    top, second = scores[order[0]], scores[order[1]]
    return order[0], (top - second) if math.isfinite(top) else 0.0


def p_yes(scores: Sequence[float], prior: Optional[Sequence[float]] = None) -> float:
    """P(yes) from (yes, no) log-probabilities; with ``prior`` (the content-free answer) calibrated: the odds
    are divided by the prior odds, so a model that says yes to anything gets 0.5 for a span it treats alike."""
    yes, no = scores
    if not math.isfinite(yes) or not math.isfinite(no):
        return 1.0 if math.isfinite(yes) else 0.0
    logit = yes - no
    if prior is not None and all(math.isfinite(x) for x in prior):
        logit -= prior[0] - prior[1]
    return 1.0 / (1.0 + math.exp(-logit))


class ChoiceBatch:
    """The constrained choices one stage asks of the backend in one call: each question with the doc it is for,
    and the content-free questions it is calibrated against, each asked once per ``key`` right before the first
    question that needs it (so the order of requests is the order they were added)."""

    def __init__(self):
        self.requests: List[ScoreRequest] = []
        self.owners: List[int] = []  # the doc each request is for
        self.priors: Dict[Hashable, int] = {}

    def ask(self, owner: int, request: ScoreRequest) -> int:
        self.requests.append(request)
        self.owners.append(owner)
        return len(self.requests) - 1

    def prior(self, key: Hashable, owner: int, request: ScoreRequest) -> int:
        """The index of the content-free question ``key`` (asked now if not yet asked)."""
        if key not in self.priors:
            self.priors[key] = self.ask(owner, request)
        return self.priors[key]
