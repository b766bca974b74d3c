"""Equivariance scores of a shard's input images, computed once and shared by every defense that reads those images.

Every (attack, defense) unit reports the equivariance score of its input ("before") beside that of its output. The
input is the same for every defense of an attack that does not see the defense (and for the clean images), so the
first unit to score a shard stores the scores here and the others read them: one measure per (attack, shard) instead
of one per defense. The key (``tasks.units.measure_key``) holds what the scores depend on: the images' cache key (or
the clean images' identity), the measure's settings and code version, and the batch size (scores are computed per
batch, as a recomputation would).

One small JSON file per (key, shard), written atomically: ``measures/<key>/shard_00003.json`` under the cache
directory, holding the sample ids and the scores (float64; JSON keeps them exactly). A missing, unreadable or
mismatched file is simply recomputed: the entry is an optimisation, never a source of truth.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .atomic import atomic_write_json
from .keys import safe_component

__all__ = ["MeasureCache"]

FORMAT = 1


class MeasureCache:
    """Per-shard equivariance scores under ``root`` (``<cache_dir>/measures``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def beside(cls, cache_root: str | Path) -> MeasureCache:
        return cls(Path(cache_root) / "measures")

    def path(self, key: str, shard: int) -> Path:
        return self.root / safe_component(key, "measure key") / f"shard_{int(shard):05d}.json"

    def read(self, key: str, shard: int, ids: list[str]) -> list[float] | None:
        """The scores of ``ids`` in order, or None when there is no usable entry (recompute then)."""
        try:
            data = json.loads(self.path(key, shard).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("ids") != ids:
            return None
        scores = data.get("scores")
        if not isinstance(scores, list) or len(scores) != len(ids):
            return None
        if not all(isinstance(s, float) and math.isfinite(s) for s in scores):
            return None
        return scores

    def write(self, key: str, shard: int, ids: list[str], scores: list[float]) -> None:
        """Store a shard's scores (atomic; a concurrent writer of the same key writes the same numbers)."""
        if len(scores) != len(ids):
            raise ValueError(f"measure cache: {len(scores)} scores for {len(ids)} samples")
        if not all(math.isfinite(s) for s in scores):
            return  # not stored: every reader recomputes (and sees the same non-finite score)
        path = self.path(key, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        # No fsync: a file lost in a crash is recomputed; the rename alone keeps readers from a torn file.
        atomic_write_json(path, {"format": FORMAT, "ids": list(ids), "scores": [float(s) for s in scores]}, fsync=False)
