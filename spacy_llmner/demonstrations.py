"""Demonstrations: the solved examples a prompt shows before its query. Static ones (a file read on first use, or
given) or, with a retriever whose pool is built, chosen per query; kept within a token budget. Saved with the
pipeline (``demonstrations.jsonl``; the pool in ``pool/``)."""

from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import srsly
from spacy.tokens import Doc

from .prompt import Demonstration
from .reading import read_jsonl
from .retrieval import Retriever

Source = Union[str, Path, Sequence]


def load_demonstrations(
    source: Source, nlp_vocab=None, spans_key: Optional[str] = None, owner: str = "llm_lar_ner"
) -> List[Demonstration]:
    """Demonstrations from a jsonl file (``text`` + ``spans``/``entities``), a ``.spacy`` DocBin, a BIO file,
    or a list of Docs / dicts / Demonstrations. A Doc's spans are ``doc.spans[spans_key]`` where it has that
    group (nested entities, e.g. GENIA), else its ``doc.ents``. Errors name ``owner`` (the component), the file
    and the line."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{owner}: demonstrations file not found: {path}")
        if path.suffix in (".jsonl", ".json"):
            return read_jsonl(owner, path, Demonstration.from_dict)
        from .corpora import read_bio, read_docbin

        docs = read_docbin(path, nlp_vocab) if path.suffix == ".spacy" else read_bio(path, nlp_vocab)
        return load_demonstrations(docs, spans_key=spans_key)
    out = []
    for item in source:
        if isinstance(item, Demonstration):
            out.append(item)
        elif isinstance(item, Doc):
            spans = item.spans[spans_key] if spans_key and spans_key in item.spans else item.ents
            out.append(Demonstration(item.text, [(e.start_char, e.end_char, e.label_) for e in spans]))
        else:
            out.append(Demonstration.from_dict(item))
    return out


class Demonstrations:
    """What a component shows before each query: per-query demonstrations from ``retriever`` once its pool is
    built, else the static list; with ``max_tokens`` the least similar are dropped whole, never truncated."""

    def __init__(
        self,
        source: Optional[str],
        retriever: Optional[Retriever],
        max_tokens: Optional[int],
        vocab,
        spans_key: Optional[str],
        owner: str = "llm_lar_ner",
    ):
        self.owner = owner  # the component: named in errors
        self.source = source
        self.retriever = retriever
        self.max_tokens = max_tokens
        self.vocab = vocab
        self.spans_key = spans_key
        self._static: Optional[List[Demonstration]] = None

    @property
    def static(self) -> List[Demonstration]:
        # Read lazily: a pipeline loaded from disk carries its own copy and never touches the original file.
        if self._static is None:
            self._static = self.load(self.source) if self.source else []
        return self._static

    def load(self, source: Source) -> List[Demonstration]:
        return load_demonstrations(source, self.vocab, self.spans_key, self.owner)

    def set(self, source: Source) -> None:
        self._static = self.load(source)

    @property
    def pool(self):
        return self.retriever.pool if self.retriever is not None else None

    def shown(self) -> List[Demonstration]:
        """Every demonstration a query may see: the pool's, or the static ones."""
        return self.pool.demonstrations if self.pool is not None else self.static

    def for_texts(self, texts: Sequence[str], cost: Callable[[Demonstration], int]) -> List[List[Demonstration]]:
        """The demonstrations each text sees, in prompt order; ``cost``: a demonstration's prompt tokens."""
        if self.pool is not None:
            chosen = self.retriever.retrieve(texts)
        else:
            chosen = [self.static] * len(texts)
        if self.max_tokens is None:
            return chosen
        out = []
        for demos in chosen:
            kept, total = [], 0
            for demo in reversed(demos):  # most similar first
                c = cost(demo)
                if total + c > self.max_tokens:
                    continue
                kept.insert(0, demo)
                total += c
            out.append(kept)
        return out

    # the static list's serialization (the pool serializes itself)
    def to_disk(self, path: Path) -> None:
        srsly.write_jsonl(path, [d.to_dict() for d in self.static])

    def from_disk(self, path: Path) -> None:
        self._static = read_jsonl(self.owner, path, Demonstration.from_dict)

    def to_bytes(self) -> bytes:
        return srsly.msgpack_dumps([d.to_dict() for d in self.static])

    def from_bytes(self, data: bytes) -> None:
        self._static = [Demonstration.from_dict(d) for d in srsly.msgpack_loads(data)]
