"""The demonstration pool: annotated sentences and their embeddings, saved with the pipeline.

Arrays are ``.npy`` files written without pickle; the large word-piece array is float16 and memory-mapped on
load, so a pool of 100,000 sentences loads instantly and only the pieces a query touches are read.
"""

import json
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from ..prompt import Demonstration
from ..reading import read_jsonl, reading
from .encoder import MiniLMEncoder

ARRAYS = ("sentence", "pieces", "piece_ids", "piece_offsets", "spans", "span_offsets")


class Pool:
    def __init__(self, demonstrations: Sequence[Demonstration], **arrays: np.ndarray):
        self.demonstrations = list(demonstrations)
        self.sentence = arrays["sentence"]  # [N, d] float32, unit length
        self.pieces = arrays["pieces"]  # [T, d] float16, unit length: every word piece of every sentence
        self.piece_ids = arrays["piece_ids"]  # [T] int32 vocabulary ids (for IDF)
        self.piece_offsets = arrays["piece_offsets"]  # [N + 1]: sentence i owns pieces[off[i]:off[i + 1]]
        self.spans = arrays["spans"]  # [S, d] float32: embeddings of the gold entity texts
        self.span_offsets = arrays["span_offsets"]  # [N + 1]
        self._idf: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.demonstrations)

    @classmethod
    def build(cls, demonstrations: Sequence[Demonstration], encoder: MiniLMEncoder) -> "Pool":
        demos = [d for d in demonstrations if d.text.strip()]
        sent, toks, ids = encoder.pieces([d.text for d in demos])
        span_texts = [d.text[s:e] for d in demos for s, e, _ in d.spans]
        counts = [len(d.spans) for d in demos]
        dim = sent.shape[1] if len(sent) else 384
        return cls(
            demos,
            sentence=sent,
            pieces=np.concatenate(toks).astype(np.float16) if toks else np.zeros((0, dim), np.float16),
            piece_ids=np.concatenate(ids) if ids else np.zeros(0, np.int32),
            piece_offsets=np.concatenate([[0], np.cumsum([len(t) for t in toks])]).astype(np.int64),
            spans=encoder.sentences(span_texts) if span_texts else np.zeros((0, dim), np.float32),
            span_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        )

    def idf(self) -> np.ndarray:
        """Smoothed inverse sentence frequency of each vocabulary id in the pool (rare word pieces weigh more)."""
        if self._idf is None:
            n = max(len(self), 1)
            df = np.zeros(int(self.piece_ids.max(initial=0)) + 1, dtype=np.float64)
            for i in range(len(self)):
                df[np.unique(self.piece_ids[self.piece_offsets[i] : self.piece_offsets[i + 1]])] += 1
            self._idf = np.log((n + 1) / (df + 1)) + 1.0
        return self._idf

    def idf_of(self, ids: np.ndarray) -> np.ndarray:
        table = self.idf()
        n = max(len(self), 1)
        unseen = np.log(n + 1) + 1.0  # a word piece the pool never saw is as rare as it gets
        return np.array([table[i] if i < len(table) else unseen for i in ids], dtype=np.float32)

    def to_disk(self, path: Union[str, Path]) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with (path / "demonstrations.jsonl").open("w", encoding="utf8") as f:
            for d in self.demonstrations:
                f.write(json.dumps(d.to_dict(), ensure_ascii=False) + "\n")
        for name in ARRAYS:
            np.save(path / f"{name}.npy", np.asarray(getattr(self, name)), allow_pickle=False)

    def to_bytes(self) -> bytes:
        import srsly  # msgpack with numpy support: arrays travel as raw buffers, no pickle

        return srsly.msgpack_dumps(
            {
                "demonstrations": [d.to_dict() for d in self.demonstrations],
                **{name: np.asarray(getattr(self, name)) for name in ARRAYS},
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> "Pool":
        import srsly

        msg = srsly.msgpack_loads(data)
        return cls([Demonstration.from_dict(d) for d in msg["demonstrations"]], **{n: msg[n] for n in ARRAYS})

    @classmethod
    def from_disk(cls, path: Union[str, Path], owner: str = "retriever") -> "Pool":
        """A saved pool; a damaged file is a ``reading.FileReadError`` naming ``owner`` and the file."""
        path = Path(path)
        demos = read_jsonl(owner, path / "demonstrations.jsonl", Demonstration.from_dict)
        arrays = {}
        for name in ARRAYS:
            with reading(owner, path / f"{name}.npy"):
                arrays[name] = np.load(
                    path / f"{name}.npy", allow_pickle=False, mmap_mode="r" if name == "pieces" else None
                )
        with reading(owner, path / "sentence.npy"):
            if len(arrays["sentence"]) != len(demos) or len(arrays["piece_offsets"]) != len(demos) + 1:
                raise ValueError(
                    f"it holds {len(arrays['sentence'])} rows and demonstrations.jsonl {len(demos)} demonstrations: "
                    "the pool's files come from different saves"
                )
        return cls(demos, **arrays)

    def labels_of(self, i: int) -> List[str]:
        return [label for _, _, label in self.demonstrations[i].spans]
