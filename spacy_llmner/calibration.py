"""Calibrated per-entity confidence: a monotone map from a span's raw confidence (the geometric-mean probability of
the answer tokens that stated it, ``formats.spans.confidence``) to the precision such spans had on held-out data.

Raw token probabilities rank spans well but are over-confident (a span at 0.95 raw is right far less than 95 % of
the time). ``fit`` learns the map by isotonic regression (pool adjacent violators) on (raw confidence, correct)
pairs from a dev set; each pooled block's precision is add-one smoothed, so no span is ever certain or impossible.
A shipped adapter carries its map as ``calibration.json`` beside ``adapter.gguf``; the backend that serves the
adapter offers it (``Backend.calibration``) and the component applies it before ``threshold``.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import numpy as np

FILE = "calibration.json"


@dataclass(frozen=True)
class Calibration:
    """Knots ``(raw, calibrated)`` of a non-decreasing piecewise-linear map; flat beyond the first and last knot."""

    knots: Tuple[Tuple[float, float], ...]
    fitted_on: str = ""

    def __post_init__(self):
        xs, ys = [x for x, _ in self.knots], [y for _, y in self.knots]
        if not self.knots or xs != sorted(xs) or ys != sorted(ys) or not all(0.0 <= v <= 1.0 for v in xs + ys):
            raise ValueError(f"calibration: knots must be non-decreasing pairs in [0, 1], not {self.knots!r}")

    def __call__(self, raw: Optional[float]) -> Optional[float]:
        if raw is None:
            return None
        return float(np.interp(raw, [x for x, _ in self.knots], [y for _, y in self.knots]))

    def to_dict(self) -> Dict[str, Any]:
        return {"fitted_on": self.fitted_on, "knots": [list(k) for k in self.knots]}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Calibration":
        return cls(tuple((float(x), float(y)) for x, y in data["knots"]), data.get("fitted_on", ""))


def fit(pairs: Iterable[Tuple[float, bool]], fitted_on: str = "", min_block: int = 20) -> Calibration:
    """Isotonic regression of correctness on raw confidence. Blocks hold at least ``min_block`` spans (merged with
    their neighbour otherwise) so that no knot rests on a handful of spans; a knot sits at each block's mean raw
    confidence, at the block's add-one smoothed precision."""
    data = [(float(s), bool(c)) for s, c in pairs]
    if len(data) < min_block:
        raise ValueError(f"calibration: {len(data)} scored spans are too few to fit (at least {min_block})")
    tied: Dict[float, list] = {}  # spans of one raw confidence form one block from the start
    for s, c in data:
        block = tied.setdefault(s, [0.0, 0.0, 0])
        block[0], block[1], block[2] = block[0] + s, block[1] + c, block[2] + 1
    blocks: list = []  # [sum raw, correct, n]
    for s in sorted(tied):
        blocks.append(tied[s])
        while len(blocks) > 1 and (
            blocks[-2][1] / blocks[-2][2] >= blocks[-1][1] / blocks[-1][2] or blocks[-2][2] < min_block
        ):
            _pool_last(blocks)
    if len(blocks) > 1 and blocks[-1][2] < min_block:  # a short last block joins its neighbour
        _pool_last(blocks)
    knots = [(round(s / n, 6), round((c + 1) / (n + 2), 6)) for s, c, n in blocks]
    for i in range(1, len(knots)):  # smoothing can undo the order of neighbouring precisions: keep it monotone
        knots[i] = (knots[i][0], max(knots[i][1], knots[i - 1][1]))
    return Calibration(tuple(knots), fitted_on)


def _pool_last(blocks: list) -> None:
    """Pools the last two ``[sum raw, correct, n]`` blocks into one."""
    s, c, n = blocks.pop()
    blocks[-1] = [blocks[-1][0] + s, blocks[-1][1] + c, blocks[-1][2] + n]


def load(path: Union[str, Path], owner: str = "calibration") -> Calibration:
    """A saved map; a damaged file is a ``reading.FileReadError`` naming ``owner`` and the file."""
    from .reading import read_json

    return read_json(owner, path, Calibration.from_dict)


def save(calibration: Calibration, path: Union[str, Path]) -> None:
    Path(path).write_text(json.dumps(calibration.to_dict(), indent=1) + "\n", encoding="utf8")
