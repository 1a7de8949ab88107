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

Every stage calls the component's backend (same cache, same accounting). Modules: ``config`` (settings,
candidates), ``prompts``, ``choice`` (constrained choices, calibration), ``stages`` (typing, verification,
alignment learning), ``memory`` (the span memory for kNN typing).
"""

from .choice import ChoiceBatch, best, choose, p_yes
from .config import PROPOSERS, Candidate, LARStages, make_lar
from .memory import SpanMemory
from .prompts import (
    CONTENT_FREE,
    VERIFY_OPTIONS,
    typing_context,
    typing_options,
    verification_context,
    verification_examples,
)

__all__ = [
    "CONTENT_FREE",
    "PROPOSERS",
    "VERIFY_OPTIONS",
    "Candidate",
    "ChoiceBatch",
    "LARStages",
    "SpanMemory",
    "best",
    "choose",
    "make_lar",
    "p_yes",
    "typing_context",
    "typing_options",
    "verification_context",
    "verification_examples",
]
