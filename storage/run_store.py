"""One run's files, addressed through one value: ``RunStore(results_dir, run_id)``.

The functions of :mod:`storage.results`, :mod:`storage.examples` and :mod:`storage.locks` take ``(results_dir,
run_id)`` on every call; the flow, the shard steps and the reports hold a ``RunStore`` instead and ask it. The
on-disk layout is theirs, unchanged::

    samples/run_id=<run>/attack_key=<a>/defense_key=<d>/shard=00003.parquet   one file per unit shard
    examples/run_id=<run>/attack_key=<a>/defense_key=<d>/shard=00000.parquet  Figure-2 examples of a unit shard
    results/run_id=<run>/part-0.parquet                                        reduced long table
    runs/<run>.json                                                            run manifest
    failures/run_id=<run>/<unit_key>.shard=00003.json                          last error of a failed shard
    locks/<run>.lock                                                           one writer per run

A ``RunStore`` is a frozen value of two strings, so it pickles: shard tasks on Dask workers get one too. Nothing is
checked or created when one is made; a run id that is not a safe path component fails on first use, as before.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from . import examples as E
from . import locks as L
from . import results as R

__all__ = ["RunStore"]


@dataclass(frozen=True)
class RunStore:
    """The files of run ``run_id`` under ``results_dir``."""

    results_dir: str
    run_id: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "results_dir", os.fspath(self.results_dir))  # a Path is accepted too

    @classmethod
    def all_in(cls, results_dir: str | os.PathLike[str]) -> list[RunStore]:
        """Every run with a manifest under ``results_dir``, sorted by run id."""
        return [cls(os.fspath(results_dir), run_id) for run_id in R.list_runs(results_dir)]

    # ------------------------------------------------------------------------------------------ manifest
    def read_manifest(self) -> dict[str, Any]:
        """RunNotFoundError if the run has no manifest, StorageError if it is unreadable."""
        return R.read_run_manifest(self.results_dir, self.run_id)

    def write_manifest(self, manifest: Mapping[str, Any]) -> Path:
        return R.write_run_manifest(self.results_dir, self.run_id, manifest)

    def has_manifest(self) -> bool:
        return self.run_id in R.list_runs(self.results_dir)

    # ------------------------------------------------------------------------------------------ unit shards
    def shard_path(self, attack_key: str, defense_key: str, shard: int) -> Path:
        return R.shard_path(self.results_dir, self.run_id, attack_key, defense_key, shard)

    def shard_done(self, attack_key: str, defense_key: str, shard: int) -> bool:
        """The shard file exists with a readable footer and intact metric state (pages are not read)."""
        return R.shard_done(self.results_dir, self.run_id, attack_key, defense_key, shard)

    def read_shard(self, attack_key: str, defense_key: str, shard: int) -> tuple[pa.Table, dict[str, Any]]:
        """(sample table, metric state); FileNotFoundError if absent, ResultCorruptError if damaged."""
        return R.read_shard(self.shard_path(attack_key, defense_key, shard))

    def read_shard_unit(self, attack_key: str, defense_key: str, shard: int) -> dict[str, Any]:
        """The unit record in the shard file's footer (pages are not read)."""
        return R.read_shard_unit(self.shard_path(attack_key, defense_key, shard))

    def write_shard(
        self, unit: Mapping[str, Any], samples: Sequence[Mapping[str, Any]] | pa.Table, state: Mapping[str, Any]
    ) -> Path:
        """Write-once; ``unit`` holds attack_key, defense_key and shard (see :func:`storage.results.write_shard`)."""
        return R.write_shard(self.results_dir, self.run_id, unit, samples, state)

    def discard_shard(self, attack_key: str, defense_key: str, shard: int) -> bool:
        """Delete a (damaged) shard file so it is recomputed; True if it existed."""
        return R.discard_shard(self.shard_path(attack_key, defense_key, shard))

    def list_shards(self) -> list[Path]:
        return R.list_shards(self.results_dir, self.run_id)

    # ------------------------------------------------------------------------------------------ examples
    def write_examples(self, unit: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Path:
        return E.write_examples(self.results_dir, self.run_id, unit, rows)

    def read_examples(self) -> pa.Table:
        return E.read_examples(self.results_dir, self.run_id)

    # ------------------------------------------------------------------------------------------ results table
    def results_table_path(self) -> Path:
        return R.results_table_path(self.results_dir, self.run_id)

    def write_results_table(self, rows: Sequence[Mapping[str, Any]]) -> Path:
        return R.write_results_table(self.results_dir, self.run_id, rows)

    def read_results_table(self) -> pa.Table:
        return R.read_results_table(self.results_dir, self.run_id)

    # ------------------------------------------------------------------------------------------ failures
    def mark_failed(self, unit_key: str, shard: int, error: str) -> Path:
        return R.mark_failed(self.results_dir, self.run_id, unit_key, shard, error)

    def clear_failed(self, unit_key: str, shard: int) -> bool:
        return R.clear_failed(self.results_dir, self.run_id, unit_key, shard)

    def failures(self) -> list[dict[str, Any]]:
        return R.failures(self.results_dir, self.run_id)

    # ------------------------------------------------------------------------------------------ lock
    def lock(self) -> contextlib.AbstractContextManager[Path]:
        """The run's lock, held for a ``with`` block; RunLockedError at once if a live process holds it."""
        return L.run_lock(self.results_dir, self.run_id)

    def lock_holder(self) -> dict[str, Any] | None:
        return L.lock_holder(self.results_dir, self.run_id)

    def run_state(self, manifest: Mapping[str, Any] | None = None) -> str:
        """The manifest's status, except that a run recorded as "running" whose lock no process holds any more (its
        process group was killed, or its machine went down) is "interrupted": ``equi resume`` finishes it."""
        manifest = self.read_manifest() if manifest is None else manifest
        return _state(manifest, self.lock_holder())

    # ------------------------------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        """Shards done / failed / pending per (attack, defense) unit of the manifest, from the manifest and the files
        alone (no model, no config): ``{"manifest": ..., "state": run_state, "holder": lock holder or None, "units":
        [{**unit, "done", "failed", "pending"}, ...]}``."""
        manifest = self.read_manifest()
        holder = self.lock_holder()
        failed = {(f["unit_key"], int(f["shard"])): f for f in self.failures()}
        units = []
        for u in manifest.get("units", []):
            done, bad, pending = 0, [], 0
            for shard in range(int(manifest["n_shards"])):
                if self.shard_done(u["attack_key"], u["defense_key"], shard):
                    done += 1
                elif (u["unit_key"], shard) in failed or (u["attack_key"], shard) in failed:
                    # A defense shard fails on its own, or with the attack shard it reads (recorded under its key).
                    f = failed.get((u["unit_key"], shard)) or failed[(u["attack_key"], shard)]
                    bad.append({"shard": shard, "error": f.get("error", ""), "attempts": f.get("attempts")})
                else:
                    pending += 1
            units.append({**u, "done": done, "failed": bad, "pending": pending})
        return {"manifest": manifest, "state": _state(manifest, holder), "holder": holder, "units": units}


def _state(manifest: Mapping[str, Any], holder: Mapping[str, Any] | None) -> str:
    status = str(manifest.get("status") or "unknown")
    return "interrupted" if status == "running" and holder is None else status
