"""Chunking: the pieces of a doc that are sent to the model one at a time. By default one sentence each (the
pipeline's sentence boundaries where it sets them, else spaCy's rule-based sentencizer): a model tuned on single
sentences stops early on a paragraph, so a document must get what its sentences would. Up to ``max_sentences``
whole sentences may be packed into one prompt (null: as many as fit), never more than ``max_tokens``; a longer
sentence is cut at the limit. Nothing is truncated: every token is in exactly one chunk, and a chunk knows the text
the prompt shows for it (offsets into that text are offsets into the chunk)."""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from spacy.tokens import Doc, Span

from .prompt import CONTROL, display


@dataclass(frozen=True)
class Chunk:
    doc_index: int  # which doc of the batch
    span: Span
    shown: str  # the chunk's text as the prompt shows it (same character offsets)

    def char_range(self, start: int, end: int) -> Tuple[int, int]:
        """Doc character offsets of a chunk-relative range."""
        return self.span.start_char + start, self.span.start_char + end


def sentences(doc: Doc) -> List[Tuple[int, int]]:
    """Token ranges of the doc's sentences: the pipeline's boundaries where it sets them, else the sentencizer's."""
    if doc.has_annotation("SENT_START"):
        return [(s.start, s.end) for s in doc.sents]
    from spacy.pipeline import Sentencizer

    starts = [i for i, tag in enumerate(Sentencizer().predict([doc])[0]) if tag or i == 0]
    return list(zip(starts, starts[1:] + [len(doc)]))


def chunk_ranges(doc: Doc, max_tokens: int, max_sentences: Optional[int] = 1) -> List[Tuple[int, int]]:
    """Token ranges covering ``doc``: up to ``max_sentences`` sentences (None: any number) and ``max_tokens``
    tokens each, longer sentences cut."""
    n = len(doc)
    if not n:
        return []
    if max_sentences is None and n <= max_tokens:
        return [(0, n)]
    pieces = []  # sentences, each cut at max_tokens
    for start, end in sentences(doc):
        for s in range(start, end, max_tokens):
            pieces.append((s, min(end, s + max_tokens)))
    out: List[Tuple[int, int]] = []
    held: List[int] = []  # sentences in each chunk of out
    for start, end in pieces:
        if out and end - out[-1][0] <= max_tokens and (max_sentences is None or held[-1] < max_sentences):
            out[-1] = (out[-1][0], end)
            held[-1] += 1
        else:
            out.append((start, end))
            held.append(1)
    return out


def split(docs: Sequence[Doc], max_tokens: int, max_sentences: Optional[int] = 1) -> List[Chunk]:
    """Every doc's chunks in order, without leading whitespace tokens, blank ones (whitespace only) left out:
    they hold no entity."""
    out = []
    for i, doc in enumerate(docs):
        for start, end in chunk_ranges(doc, max_tokens, max_sentences):
            while start < end and doc[start].is_space:  # the whitespace between sentences: not shown
                start += 1
            span = doc[start:end]
            if span.text.strip():
                out.append(Chunk(i, span, display(span.text).rstrip()))
    return out


def doc_spans(
    doc: Doc, chunks: Sequence[Chunk], candidates: Sequence[Dict], doc_index: int, alignment_mode: str
) -> List[Tuple[Span, object]]:
    """The labelled candidates of doc ``doc_index``'s chunks (``candidates[j]``: chunk j's, by key) as doc spans
    snapped to tokens by ``alignment_mode``, each with the candidate it came from; the last of equal spans wins.
    No span holds a control character: the model saw a space there (``prompt.display``), so a span snapped onto a
    token holding one is contracted to the tokens within the answer, or dropped when that leaves none clean."""
    found = {}
    for chunk, cands in zip(chunks, candidates):
        if chunk.doc_index != doc_index:
            continue
        for c in cands.values():
            if c.label is None:
                continue
            start, end = chunk.char_range(c.start, c.end)
            span = doc.char_span(start, end, label=c.label, alignment_mode=alignment_mode)
            if span is not None and CONTROL.search(span.text):
                span = doc.char_span(start, end, label=c.label, alignment_mode="contract")
                span = None if span is None or CONTROL.search(span.text) else span
            if span is not None and len(span):
                found[(span.start, span.end, span.label_)] = (span, c)
    return list(found.values())
