"""Exact, checksummed JSON encoding of metric state (numpy arrays, ints, nested dicts/lists, bytes).

Arrays are stored as base64 of their raw bytes with dtype and shape, so int64 confusion matrices and float
accumulators come back bit-identical. Non-JSON structure is tagged with single-key dicts whose key starts with
"$" ({"$ndarray": ...}, {"$tuple": [...]}, {"$items": [[k, v], ...]} for dicts with non-str or "$" keys).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from typing import Any

import numpy as np

from .errors import SchemaError

__all__ = ["decode_state", "dumps_state", "encode_state", "loads_state", "state_sha256"]

_FLOAT_TAGS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _array_payload(a: np.ndarray | np.generic, path: str) -> dict[str, Any]:
    arr = np.asarray(a)
    if arr.dtype.kind not in "biufcSUmM" or arr.dtype.fields is not None:
        raise SchemaError(f"state{path}: numpy dtype {arr.dtype} cannot be stored exactly (object/structured)")
    # dtype.str keeps the byte order, so the bytes decode identically on any machine.
    return {"dtype": arr.dtype.str, "shape": list(arr.shape), "data": _b64(np.ascontiguousarray(arr).tobytes())}


def encode_state(obj: Any, _path: str = "") -> Any:
    """Convert state to JSON-native values with tags for arrays, tuples, bytes, non-finite floats."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return {"$float": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, np.ndarray):
        return {"$ndarray": _array_payload(obj, _path)}
    if isinstance(obj, np.generic):
        return {"$scalar": _array_payload(obj, _path)}
    if isinstance(obj, bytes | bytearray):
        return {"$bytes": _b64(bytes(obj))}
    if isinstance(obj, tuple):
        return {"$tuple": [encode_state(v, f"{_path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, f"{_path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: encode_state(v, f"{_path}[{k!r}]") for k, v in obj.items()}
        return {
            "$items": [
                [encode_state(k, f"{_path}<key {k!r}>"), encode_state(v, f"{_path}[{k!r}]")] for k, v in obj.items()
            ]
        }
    raise SchemaError(
        f"state{_path}: {type(obj).__name__} cannot be stored (use numpy arrays, numbers, str, "
        "bytes, lists, tuples or dicts)"
    )


def _decode_array(payload: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(payload["dtype"])
    shape = tuple(int(n) for n in payload["shape"])
    raw = base64.b64decode(payload["data"], validate=True)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def decode_state(obj: Any) -> Any:
    """Inverse of `encode_state`."""
    if isinstance(obj, list):
        return [decode_state(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, val),) = obj.items()
        if tag == "$ndarray":
            return _decode_array(val)
        if tag == "$scalar":
            return _decode_array(val)[()]
        if tag == "$bytes":
            return base64.b64decode(val, validate=True)
        if tag == "$tuple":
            return tuple(decode_state(v) for v in val)
        if tag == "$float":
            return _FLOAT_TAGS[val]
        if tag == "$items":
            return {decode_state(k): decode_state(v) for k, v in val}
    return {k: decode_state(v) for k, v in obj.items()}


def dumps_state(state: Any) -> bytes:
    """Encode state to compact UTF-8 JSON bytes (dict order preserved)."""
    return json.dumps(encode_state(state), separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()


def loads_state(data: bytes | str) -> Any:
    """Decode bytes produced by `dumps_state`."""
    return decode_state(json.loads(data))


def state_sha256(data: bytes) -> str:
    """Checksum recorded next to the encoded state."""
    return hashlib.sha256(data).hexdigest()
