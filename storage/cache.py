"""Zarr 3 cache of adversarial examples, one group per content key and one array per shard.

On-disk layout (``root`` is the cache directory)::

    root/<key>.zarr/zarr.json                    group; attributes = the canonical config (for humans)
    root/<key>.zarr/shard_00003-<token>/...      one immutable array version per write, chunked along samples
    root/<key>.zarr/done/shard_00003.json        completion marker, written LAST and atomically
    root/<key>.zarr/locks/shard_00003.lock       flock'd while a writer swaps the marker

The marker is the only source of truth: it names the array version, the sample ids, shape, dtype, the sha256 of
the whole array (C order) and a short sha256 per sample. A shard without a marker does not exist, so a crashed or
concurrent writer can never expose a half-written shard; every writer writes its own uniquely named version and
then swaps the marker under a lock, and the replaced version is deleted afterwards. Chunks also carry a crc32c
codec, so a truncated or garbled chunk file fails to decode instead of yielding wrong numbers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from .atomic import atomic_write_json, fsync_dir, storage_error_from_oserror
from .errors import CacheCorruptError, CacheMissError, SchemaError, StorageError
from .faults import fault_point
from .keys import safe_component, to_canonical
from .locks import open_lock_file

__all__ = ["AdversarialCache"]

MARKER_FORMAT = 1
_SAMPLE_DIGEST_CHARS = 16  # 64 bits per sample is plenty to detect corruption and keeps markers small
_READ_RETRIES = 10  # a marker swapped by a concurrent writer mid-read is retried, not reported as corruption


def _shard_name(shard: int) -> str:
    return f"shard_{shard:05d}"


def _check_shard(shard: int) -> int:
    if isinstance(shard, bool) or not isinstance(shard, int | np.integer) or shard < 0:
        raise ValueError(f"shard must be a non-negative int, got {shard!r}")
    return int(shard)


def _digests(arr: np.ndarray) -> tuple[str, list[str]]:
    """(sha256 of the whole C-order array, truncated sha256 of each sample along axis 0)."""
    arr = np.ascontiguousarray(arr)
    whole = hashlib.sha256(arr.reshape(-1).view(np.uint8)).hexdigest()
    flat = arr.reshape(arr.shape[0], math.prod(arr.shape[1:])).view(np.uint8)
    per = [hashlib.sha256(flat[i]).hexdigest()[:_SAMPLE_DIGEST_CHARS] for i in range(arr.shape[0])]
    return whole, per


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _first_chunk_file(version_dir: Path) -> Path | None:
    return next((p for p in sorted((version_dir / "c").rglob("*")) if p.is_file()), None)


def _fill_value(dtype: np.dtype) -> Any:
    # NaN for floats so a missing chunk file can never read back as plausible data.
    if dtype.kind in "fc":
        return float("nan")
    if dtype.kind == "b":
        return False
    return 0


class AdversarialCache:
    """Adversarial images per (cache key, shard), stored as Zarr 3 arrays with checksummed completion markers."""

    def __init__(
        self,
        root: str | Path,
        *,
        chunk_bytes: int = 4 << 20,
        compression_level: int = 1,
        lock_timeout_s: float = 120.0,
        durable: bool = True,
    ) -> None:
        self.root = Path(root)
        self.chunk_bytes = int(chunk_bytes)
        self.compression_level = int(compression_level)
        self.lock_timeout_s = float(lock_timeout_s)
        self.durable = durable

    # ------------------------------------------------------------------ paths
    def path(self, key: str) -> Path:
        """Directory of the Zarr group for `key`."""
        return self.root / f"{safe_component(key, 'cache key')}.zarr"

    def marker_path(self, key: str, shard: int) -> Path:
        """Completion marker of (key, shard)."""
        return self.path(key) / "done" / f"{_shard_name(_check_shard(shard))}.json"

    def _lock_path(self, key: str, shard: int) -> Path:
        return self.path(key) / "locks" / f"{_shard_name(shard)}.lock"

    def _store(self, key: str, read_only: bool = False) -> LocalStore:
        return LocalStore(self.path(key), read_only=read_only)

    # ------------------------------------------------------------------ markers and locks
    def _load_marker(self, key: str, shard: int) -> dict[str, Any] | None:
        """The marker dict, None if absent; raises CacheCorruptError if it exists but cannot be parsed."""
        path = self.marker_path(key, shard)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read cache marker {path}: {exc}") from exc
        try:
            marker = json.loads(text)
            if marker.get("format") != MARKER_FORMAT or not isinstance(marker.get("array"), str):
                raise ValueError("unknown marker format")
            return marker
        except (ValueError, AttributeError) as exc:
            raise CacheCorruptError(
                f"cache key={key} shard={shard}: marker {path} is unreadable ({exc}); invalidate and regenerate",
                key=key,
                shard=shard,
            ) from exc

    @contextlib.contextmanager
    def _locked(self, key: str, shard: int) -> Iterator[None]:
        # flock is released by the kernel if the holder dies, so a killed worker never leaves a stale lock.
        path = self._lock_path(key, shard)
        fd = open_lock_file(path)
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StorageError(
                            f"timed out after {self.lock_timeout_s:.0f}s waiting for cache lock {path}"
                        ) from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)

    def _remove_version(self, key: str, name: str) -> None:
        shutil.rmtree(self.path(key) / name, ignore_errors=True)

    # ------------------------------------------------------------------ group
    def _ensure_group(self, key: str, meta: Mapping[str, Any] | None) -> None:
        if (self.path(key) / "zarr.json").exists():
            return
        attrs = {"equirobust_cache": {"key": key, "format": MARKER_FORMAT}, "config": to_canonical(meta or {})}
        try:
            zarr.create_group(store=self._store(key), attributes=attrs)
        except zarr.errors.ContainsGroupError:
            pass  # another writer created it first; its attributes describe the same config (same key)

    # ------------------------------------------------------------------ public API
    def has(self, key: str, shard: int) -> bool:
        """True if (key, shard) has a completion marker whose array metadata exists with the recorded shape."""
        try:
            marker = self._load_marker(key, shard)
        except StorageError:
            return False
        if marker is None:
            return False
        try:
            array_meta = json.loads((self.path(key) / marker["array"] / "zarr.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return list(array_meta.get("shape", [])) == list(marker.get("shape", [None]))

    def write(
        self,
        key: str,
        shard: int,
        array: np.ndarray,
        sample_ids: Sequence[str],
        meta: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = True,
    ) -> dict[str, Any]:
        """Store `array` ([N, ...], sample axis first) for (key, shard) and return its completion marker.

        The array is written to a fresh version, read back and checksummed, and only then is the marker written
        (atomically, under a per-shard lock). An existing shard is replaced; with ``overwrite=False`` a complete
        existing shard is kept and its marker returned.
        """
        shard = _check_shard(shard)
        safe_component(key, "cache key")
        if not isinstance(array, np.ndarray):
            raise SchemaError(f"cache key={key} shard={shard}: expected a numpy array, got {type(array).__name__}")
        if array.ndim < 1 or array.dtype.kind not in "biuf":
            raise SchemaError(
                f"cache key={key} shard={shard}: array must be numeric with a sample axis, got "
                f"dtype={array.dtype} shape={array.shape}"
            )
        ids = list(sample_ids)
        if len(ids) != array.shape[0] or not all(isinstance(s, str) for s in ids):
            raise SchemaError(
                f"cache key={key} shard={shard}: need one str sample id per row: {len(ids)} ids for "
                f"{array.shape[0]} samples"
            )
        if not overwrite and self.has(key, shard):
            return self._load_marker(key, shard) or {}

        # Native byte order so the dtype read back from Zarr equals the one recorded in the marker.
        arr = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
        meta_canon = to_canonical(meta or {})
        whole, per_sample = _digests(arr)
        sample_bytes = max(1, math.prod(arr.shape[1:]) * arr.dtype.itemsize)
        per_chunk = max(1, min(arr.shape[0] or 1, self.chunk_bytes // sample_bytes))
        name = f"{_shard_name(shard)}-{secrets.token_hex(6)}"
        version_dir = self.path(key) / name
        try:
            self._ensure_group(key, meta_canon)
            z = zarr.create_array(
                store=self._store(key),
                name=name,
                shape=arr.shape,
                dtype=arr.dtype,
                chunks=(per_chunk, *arr.shape[1:]),
                compressors=[ZstdCodec(level=self.compression_level), Crc32cCodec()],
                fill_value=_fill_value(arr.dtype),
                attributes={"key": key, "shard": shard, "sample_ids": ids},
                config={"write_empty_chunks": True},
            )
            if arr.size:
                z[...] = arr
            fault_point("zarr-chunk", shard, partial=lambda: _first_chunk_file(version_dir))
            if self.durable:
                self._fsync_tree(version_dir)
            marker = {
                "format": MARKER_FORMAT,
                "key": key,
                "shard": shard,
                "array": name,
                "shape": list(arr.shape),
                "dtype": arr.dtype.str,
                "chunk_samples": per_chunk,
                "n_chunks": math.ceil(arr.shape[0] / per_chunk) if arr.shape[0] else 0,
                "sample_ids": ids,
                "sha256": whole,
                "sample_sha256": per_sample,
                "nbytes": int(arr.nbytes),
                "meta": meta_canon,
                "written_at": _now(),
                "writer": {"host": socket.gethostname(), "pid": os.getpid()},
            }
            # Read back through a fresh handle before declaring the shard complete.
            self._read_verified(key, shard, marker)
        except OSError as exc:
            self._remove_version(key, name)
            raise storage_error_from_oserror(exc, version_dir, note="the shard was not marked complete") from exc
        except BaseException:
            self._remove_version(key, name)
            raise

        old: dict[str, Any] | None = None
        with self._locked(key, shard):
            try:
                old = self._load_marker(key, shard)
            except CacheCorruptError:
                old = None
            if not overwrite and old is not None and self.has(key, shard):
                self._remove_version(key, name)
                return old
            try:
                atomic_write_json(self.marker_path(key, shard), marker, fsync=self.durable)
            except BaseException:
                self._remove_version(key, name)  # the previous marker (if any) still points at intact data
                raise
        if old is not None and old.get("array") != name:
            # Readers holding the old marker retry when its version disappears (see `read`).
            self._remove_version(key, old["array"])
        return marker

    def read(self, key: str, shard: int) -> tuple[np.ndarray, list[str]]:
        """(array, sample_ids) of a complete shard, verified against the marker's checksums.

        Raises CacheMissError if the shard is not complete and CacheCorruptError (naming the bad samples) if the
        stored data does not match; call `invalidate` and regenerate in that case.
        """
        shard = _check_shard(shard)
        for attempt in range(_READ_RETRIES):
            marker = self._load_marker(key, shard)
            if marker is None:
                raise CacheMissError(
                    f"cache key={key} shard={shard} is not complete (no marker under {self.path(key)})"
                )
            try:
                return self._read_verified(key, shard, marker), list(marker["sample_ids"])
            except CacheCorruptError:
                try:
                    current = self._load_marker(key, shard)
                except CacheCorruptError:
                    current = None
                if current == marker or attempt == _READ_RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def verify(self, key: str, shard: int) -> bool:
        """True if (key, shard) is complete and every byte matches its checksums."""
        try:
            self.read(key, shard)
        except (CacheMissError, CacheCorruptError):
            return False
        return True

    def invalidate(self, key: str, shard: int) -> bool:
        """Remove the marker (and data) of (key, shard) so it is regenerated; True if something was removed."""
        shard = _check_shard(shard)
        if not self.path(key).exists():
            return False
        with self._locked(key, shard):
            marker_path = self.marker_path(key, shard)
            try:
                marker = self._load_marker(key, shard)
            except CacheCorruptError:
                marker = None
            existed = marker_path.exists()
            if existed:
                marker_path.unlink()
                fsync_dir(marker_path.parent)
        if marker is not None:
            self._remove_version(key, marker["array"])
        return existed

    def shards(self, key: str) -> list[int]:
        """Indices of the complete shards of `key` (cheap check, see `has`)."""
        done = self.path(key) / "done"
        if not done.is_dir():
            return []
        out = []
        for p in done.glob("shard_*.json"):
            try:
                idx = int(p.stem.removeprefix("shard_"))
            except ValueError:
                continue
            if self.has(key, idx):
                out.append(idx)
        return sorted(out)

    def keys(self) -> list[str]:
        """Cache keys that have a group in this cache."""
        if not self.root.is_dir():
            return []
        return sorted(p.name.removesuffix(".zarr") for p in self.root.glob("*.zarr") if (p / "zarr.json").exists())

    def describe(self, key: str) -> dict[str, Any]:
        """Config attributes and per-shard summary (no data read)."""
        group_path = self.path(key)
        try:
            attrs = json.loads((group_path / "zarr.json").read_text(encoding="utf-8")).get("attributes", {})
        except (OSError, ValueError):
            attrs = {}
        shards = []
        for idx in self.shards(key):
            try:
                m = self._load_marker(key, idx)
            except CacheCorruptError:
                continue
            if m is None:
                continue
            shards.append(
                {
                    "shard": idx,
                    "n_samples": m["shape"][0],
                    "shape": m["shape"],
                    "dtype": m["dtype"],
                    "sha256": m["sha256"],
                    "nbytes": m.get("nbytes"),
                    "written_at": m.get("written_at"),
                }
            )
        return {
            "key": key,
            "path": str(group_path),
            "config": attrs.get("config", {}),
            "shards": shards,
            "n_shards": len(shards),
            "n_samples": sum(s["n_samples"] for s in shards),
        }

    def prune(self, key: str | None = None, *, min_age_s: float = 3600.0) -> list[Path]:
        """Delete array versions no marker points to (left by crashed writers) older than `min_age_s`."""
        removed: list[Path] = []
        now = time.time()
        for k in [key] if key is not None else self.keys():
            group = self.path(k)
            if not group.is_dir():
                continue
            referenced = set()
            for marker_file in (group / "done").glob("shard_*.json"):
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    referenced.add(json.loads(marker_file.read_text(encoding="utf-8")).get("array"))
            for d in group.glob("shard_*-*"):
                if d.is_dir() and d.name not in referenced and now - d.stat().st_mtime >= min_age_s:
                    shutil.rmtree(d, ignore_errors=True)
                    removed.append(d)
        return removed

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _fsync_tree(directory: Path) -> None:
        for dirpath, _dirs, files in os.walk(directory):
            for f in files:
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(dirpath)
        fsync_dir(directory.parent)

    def _read_verified(self, key: str, shard: int, marker: Mapping[str, Any]) -> np.ndarray:
        """Read the array a marker points to and check it; raise CacheCorruptError naming bad samples."""
        ids: list[str] = list(marker["sample_ids"])
        where = f"cache key={key} shard={shard} ({self.path(key) / marker['array']})"

        def corrupt(reason: str, bad_samples: Sequence[str] = (), bad_chunks: Sequence[int] = ()) -> CacheCorruptError:
            shown = ", ".join(bad_samples[:10]) + (
                f", ... ({len(bad_samples)} in total)" if len(bad_samples) > 10 else ""
            )
            detail = f"; bad samples: {shown}" if bad_samples else ""
            return CacheCorruptError(
                f"{where} is corrupt: {reason}{detail}; call invalidate({key!r}, {shard}) and regenerate it",
                key=key,
                shard=shard,
                bad_samples=bad_samples,
                bad_chunks=bad_chunks,
            )

        try:
            z = zarr.open_array(store=self._store(key, read_only=True), path=marker["array"], mode="r")
        except Exception as exc:  # missing/garbled zarr.json surfaces as several zarr/json/OS error types
            raise corrupt(f"array metadata unreadable ({type(exc).__name__}: {exc})", ids) from exc
        shape = list(marker["shape"])
        if list(z.shape) != shape or z.dtype != np.dtype(marker["dtype"]):
            raise corrupt(f"stored shape/dtype {list(z.shape)}/{z.dtype} != marker {shape}/{marker['dtype']}", ids)

        expected = list(marker["sample_sha256"])
        try:
            data = np.asarray(z[...])
            whole, per_sample = _digests(data)
            if whole == marker["sha256"] and per_sample == expected:
                return data
        except Exception:  # a chunk failed to decode (crc32c/zstd); fall through to locate it
            pass

        # Slow path: decode chunk by chunk to pinpoint which samples are damaged.
        per_chunk = int(marker["chunk_samples"])
        n = shape[0]
        bad_samples: list[str] = []
        bad_chunks: list[int] = []
        reasons: list[str] = []
        for c, start in enumerate(range(0, n, per_chunk)):
            stop = min(n, start + per_chunk)
            chunk_key = z.metadata.encode_chunk_key((c,) + (0,) * (len(shape) - 1))
            chunk_file = self.path(key) / marker["array"] / chunk_key
            if not chunk_file.exists():
                bad_chunks.append(c)
                bad_samples.extend(ids[start:stop])
                reasons.append(f"chunk {c} ({chunk_key}) missing")
                continue
            try:
                block = np.asarray(z[start:stop])
            except Exception as exc:
                bad_chunks.append(c)
                bad_samples.extend(ids[start:stop])
                reasons.append(f"chunk {c} ({chunk_key}) undecodable ({type(exc).__name__}: {str(exc)[:60]})")
                continue
            _, block_sums = _digests(block)
            for i, (got, want) in enumerate(zip(block_sums, expected[start:stop], strict=True)):
                if got != want:
                    bad_samples.append(ids[start + i])
                    if not bad_chunks or bad_chunks[-1] != c:
                        bad_chunks.append(c)
                        reasons.append(f"chunk {c} ({chunk_key}) checksum mismatch")
        if not reasons:
            reasons.append("whole-array checksum mismatch")
        raise corrupt("; ".join(reasons[:5]), bad_samples, bad_chunks)
