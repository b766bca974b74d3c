"""The base of every mergeable metric state: a state declares its configuration and its summable fields once, and
``merge``, ``to_dict``, ``from_dict`` and the same-configuration check follow from the declaration (like
torchmetrics' ``add_state``). A state implements only ``update`` and ``compute``.

Exact under any split of the data: counts and confusion matrices are integers, and means of real-valued scores are
accumulated in 2^-48 fixed point as Python ints, so the sum does not depend on the order of additions.

Serialised form (``to_dict``): ``{"type": name, "config": {config fields}, <fields in declaration order>}``, each field
written by its kind. Results on disk are read back with ``from_dict``: this form does not change.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import torch

from equicore.errors import InvalidInputError

FIXED_POINT_SCALE = 2**48

State = TypeVar("State", bound="MetricState")


class FieldKind:
    """How a declared field merges and is written. ``summed``: two shards' values combine by ``+`` (ints, int
    tensors, lists). A field that is not ``stored`` is derived from the others: written by ``to_dict`` for readers,
    neither merged nor passed back to the constructor."""

    summed: ClassVar[bool] = True
    stored: ClassVar[bool] = True

    def encode(self, value: Any) -> Any:
        return value

    def decode(self, raw: Any) -> Any:
        return raw

    def __repr__(self) -> str:
        return type(self).__name__


class Count(FieldKind):
    """A Python int, summed."""

    def encode(self, value: Any) -> int:
        return int(value)

    def decode(self, raw: Any) -> int:
        return int(raw)


class FixedPoint(Count):
    """A Python int of 2^-48 units, summed; written as a string (it can exceed int64 in JSON consumers)."""

    def encode(self, value: Any) -> str:
        return str(value)


class IntTensor(FieldKind):
    """An int64 tensor (a confusion matrix), summed; written as nested lists."""

    def encode(self, value: torch.Tensor) -> list[Any]:
        return value.tolist()

    def decode(self, raw: Any) -> torch.Tensor:
        return torch.tensor(raw, dtype=torch.int64)


class Records(FieldKind):
    """A list of JSON-able records, concatenated; written as a deep copy (the constructor copies what it reads)."""

    def encode(self, value: list[Any]) -> list[Any]:
        return copy.deepcopy(value)


class Derived(FieldKind):
    """Computed from the other fields (a property): written only."""

    summed = False
    stored = False


COUNT, FIXED_POINT, INT_TENSOR, RECORDS, DERIVED = Count(), FixedPoint(), IntTensor(), Records(), Derived()


class MetricState(ABC):
    """``inputs`` names the batch entries ``update`` reads: preds, labels, attack_targets, scores.

    ``config_fields``: constructor parameters that define the metric (two states merge only when they agree);
    ``fields``: attribute -> :class:`FieldKind`, the accumulated state, in serialisation order. The constructor
    takes every config field and every stored field as keyword arguments.
    """

    name: ClassVar[str] = "metric"
    inputs: ClassVar[tuple[str, ...]] = ()
    config_fields: ClassVar[tuple[str, ...]] = ()
    fields: ClassVar[Mapping[str, FieldKind]] = {}

    @abstractmethod
    def update(self, batch: Mapping[str, Any]) -> None: ...

    @abstractmethod
    def compute(self) -> dict[str, float]: ...

    def config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.config_fields}

    def merge(self: State, other: MetricState) -> State:
        """A new state holding both (neither is changed)."""
        self._check_same(other)
        self._check_mergeable(other)
        summed = {k: getattr(self, k) + getattr(other, k) for k, kind in self.fields.items() if kind.summed}
        return type(self)(**self.config(), **summed)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.name, "config": self.config()}
        for k, kind in self.fields.items():
            data[k] = kind.encode(getattr(self, k))
        return data

    @classmethod
    def from_dict(cls: type[State], data: Mapping[str, Any]) -> State:
        config = data.get("config", {})
        params = {k: config[k] for k in cls.config_fields if k in config}
        params.update({k: kind.decode(data[k]) for k, kind in cls.fields.items() if kind.stored})
        return cls(**params)

    def _check_same(self, other: MetricState) -> None:
        if type(other) is not type(self) or other.config() != self.config():
            raise InvalidInputError(f"cannot merge {type(other).__name__} into {type(self).__name__} (configs differ)")

    def _check_mergeable(self, other: MetricState) -> None:  # noqa: B027 (a hook: no further condition by default)
        """Further conditions for merging ``other`` (same configuration already checked). Default: none."""

    @property
    def n_samples(self) -> int:
        return int(getattr(self, "n", 0))


def batch_input(batch: Mapping[str, Any], key: str, metric: str) -> Any:
    """``batch[key]``, which metric ``metric`` needs."""
    if key not in batch or batch[key] is None:
        raise InvalidInputError(f"metric {metric!r} needs {key!r} in the batch")
    return batch[key]


def fixed_point_sum(values: torch.Tensor) -> int:
    """The exact sum of ``values`` in 2^-48 units (each rounded to the nearest unit first)."""
    return sum(round(v * FIXED_POINT_SCALE) for v in values.detach().double().reshape(-1).tolist())
