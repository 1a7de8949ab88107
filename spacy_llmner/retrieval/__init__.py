"""Retrieved demonstrations: a pool of annotated sentences and the strategies that pick from it per query."""

from spacy.util import registry

from .pool import Pool
from .retriever import STRATEGIES, Retriever, candidate_spans

# {"@misc": "spacy_llmner.Retriever.v1", "strategy": "word", "k": 8}; the pool is built in initialize()
retriever = registry.misc.register("spacy_llmner.Retriever.v1", func=Retriever)

__all__ = ["Pool", "Retriever", "STRATEGIES", "candidate_spans"]
