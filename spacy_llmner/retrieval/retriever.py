"""Per-sentence demonstration retrieval: which pool sentences a small LLM sees before each query.

Strategies (``strategy``):
- ``word`` (IF-WRANER): every query word piece is matched to its most similar word piece in a pool sentence
  (cosine of contextual MiniLM embeddings); the sentence scores the IDF-weighted mean of those best matches.
  A mean of best matches (BERTScore-recall style) rewards a pool sentence for covering *each* query word, and
  IDF weighting makes sharing a rare word (usually part of an entity) count for more than sharing "the".
- ``span`` (EL4NER): candidate entity spans of the query (capitalised or numeric token runs; in text without
  capitals — queries, chat, ASR — runs of content words and the words in them) against the pool's gold entity
  spans, mean of best matches, mixed with sentence similarity (``span_weight``).
- ``sentence``: cosine of MiniLM sentence embeddings (GPT-NER's kNN baseline); ``bm25`` (bm25s); ``random``
  (seeded per query, so reruns agree).
On a pool larger than ``candidates``, ``word`` and ``span`` re-rank the union of the sentence and BM25 top
``candidates`` (blocked numpy, no Python loop over the pool).

Selection: top ``k`` by relevance, optionally trading relevance for diversity (``mmr``: weight of redundancy
with already chosen demonstrations) and preferring demonstrations that show a not-yet-shown label
(``label_coverage``). ``retrieve`` returns demonstrations in prompt order: the most similar last, closest to
the query.
"""

import zlib
from pathlib import Path
from typing import List, Literal, Optional, Sequence, Union

import numpy as np

from ..prompt import Demonstration
from .encoder import MiniLMEncoder
from .pool import Pool

STRATEGIES = ("word", "span", "sentence", "bm25", "random")  # the Strategy literal below, for iteration


def candidate_spans(text: str, limit: int = 24) -> List[str]:
    """A parser-free guess at where a sentence's entities are: runs of capitalised or numeric words; in text with
    no capital letter at all, runs of content words (not English stop words) and, for longer runs, each of their
    words (an attribute such as "cheap" or "5 star" is then a candidate too), each once, at most ``limit``."""
    caseless = not any(c.isupper() for c in text)
    if caseless:
        from spacy.lang.en.stop_words import STOP_WORDS

        def keep(core):
            return core.lower() not in STOP_WORDS
    else:

        def keep(core):
            return core[0].isupper() or core[0].isdigit()

    out, run = [], []
    for w in text.split() + [""]:
        core = w.strip(".,;:!?()[]\"'")
        if core and keep(core):
            run.append(core)
        else:
            if run:
                out.append(" ".join(run))
                if caseless and len(run) > 1:
                    out.extend(run)
            run = []
    return list(dict.fromkeys(out))[:limit] if caseless else out


def same_text(text: str) -> str:
    """The text as ``exclude_identical`` compares it: words only, so a pool doc read with a trailing space or
    newline (BIO and .spacy files) is the same text as the query its prompt shows."""
    return " ".join(text.split())


def _segment_max(sims: np.ndarray, offsets: np.ndarray, empty: float = 0.0) -> np.ndarray:
    """Row-wise max of ``sims`` [m, T] within each column segment ``offsets`` [C + 1] -> [m, C]."""
    sizes = np.diff(offsets)
    out = np.full((sims.shape[0], len(sizes)), empty, dtype=np.float32)
    nonempty = sizes > 0
    if nonempty.any() and sims.shape[1]:
        starts = offsets[:-1][nonempty]
        out[:, nonempty] = np.maximum.reduceat(sims, starts, axis=1)
    return out


Strategy = Literal["word", "span", "sentence", "bm25", "random"]


class Retriever:
    """Registered as ``spacy_llmner.Retriever.v1`` (a component's ``retriever``); the pool is built by the
    component's ``initialize()`` and saved with it.

    strategy (str): "word" (IF-WRANER), "span" (EL4NER), "sentence", "bm25" or "random" (see the module docstring).
    k (int): demonstrations per query.
    candidates (int): on a larger pool, "word" and "span" re-rank the union of the sentence and BM25 top candidates.
    mmr (float): weight of redundancy with already chosen demonstrations (0: relevance only).
    label_coverage (bool): prefer demonstrations that show a label not yet shown.
    span_weight (float): "span": weight of span similarity against sentence similarity.
    seed (int): seeds "random" (per query, so reruns agree).
    exclude_identical (bool): never show a demonstration whose text is the query's own, whitespace aside (set it
        when annotating the pool's own docs, e.g. ``spacy-llmner refine`` over the human labels the pool holds: the
        answer would be copied, omissions included).
    """

    def __init__(
        self,
        strategy: Strategy = "word",
        k: int = 8,
        candidates: int = 200,
        mmr: float = 0.0,
        label_coverage: bool = False,
        span_weight: float = 0.5,
        seed: int = 0,
        exclude_identical: bool = False,
    ):
        if k < 0:
            raise ValueError("Retriever: k must be >= 0")
        self.strategy = strategy
        self.k = k
        self.candidates = candidates
        self.mmr = mmr
        self.label_coverage = label_coverage
        self.span_weight = span_weight
        self.seed = seed
        self.exclude_identical = exclude_identical
        self.encoder = MiniLMEncoder()
        self.pool: Optional[Pool] = None
        self._bm25 = None
        self._compared: Optional[List[str]] = None

    # -- pool ---------------------------------------------------------------------------------------------------
    def build(self, demonstrations: Sequence[Demonstration]) -> None:
        self.use_pool(Pool.build(demonstrations, self.encoder))

    def use_pool(self, pool: Optional[Pool]) -> None:
        self.pool = pool
        self._bm25 = None
        self._compared = None

    def _compared_texts(self) -> List[str]:
        """The pool's texts as ``exclude_identical`` compares them (once per pool)."""
        if self._compared is None:
            self._compared = [same_text(d.text) for d in self.pool.demonstrations]
        return self._compared

    def to_disk(self, path: Union[str, Path]) -> None:
        if self.pool is not None:
            self.pool.to_disk(path)

    def from_disk(self, path: Union[str, Path], owner: str = "retriever") -> None:
        if (Path(path) / "sentence.npy").exists():
            self.use_pool(Pool.from_disk(path, owner))

    def _bm25_scores(self, texts: Sequence[str]) -> np.ndarray:
        import bm25s

        if self._bm25 is None:  # rebuilt from the pool's texts on first use (seconds for 100k sentences)
            tokens = bm25s.tokenize(
                [d.text for d in self.pool.demonstrations], stopwords="en", return_ids=False, show_progress=False
            )
            self._bm25 = bm25s.BM25()
            self._bm25.index(tokens, show_progress=False)
        vocab = self._bm25.vocab_dict
        out = np.zeros((len(texts), len(self.pool)), dtype=np.float32)
        for i, toks in enumerate(bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)):
            known = [t for t in toks if t in vocab]
            if known:
                out[i] = self._bm25.get_scores(known)
        return out

    # -- scoring ------------------------------------------------------------------------------------------------
    def _shortlist(self, sent_sims: np.ndarray, bm25: Optional[np.ndarray]) -> np.ndarray:
        n = len(sent_sims)
        if n <= self.candidates:
            return np.arange(n)
        picks = [np.argpartition(-sent_sims, self.candidates)[: self.candidates]]
        if bm25 is not None:
            picks.append(np.argpartition(-bm25, self.candidates)[: self.candidates])
        return np.unique(np.concatenate(picks))

    def scores(self, texts: Sequence[str]) -> List[tuple]:
        """Per query: (pool indices considered, their relevance)."""
        pool = self.pool
        n = len(pool)
        if self.strategy == "random":
            out = []
            for t in texts:
                rng = np.random.default_rng(self.seed + zlib.crc32(t.encode("utf8")))
                out.append((np.arange(n), rng.random(n).astype(np.float32)))
            return out
        if self.strategy == "bm25":
            return [(np.arange(n), s) for s in self._bm25_scores(texts)]
        if self.strategy == "sentence":
            q = self.encoder.sentences(texts)
            return [(np.arange(n), s) for s in q @ pool.sentence.T]
        q_sent, q_pieces, q_ids = self.encoder.pieces(texts)
        sent_sims = q_sent @ pool.sentence.T
        bm25 = self._bm25_scores(texts) if n > self.candidates else None
        if self.strategy == "span":  # every text's candidate spans in one encoder call
            spans = [candidate_spans(t) if len(pool.spans) else [] for t in texts]
            flat = [s for per in spans for s in per]
            encoded = self.encoder.sentences(flat) if flat else None
            bounds = np.cumsum([0] + [len(per) for per in spans])
        out = []
        for i in range(len(texts)):
            cand = self._shortlist(sent_sims[i], None if bm25 is None else bm25[i])
            if self.strategy == "word":
                out.append((cand, self._word_scores(q_pieces[i], q_ids[i], cand)))
            else:
                q = encoded[bounds[i] : bounds[i + 1]] if bounds[i + 1] > bounds[i] else None
                out.append((cand, self._span_scores(q, sent_sims[i], cand)))
        return out

    def _word_scores(self, q: np.ndarray, ids: np.ndarray, cand: np.ndarray) -> np.ndarray:
        pool = self.pool
        if not len(q):
            return np.zeros(len(cand), np.float32)
        starts, ends = pool.piece_offsets[cand], pool.piece_offsets[cand + 1]
        pieces = np.concatenate([pool.pieces[s:e] for s, e in zip(starts, ends)]).astype(np.float32)
        offsets = np.concatenate([[0], np.cumsum(ends - starts)])
        best = _segment_max(q @ pieces.T, offsets)  # [m, C]
        weights = pool.idf_of(ids)
        return (weights @ best) / weights.sum()

    def _span_scores(self, q: Optional[np.ndarray], sent_sims: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Relevance of the shortlisted pool sentences to a query whose candidate spans encode to ``q``."""
        pool = self.pool
        span_part = np.zeros(len(cand), np.float32)
        if q is not None:
            best = _segment_max(q @ pool.spans.T, pool.span_offsets)  # [qs, N]
            span_part = best[:, cand].mean(axis=0)
        return self.span_weight * span_part + (1 - self.span_weight) * sent_sims[cand]

    # -- selection ----------------------------------------------------------------------------------------------
    def select(self, cand: np.ndarray, rel: np.ndarray, k: Optional[int] = None) -> List[int]:
        """The ``k`` (default: the configured k) pool indices to show, best first."""
        k = self.k if k is None else k
        if k == 0 or not len(cand):
            return []
        order = np.argsort(-rel, kind="stable")
        if not self.mmr and not self.label_coverage:
            return [int(cand[j]) for j in order[:k]]
        top = order[: k * 5]
        idx, r = cand[top], rel[top]
        r = (r - r.min()) / (r.max() - r.min() + 1e-9)
        sent = self.pool.sentence[idx]
        chosen: List[int] = []
        shown: set = set()
        while len(chosen) < min(k, len(idx)):
            value = (1 - self.mmr) * r
            if chosen and self.mmr:
                value = value - self.mmr * (sent @ sent[chosen].T).max(axis=1)
            if self.label_coverage:
                value = value + np.array([0.5 if set(self.pool.labels_of(int(i))) - shown else 0.0 for i in idx])
            value[chosen] = -np.inf
            j = int(np.argmax(value))
            chosen.append(j)
            shown.update(self.pool.labels_of(int(idx[j])))
        return [int(idx[j]) for j in chosen]

    def retrieve(self, texts: Sequence[str], k: Optional[int] = None) -> List[List[Demonstration]]:
        """``k`` (default: the configured k) demonstrations for each text, in prompt order (most similar last)."""
        if self.pool is None or not len(self.pool) or not texts or (self.k if k is None else k) == 0:
            return [[] for _ in texts]
        out = []
        for text, (cand, rel) in zip(texts, self.scores(texts)):
            cand, rel = np.asarray(cand), np.asarray(rel, dtype=np.float32)
            if self.exclude_identical:
                own, compared = same_text(text), self._compared_texts()
                keep = np.array([compared[int(i)] != own for i in cand], dtype=bool)
                cand, rel = cand[keep], rel[keep]
            picked = self.select(cand, rel, k)
            out.append([self.pool.demonstrations[i] for i in reversed(picked)])
        return out
