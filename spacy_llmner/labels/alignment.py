"""Label alignment (LAR): how a source label scheme (CoNLL person/location/organisation/misc, a source model's
labels) maps onto the target labels, as an explicit matrix: source label → ranked target candidates.

Two kinds of evidence, each a row-stochastic matrix (rows: source labels, columns: target labels):
- ``from_embeddings``: cosine similarity of MiniLM sentence embeddings of "label: definition" texts, turned into
  a distribution per source label by a softmax at a low temperature (cosines of unrelated labels are all ~0.2-0.4,
  so raw cosines would say little);
- ``from_cooccurrence``: P(target | source) counted where a source prediction and a gold target span on the target
  pool have the same boundaries, add-``smoothing`` per cell. Unmatched source spans are counted separately
  (``precision``): how often the source model's span is a target entity at all.
``combine`` mixes them with weights; ``override`` pins rows from the config. The result is saved with the pipeline
(json) and printed by ``spacy-llmner alignment``.
"""

from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import srsly

# What the common source schemes' labels mean, for embedding them (labels not listed embed by their own name).
SOURCE_DEFINITIONS = {
    "PER": "person: a named person",
    "person": "person: a named person",
    "LOC": "location: a named place, country or region",
    "location": "location: a named place, country or region",
    "ORG": "organisation: a named company, institution, party or group",
    "organisation": "organisation: a named company, institution, party or group",
    "MISC": "miscellaneous: other named entities such as events, nationalities, works and products",
    "misc": "miscellaneous: other named entities such as events, nationalities, works and products",
    "GPE": "geopolitical entity: a country, city or state",
    "NORP": "nationality, religious or political group",
    "FAC": "facility: a building, airport or bridge",
    "PRODUCT": "product: a named product",
    "EVENT": "event: a named event",
    "WORK_OF_ART": "work of art: a named book, song or film",
    "LAW": "law: a named law or treaty",
    "LANGUAGE": "language: a named language",
}


class LabelAlignment:
    def __init__(
        self,
        source: Sequence[str],
        target: Sequence[str],
        scores: np.ndarray,
        precision: Optional[Dict[str, float]] = None,
    ):
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (len(source), len(target)):
            raise ValueError(f"alignment matrix is {scores.shape}, expected {(len(source), len(target))}")
        self.source = list(source)
        self.target = list(target)
        self.scores = scores
        self.precision = dict(precision or {})

    # ---- building -------------------------------------------------------------------------------------------
    @classmethod
    def from_embeddings(
        cls,
        source: Sequence[str],
        target: Sequence[str],
        encoder,
        target_definitions: Optional[Dict[str, str]] = None,
        source_definitions: Optional[Dict[str, str]] = None,
        temperature: float = 0.05,
    ) -> "LabelAlignment":
        def describe(label, defs, fallback):
            text = (defs or {}).get(label) or fallback.get(label)
            return text if text and text.lower().startswith(label.lower()) else f"{label}: {text or label}"

        src = encoder.sentences([describe(s, source_definitions, SOURCE_DEFINITIONS) for s in source])
        tgt = encoder.sentences([describe(t, target_definitions, {}) for t in target])
        cos = np.asarray(src, dtype=np.float64) @ np.asarray(tgt, dtype=np.float64).T
        z = (cos - cos.max(axis=1, keepdims=True)) / temperature
        probs = np.exp(z)
        return cls(source, target, probs / probs.sum(axis=1, keepdims=True))

    @classmethod
    def from_cooccurrence(
        cls,
        pairs: Iterable[Tuple[str, Optional[str]]],
        source: Sequence[str],
        target: Sequence[str],
        smoothing: float = 0.1,
    ) -> "LabelAlignment":
        """``pairs``: (source label, gold target label or None when no gold span has the same boundaries)."""
        counts = np.full((len(source), len(target)), smoothing, dtype=np.float64)
        seen, matched = Counter(), Counter()
        s_index = {s: i for i, s in enumerate(source)}
        t_index = {t: j for j, t in enumerate(target)}
        for s, t in pairs:
            if s not in s_index:
                continue
            seen[s] += 1
            if t in t_index:
                counts[s_index[s], t_index[t]] += 1
                matched[s] += 1
        precision = {s: matched[s] / seen[s] for s in source if seen[s]}
        return cls(source, target, counts / counts.sum(axis=1, keepdims=True), precision)

    @staticmethod
    def combine(parts: Sequence[Tuple["LabelAlignment", float]]) -> "LabelAlignment":
        first = parts[0][0]
        total = sum(w for _, w in parts)
        scores = sum(a.scores * w for a, w in parts) / total
        precision = next((a.precision for a, _ in parts if a.precision), {})
        return LabelAlignment(first.source, first.target, scores, precision)

    def override(self, rows: Dict[str, Dict[str, float]]) -> "LabelAlignment":
        """Pin rows from the config: ``{"person": {"politician": 0.6, "person": 0.4}}`` (missing targets 0)."""
        source, scores = list(self.source), self.scores.copy()
        for s, row in rows.items():
            unknown = [t for t in row if t not in self.target]
            if unknown:
                raise ValueError(f"alignment override for {s!r} names unknown target labels {unknown}")
            vec = np.array([float(row.get(t, 0.0)) for t in self.target])
            if vec.sum() <= 0:
                raise ValueError(f"alignment override for {s!r} needs a positive score")
            if s in source:
                scores[source.index(s)] = vec / vec.sum()
            else:
                source.append(s)
                scores = np.vstack([scores, vec / vec.sum()])
        return LabelAlignment(source, self.target, scores, self.precision)

    # ---- using ----------------------------------------------------------------------------------------------
    def candidates(self, source_label: str, top_k: int = 3, min_score: float = 0.0) -> List[Tuple[str, float]]:
        """Ranked target labels for a source label; every target label, in order, for an unknown one."""
        if source_label not in self.source:
            return [(t, 0.0) for t in self.target]
        row = self.scores[self.source.index(source_label)]
        order = np.argsort(-row, kind="stable")[:top_k]
        return [(self.target[j], float(row[j])) for j in order if row[j] >= min_score] or [
            (self.target[int(order[0])], float(row[order[0]]))
        ]

    def to_dict(self) -> Dict:
        return {
            "source": self.source,
            "target": self.target,
            "scores": self.scores.round(6).tolist(),
            "precision": self.precision,
        }

    @classmethod
    def from_dict(cls, data: Dict) -> "LabelAlignment":
        return cls(data["source"], data["target"], np.array(data["scores"]), data.get("precision"))

    def to_disk(self, path: Path) -> None:
        srsly.write_json(path, self.to_dict())

    @classmethod
    def from_disk(cls, path: Path) -> "LabelAlignment":
        return cls.from_dict(srsly.read_json(path))

    def to_bytes(self) -> bytes:
        return srsly.msgpack_dumps(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> "LabelAlignment":
        return cls.from_dict(srsly.msgpack_loads(data))

    def table(self, top_k: int = 3) -> str:
        lines = []
        width = max(len(s) for s in self.source) if self.source else 0
        for s in self.source:
            ranked = ", ".join(f"{t} {p:.2f}" for t, p in self.candidates(s, top_k))
            prec = f"  (a target entity {100 * self.precision[s]:.0f}% of the time)" if s in self.precision else ""
            lines.append(f"{s:<{width}} → {ranked}{prec}")
        return "\n".join(lines)

    __str__ = table
