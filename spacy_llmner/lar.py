"""LAR and EL4NER stages of ``llm_lar_ner``: propose candidate spans, type each one as a constrained choice,
verify each typed span.

- proposers (unioned): ``generate`` (the one-pass answer: spans with labels), ``extract`` (EL4NER's first step:
  the same prompt and grammar with a single type, ``entity``, so the model only finds spans), ``source`` (a
  source NER's spans, e.g. a CoNLL model earlier in the pipeline: its labels are source labels);
- typing: the LLM picks each span's label among candidates: the alignment's top-k for a source label, all labels
  otherwise. The context is the one-pass prompt (lines format) with the answer begun at the span
  (``Entities:\\nSpan |``) and each option is `` label``: the model scores the continuation it was shown in the
  demonstrations. Backends that score (llama.cpp) rank options by log-probability in one forward pass; others
  answer with a grammar-restricted generation. With ``keep_margin`` a source span keeps its aligned label when
  the model's preference is weaker than that margin (nats). Scores are calibrated against a content-free span;
- verification: "Is "span" a label?" yes/no after demonstrations turned into yes/no questions (a gold span with
  its label → yes, with another label → no); spans whose P(yes) is below ``verify_threshold`` are dropped.

Every stage calls the component's backend (same cache, same accounting).
"""

import math
import random
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from spacy.util import registry

from .formats import gbnf
from .prompt import Demonstration, display
from .ty import GenerationRequest, ScoreRequest

PROPOSERS = ("generate", "extract", "source")
# Contextual calibration (Zhao et al. 2021): tiny models prefer some labels (and "yes") whatever the span; the
# same question about a content-free span measures that prior, and scores are taken relative to it.
CONTENT_FREE = "N/A"


@dataclass
class Candidate:
    start: int  # character offsets in the chunk's text
    end: int
    label: Optional[str] = None  # a target label, when a proposer gave one
    source_label: Optional[str] = None
    score: float = 0.0  # typing: log-probability margin over the runner-up (inf: only one option)
    p_yes: Optional[float] = None


@dataclass
class LARStages:
    proposers: Sequence[str] = ("source",)
    source: str = "ents"  # "ents" (earlier components' doc.ents) or "spans:<key>"
    retype: bool = True  # type spans that came with a target label (generate) as well
    top_k: int = 3  # aligned target candidates per source label
    keep_margin: float = 0.0
    verify: bool = False
    verify_threshold: float = 0.5
    alignment: Optional[Dict[str, Dict[str, float]]] = None  # pinned rows, applied over the learned matrix
    embedding_weight: float = 0.3  # in the learned matrix; co-occurrence counts get the rest
    calibrate: bool = True  # subtract the content-free prior from typing and verification scores
    typer: str = "llm"  # llm | knn | llm+knn: who picks a span's label (knn: nearest gold spans, no LLM call)
    knn_weight: float = 1.0  # llm+knn: weight of log P_knn(label) added to the LLM's calibrated score
    verify_demos: int = 6  # yes/no examples drawn from the demonstrations
    seed: int = 0

    def __post_init__(self):
        bad = [p for p in self.proposers if p not in PROPOSERS]
        if bad or not self.proposers:
            raise ValueError(f"LAR proposers must be among {PROPOSERS}, got {list(self.proposers)}")
        if not (self.source == "ents" or self.source.startswith("spans:")):
            raise ValueError(f"LAR source must be 'ents' or 'spans:<key>', not {self.source!r}")
        if self.typer not in ("llm", "knn", "llm+knn"):
            raise ValueError(f"LAR typer must be llm, knn or llm+knn, not {self.typer!r}")
        if not 0.0 <= self.verify_threshold <= 1.0:
            raise ValueError("LAR verify_threshold must lie in [0, 1]")

    @property
    def needs_typing(self) -> bool:
        return self.retype or any(p != "generate" for p in self.proposers)

    def source_spans(self, doc) -> List[Tuple[int, int, str]]:
        """Character spans + source labels as the source left them on the doc (read before we overwrite)."""
        spans = doc.ents if self.source == "ents" else doc.spans.get(self.source[len("spans:"):], [])
        return [(s.start_char, s.end_char, s.label_) for s in spans]


@registry.misc("spacy_llmner.LAR.v1")
def make_lar(
    proposers: List[str] = ["source"],  # noqa: B006  (config default)
    source: str = "ents",
    retype: bool = True,
    top_k: int = 3,
    keep_margin: float = 0.0,
    verify: bool = False,
    verify_threshold: float = 0.5,
    alignment: Optional[Dict[str, Dict[str, float]]] = None,
    embedding_weight: float = 0.3,
    calibrate: bool = True,
    typer: str = "llm",
    knn_weight: float = 1.0,
) -> LARStages:
    return LARStages(tuple(proposers), source, retype, top_k, keep_margin, verify, verify_threshold, alignment,
                     embedding_weight, calibrate, typer, knn_weight)


# ---- prompts ------------------------------------------------------------------------------------------------
def typing_context(prompt: str, span_text: str) -> str:
    """The one-pass lines prompt with its answer begun at the span."""
    return f"{prompt}{display(span_text).strip()} |"


def typing_options(names: Sequence[str]) -> Tuple[str, ...]:
    # No trailing newline: a one-token label then needs no logits of its own (the span's row serves all such
    # labels), and full-vocabulary logits rows are what scoring costs on a 262k-token model.
    return tuple(f" {n}" for n in names)


def verification_examples(demos: Sequence[Demonstration], names: Dict[str, str], k: int, seed: int) -> str:
    """Yes/no questions from demonstrations: a gold span with its label (yes), with another label (no), and a
    word outside every entity (no)."""
    rng = random.Random(seed)
    lines: List[str] = []
    labels = list(names.values())
    for demo in reversed(demos):  # most similar last in prompt order: take those first
        spans = [(s, e, names[lab]) for s, e, lab in demo.spans if lab in names]
        if not spans or len(lines) >= k:
            continue
        s, e, name = rng.choice(spans)
        other = [n for n in labels if n != name]
        text = display(demo.text).strip()
        lines.append(f"Sentence: {text}\nIs \"{text[s:e]}\" a {name}? yes\n\n")
        if other:
            lines.append(f"Sentence: {text}\nIs \"{text[s:e]}\" a {rng.choice(other)}? no\n\n")
        # and a word outside every entity: "no" whatever the label
        inside = [(a, b) for a, b, _ in demo.spans]
        words = [m for m in re.finditer(r"[A-Za-z]{3,}", text) if not any(a <= m.start() < b for a, b in inside)]
        if words:
            lines.append(f"Sentence: {text}\nIs \"{rng.choice(words).group()}\" a {name}? no\n\n")
    return "".join(lines)


def verification_context(examples: str, text: str, span_text: str, name: str) -> str:
    return f"{examples}Sentence: {display(text).strip()}\nIs \"{display(span_text).strip()}\" a {name}?"


VERIFY_OPTIONS = (" yes", " no")


# ---- constrained choice ---------------------------------------------------------------------------------------
def choose(backend, requests: Sequence[ScoreRequest]) -> Tuple[List[List[float]], int, int]:
    """Log-probabilities per option (scoring backends), or a one-hot from a grammar-restricted generation.
    Returns the scores, tokens evaluated and calls made."""
    if not requests:
        return [], 0, 0
    if getattr(backend, "supports_scoring", False):
        scores = backend.score(requests)
        return [s.logprobs for s in scores], sum(s.prompt_tokens for s in scores), sum(not s.cached for s in scores)
    gens = backend.generate([
        GenerationRequest(r.context, max_tokens=16, stop=("\n",) if not any("\n" in o[:-1] for o in r.options)
                          else (), grammar="root ::= " + gbnf.alternatives(r.options))
        for r in requests
    ])
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


class SpanMemory:
    """The target train split's gold entity spans, embedded (MiniLM, the span text alone), for kNN typing: a
    span's label distribution is the similarity-weighted vote of its nearest gold spans (an entity seen in
    training is its own nearest neighbour). Saved with the pipeline as one .npy array + a json label list."""

    def __init__(self, vectors, labels: Sequence[str], k: int = 10, temperature: float = 0.05):
        import numpy as np

        self.vectors = np.asarray(vectors, dtype=np.float16)
        self.labels = list(labels)
        self.k = k
        self.temperature = temperature

    @classmethod
    def build(cls, demos: Sequence[Demonstration], encoder) -> "SpanMemory":
        texts = [d.text[s:e] for d in demos for s, e, _ in d.spans]
        return cls(encoder.sentences(texts), [lab for d in demos for _, _, lab in d.spans])

    def distributions(self, texts: Sequence[str], encoder) -> List[Dict[str, float]]:
        import numpy as np

        if not texts or not self.labels:
            return [{} for _ in texts]
        sims = encoder.sentences(list(texts)) @ self.vectors.astype(np.float32).T
        out = []
        for row in sims:
            top = np.argsort(-row)[: self.k]
            w = np.exp((row[top] - row[top[0]]) / self.temperature)
            dist: Dict[str, float] = {}
            for j, weight in zip(top, w):
                dist[self.labels[j]] = dist.get(self.labels[j], 0.0) + float(weight)
            total = sum(dist.values())
            out.append({lab: v / total for lab, v in dist.items()})
        return out
