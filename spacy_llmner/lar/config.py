"""The LAR / EL4NER stages' settings (``spacy_llmner.LAR.v1``) and the candidate spans they pass along."""

from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Sequence, Tuple

from spacy.util import registry

PROPOSERS = ("generate", "extract", "source")
Proposer = Literal["generate", "extract", "source"]
Typer = Literal["llm", "knn", "llm+knn"]


@dataclass
class Candidate:
    start: int  # character offsets in the chunk's text
    end: int
    label: Optional[str] = None  # a target label, when a proposer gave one
    source_label: Optional[str] = None
    score: float = 0.0  # typing: log-probability margin over the runner-up (inf: only one option)
    p_yes: Optional[float] = None
    confidence: Optional[float] = None  # generated: the answer tokens' geometric-mean probability
    from_lexicon: bool = False  # the pool's lexicon stated it (confidence: its rate); kept whatever the threshold


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
        bad = [p for p in self.proposers if p not in PROPOSERS]  # also for LARStages built in Python
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
        spans = doc.ents if self.source == "ents" else doc.spans.get(self.source[len("spans:") :], [])
        return [(s.start_char, s.end_char, s.label_) for s in spans]


@registry.misc("spacy_llmner.LAR.v1")
def make_lar(
    proposers: List[Proposer] = ["source"],  # noqa: B006  (config default)
    source: str = "ents",
    retype: bool = True,
    top_k: int = 3,
    keep_margin: float = 0.0,
    verify: bool = False,
    verify_threshold: float = 0.5,
    alignment: Optional[Dict[str, Dict[str, float]]] = None,
    embedding_weight: float = 0.3,
    calibrate: bool = True,
    typer: Typer = "llm",
    knn_weight: float = 1.0,
) -> LARStages:
    """The LAR / EL4NER stages of an ``llm_lar_ner`` component (its ``lar`` setting; null: one pass).

    proposers (List[str]): where candidate spans come from, unioned: "generate" (the one-pass answer, spans with
        labels), "extract" (the one-pass prompt with one type, ``entity``: spans only), "source" (a source NER's
        spans, with source labels).
    source (str): where source spans are read: "ents" (earlier components' ``doc.ents``) or "spans:<key>".
    retype (bool): also type the spans that came with a target label ("generate").
    top_k (int): aligned target labels offered per source label.
    keep_margin (float): a source span keeps its best-aligned label unless the model prefers another by more than
        this many nats.
    verify (bool): ask "Is <span> a <label>?" of every typed span and drop those below ``verify_threshold``.
    verify_threshold (float): the calibrated P(yes) a span needs to be kept.
    alignment (Optional[Dict[str, Dict[str, float]]]): pinned source → target rows over the learned alignment.
    embedding_weight (float): weight of label-embedding similarity in the learned alignment (co-occurrence counts
        get the rest).
    calibrate (bool): take typing and verification scores relative to the same question about a content-free span.
    typer (str): who picks a span's label: "llm" (calibrated scores), "knn" (the nearest gold spans of the span
        memory, no LLM call) or "llm+knn" (both, added).
    knn_weight (float): in "llm+knn", the weight of log P_knn(label) added to the LLM's score.
    """
    return LARStages(
        tuple(proposers),
        source,
        retype,
        top_k,
        keep_margin,
        verify,
        verify_threshold,
        alignment,
        embedding_weight,
        calibrate,
        typer,
        knn_weight,
    )
