"""The ``llm_ner_ensemble`` component (EL4NER): several NER members, one span-level vote, self-validation of the
spans the members disagree on.

Members are components of the same pipeline, named in ``members`` and *disabled* there (``[nlp] disabled`` or
``nlp.disable_pipe``): the ensemble runs them itself, each on its own copy of the doc, so one member's
``doc.ents`` never hides another's. ``llm_lar_ner`` members see the entities earlier components left (a LAR
source's); other members start from a doc without entities (spaCy's ``ner`` would keep them as its own). A
member is any NER producer: an ``llm_lar_ner`` (any backend, format, demonstrations, prompt or LAR stages), a
trained spaCy ``ner`` (sourced from a packaged pipeline with ``replace_listeners`` so it carries its own
tok2vec), a ``spancat`` (its ``spans_key`` group). Being components, members keep spaCy's config
validation, sourcing and serialization, and llama.cpp members on one model file share one loaded copy.

Vote (per doc): the union of all members' spans; a boundary's *support* is the share of the total member weight
whose members proposed exactly those boundaries (any label); kept when support > ``threshold``. Its type is a
separate vote among the members that proposed it, each counting ``weight × its dev accuracy for that label``.
With ``voting = "weighted"``, ``initialize`` fits the member weights, the label accuracies and the threshold on
a dev set. With ``voting = "union"`` every member's span is kept and overlaps go to the member listed first: an
LLM beside a spaCy model trained on the same few sentences (``configs/pool_student.cfg``); given a dev set,
``initialize`` chooses per label whether every member's spans of it count or one member's alone (its
``sources``). A ``validator`` (an ``llm_lar_ner`` member) re-asks spans whose support lies within
``validate_band`` of the threshold — only those, so the cost stays bounded — with its yes/no verification prompt.

Output: non-overlapping kept spans to ``doc.ents`` (most supported first; union: the first member's), every kept span to
``doc.spans[spans_key]`` with ``attrs["scores"]`` (support) and ``attrs["label_scores"]`` (type-vote share), each
member's spans to ``doc.spans["<ensemble>:<member>"]``, and the cost per member and in total to
``doc._.llm_ner_usage``.
"""

from .component import Ensemble, make_llm_ner_ensemble
from .voting import (
    Ballot,
    Sources,
    TokenSpan,
    Vote,
    fit,
    fit_sources,
    flat,
    flat_spans,
    label_accuracy,
    micro_f1,
    prf,
    tally,
    union,
    vote,
)

__all__ = [
    "Ballot",
    "Ensemble",
    "Sources",
    "TokenSpan",
    "Vote",
    "fit",
    "fit_sources",
    "flat",
    "flat_spans",
    "label_accuracy",
    "make_llm_ner_ensemble",
    "micro_f1",
    "prf",
    "tally",
    "union",
    "vote",
]
