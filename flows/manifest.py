"""A run's provenance (config hash, git sha, package versions, code version) and its manifest ``runs/<run>.json``:
the config, the sample and shard counts, the model's weights (file and digest) and every planned (attack, defense)
unit with its storage keys, so status and reports need not rebuild the model."""

from __future__ import annotations

import contextlib
import datetime as dt
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from equicore.models.checkpoint import is_shipped
from equicore.models.common import RANDOM_INIT, resolve_checkpoint
from storage.errors import StorageError
from storage.run_store import RunStore
from tasks.config import RunConfig
from tasks.runtime import Runtime, code_version
from tasks.units import RunUnits
from tasks.user_code import find_module, user_model_code_version


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("equirobust", "torch", "torchvision", "prefect", "prefect-dask", "distributed", "zarr", "pyarrow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def provenance(cfg: RunConfig) -> dict[str, Any]:
    return {
        "config_hash": cfg.config_hash(),
        "git_sha": git_sha(),
        "package_versions": package_versions(),
        "code_version": code_version(),
    }


def weights_record(rt: Runtime) -> dict[str, Any]:
    """Which weights the run's model holds: the file (or "none" for a seeded random init), whether it is shipped with
    equirobust, and the sha256 ``weights_digest`` of its tensors (the digest the cache keys hold). A factory model
    adds its module file and code digest, a model file its sha256."""
    m = rt.cfg.model
    if m.kind == "name":
        path = resolve_checkpoint(m.name or "", m.checkpoint, "set model.checkpoint")
    else:
        path = Path(m.file) if m.file else None if m.checkpoint in (None, RANDOM_INIT) else Path(m.checkpoint or "")
    record = {
        "model": m.label,
        "checkpoint": str(path) if path is not None else "none",
        "shipped": path is not None and is_shipped(path),
        "weights_digest": rt.model_digest,
    }
    if m.kind != "name":
        record["code"] = user_model_code_version(m.factory, m.file, rt.cfg.plugins)
    if m.factory is not None:
        found = find_module(m.factory.split(":")[0], rt.cfg.plugins)
        record["factory_file"] = str(found[0]) if found else None
    return record


def unit_records(units: RunUnits) -> list[dict[str, Any]]:
    """The (attack, defense) units with their storage keys, attack-major as planned (reports rely on the order)."""
    return [
        {
            "attack": unit.attack.name,
            "defense": unit.defense.name,
            "attack_key": unit.attack_key,
            "defense_key": unit.defense_key,
            "unit_key": unit.unit_key,
        }
        for unit in units.pairs
    ]


def write_manifest(
    store: RunStore, rt: Runtime, units: RunUnits, status: str, extra: dict[str, Any] | None = None
) -> None:
    """Write (replace) the run's manifest with ``status``, keeping the first write's ``created_at``."""
    cfg = rt.cfg
    manifest = {
        "run_id": store.run_id,
        "name": cfg.name,
        "status": status,
        "config": cfg.model_dump(mode="json"),
        "n_samples": len(rt.indices),
        "n_shards": units.n_shards,
        # Reports name the classes in example grids without loading the dataset.
        "class_names": [str(c) for c in getattr(rt.dataset, "class_names", ())],
        "updated_at": dt.datetime.now(dt.UTC).isoformat(),
        "weights": weights_record(rt),
        "units": unit_records(units),
        **provenance(cfg),
        **(extra or {}),
    }
    with contextlib.suppress(StorageError):
        old = store.read_manifest()
        manifest.setdefault("created_at", old.get("created_at"))
    manifest.setdefault("created_at", manifest["updated_at"])
    if manifest["created_at"] is None:
        manifest["created_at"] = manifest["updated_at"]
    store.write_manifest(manifest)
