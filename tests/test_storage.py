"""Tests for storage.keys, storage.atomic and storage.cache (the Zarr adversarial cache)."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from storage import StorageError
from storage import atomic as atomic_mod
from storage.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from storage.cache import AdversarialCache
from storage.errors import CacheCorruptError, CacheMissError, SchemaError
from storage.keys import canonical_json, code_version, content_key, source_digest

# ---------------------------------------------------------------------------------------------------- keys


def test_canonical_json_is_order_independent_and_compact() -> None:
    a = {"b": 1, "a": {"y": (1, 2.5), "x": [True, None]}}
    b = {"a": {"x": [True, None], "y": [1, 2.5]}, "b": 1}
    assert canonical_json(a) == canonical_json(b) == '{"a":{"x":[true,null],"y":[1,2.5]},"b":1}'


def test_canonical_json_numbers_and_rejections() -> None:
    # Integral floats and numpy scalars normalise, so YAML's `eps: 8` and `eps: 8.0` share a key.
    assert canonical_json({"eps": 8.0}) == canonical_json({"eps": 8}) == canonical_json({"eps": np.int64(8)})
    assert canonical_json(0.1) == "0.1"
    assert canonical_json(np.float32(0.5)) == "0.5"
    with pytest.raises(ValueError, match="NaN"):
        canonical_json({"a": [1.0, float("nan")]})
    with pytest.raises(ValueError, match=r"\$\.a"):
        canonical_json({"a": float("inf")})
    with pytest.raises(TypeError, match="str keys"):
        canonical_json({1: "x"})
    with pytest.raises(TypeError, match="object"):
        canonical_json({"f": object()})


def test_content_key_depends_on_config_and_code_version() -> None:
    k1 = content_key({"attack": "pgd", "eps": 8}, "0.1.0+abc")
    assert k1 == content_key({"eps": 8.0, "attack": "pgd"}, "0.1.0+abc")
    assert len(k1) == 24 and all(c in "0123456789abcdef" for c in k1)
    assert k1 != content_key({"attack": "pgd", "eps": 8}, "0.1.0+abd")
    assert k1 != content_key({"attack": "pgd", "eps": 4}, "0.1.0+abc")


def test_source_digest_tracks_python_sources(tmp_path: Path) -> None:
    pkg = tmp_path / "equicore"
    (pkg / "attacks").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "attacks" / "pgd.py").write_text("STEP = 1\n")
    d1 = source_digest([pkg])
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "junk.py").write_text("x")
    (pkg / "notes.txt").write_text("not source")
    assert source_digest([pkg]) == d1
    (pkg / "attacks" / "pgd.py").write_text("STEP = 2\n")
    assert source_digest([pkg]) != d1
    version = code_version([pkg])
    assert version.endswith("+" + source_digest([pkg])) and "+" in version
    with pytest.raises(FileNotFoundError):
        source_digest([tmp_path / "missing"])


# ---------------------------------------------------------------------------------------------------- atomic


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def test_atomic_write_replaces_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.json"
    atomic_write_text(target, "old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert _leftovers(target.parent) == []


def test_atomic_path_temp_name_and_failure_keeps_old(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent
            assert tmp.name.startswith(".data.bin.tmp-" + str(os.getpid()) + "-")
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_atomic_replace_failure_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(atomic_mod.os, "replace", broken_replace)
    with pytest.raises(StorageError, match="data.bin"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_disk_full_raises_storage_error_and_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "results.json"
    target.write_text("previous")

    def write_then_fill_disk(fd: int, data: bytes) -> None:
        os.write(fd, bytes(data)[:3])  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic_mod, "_write_all", write_then_fill_disk)
    with pytest.raises(StorageError, match="no space left on device") as info:
        atomic_write_text(target, "a much longer replacement")
    assert str(target) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert target.read_text() == "previous"
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------- cache

KEY = "k0123456789abcdef0123456"


def _images(n: int = 6, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).random((n, 3, 8, 8), dtype=np.float32)
    x[0, 0, 0, :4] = [0.0, -0.0, np.float32(1e-45), 1.0]  # signed zero and a denormal must survive bit-exactly
    return x


def _ids(n: int = 6) -> list[str]:
    return [f"img{i:03d}" for i in range(n)]


@pytest.fixture()
def cache(tmp_path: Path) -> AdversarialCache:
    # Two samples per chunk, so corruption tests can hit one chunk among several.
    return AdversarialCache(tmp_path / "cache", chunk_bytes=2 * 3 * 8 * 8 * 4, durable=False)


def test_cache_round_trip_is_bit_exact(cache: AdversarialCache) -> None:
    x = _images()
    assert not cache.has(KEY, 2)
    with pytest.raises(CacheMissError):
        cache.read(KEY, 2)
    marker = cache.write(KEY, 2, x, _ids(), {"attack": "pgd", "eps": 8.0, "model": "sha256:abc"})
    assert cache.has(KEY, 2) and not cache.has(KEY, 3)
    y, ids = cache.read(KEY, 2)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert y.tobytes() == x.tobytes()
    assert ids == _ids()
    assert marker["n_chunks"] == 3 and len(marker["sample_sha256"]) == 6
    assert cache.verify(KEY, 2)
    assert cache.shards(KEY) == [2]
    assert cache.keys() == [KEY]
    info = cache.describe(KEY)
    assert info["config"] == {"attack": "pgd", "eps": 8, "model": "sha256:abc"}
    assert info["n_samples"] == 6 and info["shards"][0]["shard"] == 2
    marker_file = cache.marker_path(KEY, 2)
    assert marker_file == cache.path(KEY) / "done" / "shard_00002.json"
    assert json.loads(marker_file.read_text())["sample_ids"] == _ids()


def test_cache_empty_and_integer_shards(cache: AdversarialCache) -> None:
    cache.write(KEY, 0, np.zeros((0, 3, 8, 8), np.float32), [])
    y, ids = cache.read(KEY, 0)
    assert y.shape == (0, 3, 8, 8) and ids == []
    labels = np.array([0, 7, 2**40], dtype=np.int64)
    cache.write(KEY, 1, labels, ["a", "b", "c"])
    np.testing.assert_array_equal(cache.read(KEY, 1)[0], labels)


def test_cache_rejects_bad_input(cache: AdversarialCache) -> None:
    with pytest.raises(SchemaError, match="sample id"):
        cache.write(KEY, 0, _images(), _ids(5))
    with pytest.raises(SchemaError, match="numpy"):
        cache.write(KEY, 0, [[1.0]], ["a"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache key"):
        cache.write("../escape", 0, _images(), _ids())
    with pytest.raises(ValueError, match="shard"):
        cache.has(KEY, -1)


def test_has_is_false_until_marker_written(cache: AdversarialCache, monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.cache as cache_mod

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # the worker dies after the data but before the marker

    monkeypatch.setattr(cache_mod, "atomic_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.write(KEY, 4, _images(), _ids())
    monkeypatch.undo()
    assert not cache.has(KEY, 4)
    assert cache.shards(KEY) == []
    with pytest.raises(CacheMissError):
        cache.read(KEY, 4)
    assert list(cache.path(KEY).glob("shard_00004-*")) == []  # the unmarked version was cleaned up


def _chunk_file(cache: AdversarialCache, marker: dict, chunk: int) -> Path:
    return cache.path(KEY) / marker["array"] / "c" / str(chunk) / "0" / "0" / "0"


@pytest.mark.parametrize("damage", ["garbage", "truncate", "delete", "swap"])
def test_corrupt_chunk_is_detected_and_pinpointed(cache: AdversarialCache, damage: str) -> None:
    marker = cache.write(KEY, 1, _images(), _ids())
    f = _chunk_file(cache, marker, 1)
    data = f.read_bytes()
    if damage == "garbage":
        f.write_bytes(np.random.default_rng(1).bytes(len(data)))
    elif damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        f.unlink()
    else:  # a valid chunk in the wrong place decodes fine: only the per-sample checksums catch it
        f.write_bytes(_chunk_file(cache, marker, 2).read_bytes())
    assert cache.has(KEY, 1)  # the cheap check does not read data
    with pytest.raises(CacheCorruptError) as info:
        cache.read(KEY, 1)
    err = info.value
    assert err.key == KEY and err.shard == 1
    assert err.bad_samples == ["img002", "img003"]
    assert err.bad_chunks == [1]
    assert "img002" in str(err) and KEY in str(err) and "shard=1" in str(err)
    assert not cache.verify(KEY, 1)

    assert cache.invalidate(KEY, 1)
    assert not cache.has(KEY, 1)
    assert not (cache.path(KEY) / marker["array"]).exists()
    cache.write(KEY, 1, _images(), _ids())
    assert cache.read(KEY, 1)[0].tobytes() == _images().tobytes()


def test_corrupt_or_inconsistent_marker(cache: AdversarialCache) -> None:
    cache.write(KEY, 0, _images(), _ids())
    marker_file = cache.marker_path(KEY, 0)
    good = marker_file.read_text()
    marker = json.loads(good)
    marker["shape"][0] = 7
    marker_file.write_text(json.dumps(marker))
    assert not cache.has(KEY, 0)  # shape recorded in the marker != shape of the stored array
    marker_file.write_text(good[: len(good) // 2])
    assert not cache.has(KEY, 0)
    with pytest.raises(CacheCorruptError, match="marker"):
        cache.read(KEY, 0)
    assert cache.invalidate(KEY, 0)
    assert not marker_file.exists()


def test_rewrite_replaces_and_overwrite_false_keeps(cache: AdversarialCache) -> None:
    cache.write(KEY, 5, _images(seed=0), _ids())
    cache.write(KEY, 5, _images(seed=1), _ids())
    assert cache.read(KEY, 5)[0].tobytes() == _images(seed=1).tobytes()
    assert len(list(cache.path(KEY).glob("shard_00005-*"))) == 1  # the replaced version is gone
    kept = cache.write(KEY, 5, _images(seed=2), _ids(), overwrite=False)
    assert cache.read(KEY, 5)[0].tobytes() == _images(seed=1).tobytes()
    assert kept["array"] == json.loads(cache.marker_path(KEY, 5).read_text())["array"]


def test_prune_removes_orphan_versions(cache: AdversarialCache) -> None:
    marker = cache.write(KEY, 0, _images(), _ids())
    orphan = cache.path(KEY) / "shard_00000-deadbeef0000"
    orphan.mkdir()
    (orphan / "zarr.json").write_text("{}")
    assert cache.prune(KEY, min_age_s=3600) == []  # too young: it may belong to a running writer
    assert cache.prune(KEY, min_age_s=0) == [orphan]
    assert (cache.path(KEY) / marker["array"]).exists()
    assert cache.verify(KEY, 0)


def _concurrent_writer(root: str, writer: int, rounds: int) -> None:
    c = AdversarialCache(root, chunk_bytes=2 * 3 * 8 * 8 * 4, durable=False)
    for _ in range(rounds):
        c.write(KEY, 7, _images(seed=writer), _ids(), {"writer": writer})


def test_concurrent_writers_leave_one_valid_shard(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    # spawn: zarr runs an event-loop thread, which must not be inherited across fork.
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_concurrent_writer, args=(str(root), w, 4)) for w in (1, 2)]
    for p in procs:
        p.start()
    reader = AdversarialCache(root)
    candidates = {_images(seed=1).tobytes(), _images(seed=2).tobytes()}
    reads = 0
    while any(p.is_alive() for p in procs):
        try:
            y, _ = reader.read(KEY, 7)  # never a CacheCorruptError while writers swap versions
        except CacheMissError:
            time.sleep(0.005)
            continue
        assert y.tobytes() in candidates
        reads += 1
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    y, ids = reader.read(KEY, 7)
    assert y.tobytes() in candidates and ids == _ids()
    assert sorted(p.name for p in (reader.path(KEY) / "done").iterdir()) == ["shard_00007.json"]
    assert len(list(reader.path(KEY).glob("shard_00007-*"))) == 1
    assert not [p for p in (reader.path(KEY) / "done").iterdir() if ".tmp-" in p.name]


def test_cache_write_disk_full(cache: AdversarialCache, monkeypatch: pytest.MonkeyPatch) -> None:
    cache.write(KEY, 3, _images(seed=0), _ids())
    import storage.cache as cache_mod

    real_create = cache_mod.zarr.create_array

    def full_disk(*args: object, **kwargs: object) -> object:
        real_create(*args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_mod.zarr, "create_array", full_disk)
    with pytest.raises(StorageError, match="no space left on device") as info:
        cache.write(KEY, 3, _images(seed=1), _ids())
    assert "shard_00003" in str(info.value)
    monkeypatch.undo()
    assert cache.read(KEY, 3)[0].tobytes() == _images(seed=0).tobytes()
    assert len(list(cache.path(KEY).glob("shard_00003-*"))) == 1


def test_storage_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, storage.cache, storage.results, storage.query; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------- run lock
_HOLD_LOCK = """
import sys, time
from storage.locks import run_lock
with run_lock(sys.argv[1], "r1"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_run_lock_is_exclusive_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    import signal
    import subprocess

    from storage.errors import RunLockedError
    from storage.locks import lock_holder, run_lock

    repo = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], cwd=repo, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        assert lock_holder(tmp_path, "r1")["pid"] == child.pid
        with pytest.raises(RunLockedError, match=rf"run r1 is already running \(pid {child.pid} on "):
            with run_lock(tmp_path, "r1"):
                pass
        with run_lock(tmp_path, "r2"):  # other runs are not affected
            pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    # The kernel released the flock with the killed holder: no stale lock.
    assert lock_holder(tmp_path, "r1") is None
    with run_lock(tmp_path, "r1"):
        assert lock_holder(tmp_path, "r1")["pid"] == os.getpid()


# ---------------------------------------------------------------------------------------------------- fault rules
def test_fault_rules_count_per_shard_and_reject_unknown_actions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from storage.errors import DiskFullError
    from storage.faults import InjectedFault, fault_point, hits

    monkeypatch.setenv("EQUI_FAULTS_DIR", str(tmp_path))
    monkeypatch.setenv("EQUI_FAULTS", "parquet:2:1:enospc,defend:*:2")
    target = tmp_path / "half"
    target.write_bytes(b"x" * 100)
    with pytest.raises(StorageError) as info, atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"y" * 10)
        fault_point("parquet", 2, partial=target)
    assert isinstance(info.value, DiskFullError) and target.stat().st_size == 50
    assert not (tmp_path / "out.bin").exists()
    fault_point("parquet", 2)  # once only
    fault_point("parquet", 3)  # another shard
    for _ in range(2):
        with pytest.raises(InjectedFault):
            fault_point("defend", 5)
    fault_point("defend", 5)
    assert hits("defend", 5, rule_shard="*") == [os.getpid()] * 3
    monkeypatch.setenv("EQUI_FAULTS", "attack:0:1:explode")
    with pytest.raises(ValueError, match="unknown action 'explode'"):
        fault_point("attack", 0)
    monkeypatch.delenv("EQUI_FAULTS")
    fault_point("attack", 0)  # unset: a no-op
