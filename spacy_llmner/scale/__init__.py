"""Annotating corpora at scale: input shards (txt / jsonl / DocBin) → a saved pipeline → DocBin + jsonl shards and
a manifest, exactly once per input shard. Engines: ``local`` (this process, ``nlp.pipe``) and ``ray`` (a Ray Data
actor pool: ``spacy.load`` once per actor; ``pip install spacy-llmner[ray]``). Nothing here imports ray unless the
ray engine runs.

    spacy-llmner annotate corpus/ --pipeline my_pipeline --output out/ --engine ray --concurrency 2
"""

from .run import annotate_corpus
from .shards import Shard, list_shards, read_texts

__all__ = ["Shard", "annotate_corpus", "list_shards", "read_texts"]
