"""A plan-time scan of a dataset's selected samples: every one must load before any compute starts.

Loaders that read user files (ImageNet folders, Cityscapes, VOC, COCO) decode an image only when its sample is
asked for, so an undecodable, truncated, empty, oversized or out-of-root file would otherwise surface on a worker,
in the middle of a run, failing its whole shard. :func:`check_samples` loads each selected sample once (the loader's
own checks: decoding, label values, sizes, the dataset root) and fails with one line naming the first bad file and
counting the others; nothing has been written by then.

Images larger than PIL's ``Image.MAX_IMAGE_PIXELS`` are refused here (PIL only warns below twice that), so a
decompression bomb never reaches a worker.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from equicore.datasets.base import SampleDataset
from equicore.errors import DatasetError

__all__ = ["check_samples", "unreadable_samples"]

_LISTED = 3  # sample ids named after the first error


def _problem(dataset: SampleDataset, index: int) -> str | None:
    try:
        dataset[index]
    except DatasetError as exc:
        return str(exc)
    except Image.DecompressionBombWarning as exc:  # an error inside check_samples (see the module docstring)
        return f"sample {dataset.sample_id(index)}: image too large ({type(exc).__name__}: {exc})"
    return None


def unreadable_samples(
    dataset: SampleDataset, indices: Sequence[int], threads: int | None = None
) -> list[tuple[int, str]]:
    """``(index, one-line error)`` of every selected sample that fails to load, in index order. Images are decoded
    on ``threads`` threads (default: up to 8, one per core); images over ``Image.MAX_IMAGE_PIXELS`` count as bad."""
    n_threads = threads or max(1, min(8, os.cpu_count() or 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="equi-scan") as pool:
            problems = list(pool.map(lambda i: _problem(dataset, int(i)), indices))
    return [(int(i), p) for i, p in zip(indices, problems, strict=True) if p is not None]


def check_samples(dataset: SampleDataset, indices: Sequence[int], threads: int | None = None) -> None:
    """DatasetError naming the first selected sample that cannot be loaded (and how many others cannot)."""
    bad = unreadable_samples(dataset, indices, threads)
    if not bad:
        return
    message = bad[0][1]
    if len(bad) > 1:
        others = [dataset.sample_id(i) for i, _ in bad[1 : 1 + _LISTED]]
        more = f", ... ({len(bad) - 1} in all)" if len(bad) - 1 > _LISTED else ""
        message += f"; {len(bad) - 1} more selected sample(s) cannot be loaded either: {', '.join(others)}{more}"
    raise DatasetError(message)
