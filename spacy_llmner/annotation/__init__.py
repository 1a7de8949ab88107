"""LLM-assisted annotation (arXiv 2404.01334): an LLM pipeline repairs human labels (``refine``: proposed additions
and conflicts, merge policies, a review page), and label mixing combines human and LLM labels where they disagree
(``mix`` + the ``spacy_llmner.LabelMixing.v1`` corpus reader) for training a fast spaCy student.

    spacy-llmner refine my_pipeline human.spacy refined.spacy --policy add-llm-above-threshold --threshold 0.5
    spacy-llmner mix refined.spacy mixed.spacy --llm-weight 0.5
"""

from .mixing import MixSettings, label_counts, mix_docs, mixing_reader
from .refine import POLICIES, Proposal, compare, merge, refine_docs
from .review import review_page

__all__ = [
    "POLICIES",
    "MixSettings",
    "Proposal",
    "compare",
    "label_counts",
    "merge",
    "mix_docs",
    "mixing_reader",
    "refine_docs",
    "review_page",
]
