"""Target labels (``scheme.LabelSet``: names, definitions, synonyms as a prompt shows and an answer resolves them)
and the source → target label alignment of LAR (``alignment.LabelAlignment``)."""

from .scheme import LabelSet

__all__ = ["LabelSet"]
