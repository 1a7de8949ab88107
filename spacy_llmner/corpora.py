"""Readers for the data this project is measured on: CrossNER / CoNLL BIO files, jsonl with character spans
(GENIA, demonstrations), and spaCy DocBins. BIO tags go through spaCy's own IOB utilities."""

from pathlib import Path
from typing import Iterator, List, Optional, Union

import srsly
from spacy.tokens import Doc, DocBin
from spacy.training.iob_utils import biluo_tags_to_spans, iob_to_biluo
from spacy.util import filter_spans, registry
from spacy.vocab import Vocab


def _bio_sentences(path: Path) -> Iterator[List[List[str]]]:
    rows: List[List[str]] = []
    with path.open(encoding="utf8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("-DOCSTART-"):
                if rows:
                    yield rows
                rows = []
                continue
            rows.append(line.split())
    if rows:
        yield rows


def read_bio(path: Union[str, Path], vocab: Optional[Vocab] = None, limit: Optional[int] = None) -> List[Doc]:
    """``token<TAB>tag`` (CrossNER) or ``token POS chunk tag`` (CoNLL-2003) files; IOB1 or IOB2."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"BIO file not found: {path}")
    vocab = vocab or Vocab()
    docs = []
    for rows in _bio_sentences(path):
        words = [r[0] for r in rows]
        tags = [r[-1] if len(r) > 1 else "O" for r in rows]
        doc = Doc(vocab, words=words)
        doc.ents = biluo_tags_to_spans(doc, iob_to_biluo(tags))
        docs.append(doc)
        if limit and len(docs) >= limit:
            break
    return docs


def read_jsonl(path: Union[str, Path], nlp, spans_key: str = "sc", limit: Optional[int] = None) -> List[Doc]:
    """``{"text": ..., "entities"|"spans": [{"start", "end", "label"}]}`` per line. All spans (nested too) go to
    ``doc.spans[spans_key]``; the longest non-overlapping ones to ``doc.ents``."""
    docs = []
    for i, row in enumerate(srsly.read_jsonl(path)):
        entities = row.get("entities", row.get("spans", []))
        doc = _split_at(nlp.make_doc(row["text"]), {o for ent in entities for o in (ent["start"], ent["end"])})
        spans = []
        for ent in entities:
            span = doc.char_span(ent["start"], ent["end"], label=ent["label"])
            if span is None:
                raise ValueError(f"{path}: line {i + 1}: entity {ent} does not fall on the text")
            spans.append(span)
        doc.spans[spans_key] = spans
        doc.ents = filter_spans(spans)
        docs.append(doc)
        if limit and len(docs) >= limit:
            break
    return docs


def _split_at(doc: Doc, offsets) -> Doc:
    """The doc re-tokenized so that every offset is a token boundary ("NF-kappa B." → "NF-kappa B" + "."): gold
    entities keep their exact extent instead of growing to the tokenizer's tokens."""
    inside = {t.i: sorted(o for o in offsets if t.idx < o < t.idx + len(t)) for t in doc}
    if not any(inside.values()):
        return doc
    words, spaces = [], []
    for t in doc:
        cuts = [t.idx, *inside[t.i], t.idx + len(t)]
        for a, b in zip(cuts, cuts[1:]):
            words.append(doc.text[a:b])
            spaces.append(False)
        spaces[-1] = bool(t.whitespace_)
    return Doc(doc.vocab, words=words, spaces=spaces)


def unannotated(doc: Doc, vocab: Optional[Vocab] = None) -> Doc:
    """The doc's words and spaces without any annotation (in ``vocab``, default the doc's): the same tokenization,
    for a pipeline to annotate afresh or for labels to be set anew."""
    return Doc(vocab or doc.vocab, words=[t.text for t in doc], spaces=[bool(t.whitespace_) for t in doc])


def read_docbin(path: Union[str, Path], vocab: Optional[Vocab] = None) -> List[Doc]:
    return list(DocBin().from_disk(path).get_docs(vocab or Vocab()))


@registry.readers("spacy_llmner.BIOReader.v1")
def bio_reader(path: str, limit: Optional[int] = None):
    """A corpus reader for ``spacy train`` / ``spacy evaluate`` configs over CrossNER / CoNLL BIO files.

    path (str): a BIO file (one token and tag per line, sentences separated by blank lines).
    limit (Optional[int]): read at most this many sentences.
    """
    from spacy.training import Example

    def read(nlp):
        for doc in read_bio(path, nlp.vocab, limit=limit):
            yield Example(nlp.make_doc(doc.text), doc)

    return read


@registry.readers("spacy_llmner.MixedCorpus.v1")
def mixed_corpus(gold: str, silver: Optional[str] = None, silver_limit: int = 0):
    """Gold examples, then silver ones (docs an LLM pipeline annotated; ``spacy-llmner pre-annotate``): the
    training corpus of a distilled student. Both are spaCy DocBins read with spaCy's own ``Corpus``.

    gold (str): a DocBin of human-annotated docs.
    silver (Optional[str]): a DocBin of LLM-annotated docs.
    silver_limit (int): read at most this many silver docs (0: all).
    """
    from spacy.training import Corpus

    gold_corpus = Corpus(gold)
    silver_corpus = Corpus(silver, limit=silver_limit) if silver else None

    def read(nlp):
        yield from gold_corpus(nlp)
        if silver_corpus is not None:
            yield from silver_corpus(nlp)

    return read


@registry.scorers("spacy_llmner.nested_scorer.v1")
def nested_scorer(spans_key: str = "sc"):
    """Exact span + label over every span in ``doc.spans[spans_key]``, nested ones included (GENIA).

    spans_key (str): the span group scored.
    """
    from spacy.scorer import Scorer

    def score(examples, **kwargs):
        return Scorer.score_spans(
            examples,
            f"spans_{spans_key}",
            getter=lambda doc, attr: doc.spans.get(spans_key, []),
            has_annotation=lambda doc: spans_key in doc.spans,
            allow_overlap=True,
        )

    return score
