"""The span memory for kNN typing, with its own serialization."""

from pathlib import Path
from typing import Dict, List, Sequence

import srsly

from ..prompt import Demonstration


class SpanMemory:
    """The target train split's gold entity spans, embedded (MiniLM, the span text alone), for kNN typing: a
    span's label distribution is the similarity-weighted vote of its nearest gold spans (an entity seen in
    training is its own nearest neighbour). Saved with the pipeline as ``<stem>.npy`` (the vectors, float16) and
    ``<stem>.json`` (their labels)."""

    def __init__(self, vectors, labels: Sequence[str], k: int = 10, temperature: float = 0.05):
        import numpy as np

        self.vectors = np.asarray(vectors, dtype=np.float16)
        self.labels = list(labels)
        self.k = k
        self.temperature = temperature

    @classmethod
    def build(cls, demos: Sequence[Demonstration], encoder) -> "SpanMemory":
        texts = [d.text[s:e] for d in demos for s, e, _ in d.spans]
        return cls(encoder.sentences(texts), [lab for d in demos for _, _, lab in d.spans])

    def distributions(self, texts: Sequence[str], encoder) -> List[Dict[str, float]]:
        import numpy as np

        if not texts or not self.labels:
            return [{} for _ in texts]
        sims = encoder.sentences(list(texts)) @ self.vectors.astype(np.float32).T
        out = []
        for row in sims:
            top = np.argsort(-row)[: self.k]
            w = np.exp((row[top] - row[top[0]]) / self.temperature)
            dist: Dict[str, float] = {}
            for j, weight in zip(top, w):
                dist[self.labels[j]] = dist.get(self.labels[j], 0.0) + float(weight)
            total = sum(dist.values())
            out.append({lab: v / total for lab, v in dist.items()})
        return out

    def to_disk(self, stem: Path) -> None:
        import numpy as np

        np.save(stem.with_suffix(".npy"), self.vectors, allow_pickle=False)
        srsly.write_json(stem.with_suffix(".json"), self.labels)

    @classmethod
    def from_disk(cls, stem: Path, owner: str = "span memory") -> "SpanMemory":
        """The saved memory (``stem``.npy and .json); a damaged file is a ``reading.FileReadError`` naming
        ``owner`` and the file."""
        import numpy as np

        from ..reading import list_of_strings, read_json, reading

        with reading(owner, stem.with_suffix(".npy")):
            vectors = np.load(stem.with_suffix(".npy"), allow_pickle=False)
        labels = read_json(owner, stem.with_suffix(".json"), list_of_strings)
        with reading(owner, stem.with_suffix(".json")):
            if vectors.ndim != 2 or len(labels) != len(vectors):
                raise ValueError(f"{len(labels)} labels for vectors of shape {vectors.shape}: saved apart?")
        return cls(vectors, labels)

    def to_bytes(self) -> bytes:
        return srsly.msgpack_dumps(
            {"labels": self.labels, "shape": list(self.vectors.shape), "vectors": self.vectors.astype("<f2").tobytes()}
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> "SpanMemory":
        import numpy as np

        msg = srsly.msgpack_loads(data)
        return cls(np.frombuffer(msg["vectors"], "<f2").reshape(msg["shape"]), msg["labels"])
