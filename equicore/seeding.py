"""Per-sample random streams.

Every random draw an attack or defense makes for one image comes from a generator seeded by that image's own seed,
so an image's result does not depend on which other images share its batch or shard, nor on the worker count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from equicore.errors import InvalidInputError

_MASK63 = (1 << 63) - 1


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (run seed, sample id, purpose...)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK63


def sample_seeds(base_seed: int, sample_ids: Sequence[object]) -> list[int]:
    return [derive_seed(base_seed, sid) for sid in sample_ids]


def as_seed_list(seeds: Sequence[int] | torch.Tensor | None, batch: int, default: int = 0) -> list[int]:
    """Normalise a seeds argument; ``None`` means seeds ``default, default+1, ...`` (only for ad-hoc use)."""
    if seeds is None:
        return [derive_seed(default, i) for i in range(batch)]
    out = [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
    if len(out) != batch:
        raise InvalidInputError(f"seeds: got {len(out)} seeds for a batch of {batch}")
    return out


def per_sample_draw(
    kind: str,
    shape: Sequence[int],
    seeds: Sequence[int],
    purpose: object,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Stack one draw per sample: ``kind`` is "uniform" ([0,1)) or "normal"; ``purpose`` separates streams."""
    device = torch.device(device)
    out = []
    for seed in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(seed, purpose))
        if kind == "uniform":
            out.append(torch.rand(tuple(shape), generator=g, device=device, dtype=dtype))
        elif kind == "normal":
            out.append(torch.randn(tuple(shape), generator=g, device=device, dtype=dtype))
        else:
            raise ValueError(f"unknown draw kind {kind!r}")
    return torch.stack(out)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed) & _MASK63)
    return g
