"""Calibrated per-entity confidence: a monotone map from a span's raw confidence (the geometric-mean probability of
the answer tokens that stated it, ``formats.spans.confidence``) to the precision such spans had on held-out data.

Raw token probabilities rank spans well but are over-confident (a span at 0.95 raw is right far less than 95 % of
the time). ``fit`` learns the map by isotonic regression (pool adjacent violators) on (raw confidence, correct)
pairs from a dev set; each pooled block's precision is add-one smoothed, so no span is ever certain or impossible.
A shipped adapter carries its maps as ``calibration.json`` beside ``adapter.gguf``; the backend that serves the
adapter offers them (``Backend.calibration``) and the component applies them before ``threshold``.

A prompt without demonstrations and one with some need not be right equally often at the same raw confidence,
and the component serves both, so a file holds one map per condition (``Calibrations``): each map applies from its
``min_demonstrations`` on, and a prompt takes the map of the largest ``min_demonstrations`` it reaches. A file in
the older one-map form (``{"fitted_on", "knots"}``) is one map for every prompt.
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


@dataclass(frozen=True)
class Calibrations:
    """Calibration maps by the number of demonstrations a prompt showed: ``((min_demonstrations, map), ...)``,
    sorted, the first at 0 (every prompt has a map)."""

    maps: Tuple[Tuple[int, Calibration], ...]

    def __post_init__(self):
        starts = [n for n, _ in self.maps]
        if not starts or starts[0] != 0 or starts != sorted(set(starts)):
            raise ValueError(f"calibration: maps must start at min_demonstrations 0 and increase, not at {starts!r}")

    def for_demonstrations(self, n: int) -> Calibration:
        """The map for a prompt that showed ``n`` demonstrations."""
        return [cal for start, cal in self.maps if start <= n][-1]

    def with_map(self, min_demonstrations: int, calibration: Calibration) -> "Calibrations":
        """These maps with the one from ``min_demonstrations`` on replaced (or added); a new first map must start
        at 0."""
        kept = dict(self.maps)
        kept[min_demonstrations] = calibration
        return Calibrations(tuple(sorted(kept.items())))

    def to_dict(self) -> Dict[str, Any]:
        return {"maps": [{"min_demonstrations": n, **cal.to_dict()} for n, cal in self.maps]}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Calibrations":
        if "maps" not in data:  # the one-map form
            return cls(((0, Calibration.from_dict(data)),))
        return cls(tuple((int(m["min_demonstrations"]), Calibration.from_dict(m)) for m in data["maps"]))


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


def load(path: Union[str, Path], owner: str = "calibration") -> Calibrations:
    """Saved maps; a damaged file is a ``reading.FileReadError`` naming ``owner`` and the file."""
    from .reading import read_json

    return read_json(owner, path, Calibrations.from_dict)


def save(calibrations: Calibrations, path: Union[str, Path]) -> None:
    Path(path).write_text(json.dumps(calibrations.to_dict(), indent=1) + "\n", encoding="utf8")
