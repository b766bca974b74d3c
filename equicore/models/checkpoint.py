"""Safe checkpoint loading and saving.

Every checkpoint goes through ``torch.load(..., weights_only=True)``: a file that pickles code (any global other
than tensors and plain containers) is refused, never executed. Failures raise ``CheckpointError`` naming the path.

Integrity: a checkpoint with a card beside it (``<file>.card.json``, written by ``save_checkpoint``; every shipped
file has one) must hold exactly the tensors whose ``weights_digest`` the card records, else ``CheckpointError``
naming the file and both digests. Shipped weights (under ``weights/``) without a card are refused. The digest is
computed once per process per file version (path, size, mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from equicore.errors import CheckpointError

# Keys under which training scripts commonly nest the state_dict ({"epoch": .., "state_dict": {...}}).
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
_NBT = "num_batches_tracked"
_MAX_LISTED = 5  # how many offending keys an error message lists before "... and N more"
SHIPPED_DIR = Path(__file__).resolve().parent / "weights"  # = equicore.models.common.WEIGHTS_DIR
_DIGESTS: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> weights_digest of its tensors


def load_checkpoint(path: str | os.PathLike[str], *, expected: str = "") -> dict[str, Tensor]:
    """Read a state_dict (raw or wrapped in ``{"state_dict": ...}`` / ``{"model": ...}``) with weights_only=True.

    A ``module.`` prefix (from ``nn.DataParallel``) is stripped. ``expected`` names the model the file is meant
    for and only appears in error messages.
    """
    p = Path(path)
    what = f" for model {expected!r}" if expected else ""
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}{what}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint is not a file: {p}{what}")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; the refusal below says what matters.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except PermissionError as exc:
        raise CheckpointError(f"cannot read checkpoint {p}: {exc.strerror}") from None
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        operand = re.search(r"Unsupported operand \d+", msg)
        if operand:  # random bytes, or a pickle torch.save did not write (e.g. pickle.dump of objects)
            raise CheckpointError(
                f"refusing to load {p}: it is not a checkpoint of tensors that the safe loader (weights_only=True) "
                f"can read ({operand.group(0)}: garbage, or a plain pickle); re-save it with "
                "torch.save(model.state_dict(), path)"
            ) from None
        if "Weights only load failed" in msg or "Unsupported" in msg:
            detail = _unpickler_detail(msg)
            raise CheckpointError(
                f"refusing to load {p}: it contains Python objects other than tensors (weights_only=True)"
                + (f"; {detail}" if detail else "")
                + ". Re-save it as a plain state_dict of tensors."
            ) from None
        raise CheckpointError(f"checkpoint {p} is truncated or corrupt: {msg[:200]}") from None
    except (EOFError, RuntimeError, KeyError, ValueError, OSError, AttributeError, IndexError) as exc:
        # torch.load reports a damaged file with a variety of exception types; what they share is "unreadable".
        reason = str(exc).strip().splitlines()[0].split(". ")[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {p} is truncated or corrupt ({reason})") from None
    state = _extract_state_dict(obj, p)
    verify_against_card(p, state)
    return state


def _file_identity(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def checkpoint_digest(path: str | os.PathLike[str], state: Mapping[str, Tensor] | None = None) -> str:
    """``weights_digest`` of the checkpoint file at ``path`` (of ``state`` when already read from it), computed
    once per process per file version: the same path, size and mtime give the cached digest."""
    p = Path(path)
    ident = _file_identity(p)
    digest = _DIGESTS.get(ident)
    if digest is None:
        digest = weights_digest(state if state is not None else load_checkpoint(p))
        _DIGESTS[ident] = digest
    return digest


def is_shipped(path: str | os.PathLike[str]) -> bool:
    """True for a file under the package's shipped ``weights/`` folder (models and heads)."""
    try:
        return Path(path).resolve().is_relative_to(SHIPPED_DIR)
    except (OSError, RuntimeError):
        return False


def verify_against_card(path: Path, state: Mapping[str, Tensor]) -> None:
    """CheckpointError unless the tensors read from ``path`` are those its card records (no card: nothing to check,
    except that shipped weights must have one)."""
    shipped = is_shipped(path)
    card = read_card(path)
    recorded = card.get("weights_digest") if isinstance(card, dict) else None
    if not isinstance(recorded, str) or not recorded:
        if shipped:
            raise CheckpointError(
                f"shipped weights {path} have no card with a weights digest ({card_path(path).name}) to verify them "
                "against; reinstall equirobust"
            )
        return
    actual = checkpoint_digest(path, state)
    if actual != recorded:
        what = (
            f"shipped weights {path} do not match their card"
            if shipped
            else f"checkpoint {path} does not match its card"
        )
        fix = "reinstall equirobust or rebuild them with `equi train`" if shipped else "re-save it with its card"
        raise CheckpointError(
            f"{what}: weights digest {actual} (file) vs {recorded} (recorded in {card_path(path).name}); the file was "
            f"altered or replaced: {fix}"
        )


def _unpickler_detail(msg: str) -> str:
    """The one useful line of torch's long weights_only message, e.g. 'Unsupported global: GLOBAL __main__.Foo'."""
    m = re.search(r"Unsupported [^.]*?: (?:GLOBAL )?[\w.]+", msg) or re.search(r"unsupported GLOBAL [\w.]+", msg)
    return m.group(0) if m else ""


def _extract_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    sd = obj
    for _ in range(3):  # unwrap at most a few levels ({"model": {"state_dict": ...}} is seen in the wild)
        if isinstance(sd, Mapping) and not _is_tensor_dict(sd):
            inner = next((sd[k] for k in _WRAPPER_KEYS if k in sd and isinstance(sd[k], Mapping)), None)
            if inner is None:
                break
            sd = inner
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(f"checkpoint {path} does not hold a state_dict (found {type(obj).__name__})")
    if not _is_tensor_dict(sd):
        bad = [k for k, v in sd.items() if not isinstance(v, Tensor)][:_MAX_LISTED]
        raise CheckpointError(
            f"checkpoint {path} does not hold a state_dict of tensors: non-tensor entries {bad} "
            f"(expected a raw state_dict or one under {list(_WRAPPER_KEYS)})"
        )
    out = {str(k): v for k, v in sd.items()}
    if all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    # NaN weights would only surface later as NaN features deep inside an attack; name the tensors now.
    broken = [k for k, v in out.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise CheckpointError(
            f"checkpoint {path}: tensor(s) {_listed(broken)} contain NaN/Inf (expected finite weights)"
        )
    return out


def _is_tensor_dict(d: Mapping[Any, Any]) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in d.items())


def _listed(items: list[str]) -> str:
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return "[" + ", ".join(items[:_MAX_LISTED]) + more + "]"


def load_into(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True, name: str = "") -> nn.Module:
    """Load the checkpoint at ``path`` into ``model``; a file of another architecture raises ``CheckpointError``.

    Shape mismatches are always errors; missing/unexpected keys only when ``strict``. Returns ``model``.
    """
    label = name or type(model).__name__
    return load_state_into(model, load_checkpoint(path, expected=label), source=path, strict=strict, name=label)


def load_state_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    source: str | os.PathLike[str] = "state_dict",
    strict: bool = True,
    name: str = "",
) -> nn.Module:
    """``load_into`` for a state_dict already read by ``load_checkpoint`` (``source`` names it in errors)."""
    label = name or type(model).__name__
    sd = dict(state_dict)
    own = model.state_dict()
    # BatchNorm fills a missing num_batches_tracked (old checkpoints predate it) and FrozenBatchNorm2d drops an
    # extra one, so neither is a real mismatch.
    missing = sorted(k for k in set(own) - set(sd) if not k.endswith(_NBT))
    unexpected = sorted(k for k in set(sd) - set(own) if not k.endswith(_NBT))
    shapes = [
        f"{k} {_shape(sd[k])} vs {_shape(own[k])}" for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape
    ]
    problems = []
    if strict and missing:
        problems.append(f"missing keys {_listed(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected {_listed(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_listed(shapes)} (file vs model)")
    if problems:
        raise CheckpointError(f"{_source(source)} does not fit model {label!r}: " + ", ".join(problems))
    if not strict:
        sd = {k: v for k, v in sd.items() if k in own}
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as exc:  # anything the key/shape checks above did not foresee
        raise CheckpointError(f"{_source(source)} does not fit model {label!r}: {exc}") from None
    return model


def _source(source: str | os.PathLike[str]) -> str:
    return str(Path(source)) if isinstance(source, os.PathLike) else str(source)


def _shape(t: Tensor) -> str:
    return "[" + ",".join(str(s) for s in t.shape) + "]"


def weights_digest(model_or_path: nn.Module | Mapping[str, Tensor] | str | os.PathLike[str]) -> str:
    """sha256 over the state_dict's (name, dtype, shape, bytes) in sorted name order; used in cache keys.

    A model and a checkpoint file holding the same tensors give the same digest.
    """
    if isinstance(model_or_path, nn.Module):
        sd: Mapping[str, Tensor] = model_or_path.state_dict()
    elif isinstance(model_or_path, Mapping):
        sd = model_or_path
    else:
        sd = load_checkpoint(model_or_path)
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(b"\0" + str(t.dtype).encode() + b"\0" + repr(tuple(t.shape)).encode() + b"\0")
        # A uint8 view gives the raw bytes for every dtype (numpy has no bfloat16).
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def card_path(path: str | os.PathLike[str]) -> Path:
    """The model card's path next to a checkpoint: ``<path>.card.json``."""
    return Path(f"{os.fspath(path)}.card.json")


def save_checkpoint(
    model: nn.Module | Mapping[str, Tensor], path: str | os.PathLike[str], meta: dict[str, Any] | None = None
) -> Path:
    """Write the state_dict atomically (temp file + rename) and, when ``meta`` is given, a JSON card beside it.

    The card gets the ``weights_digest`` added, so a card always describes the exact file it sits next to.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    sd = {k: v.detach().to("cpu").clone() for k, v in sd.items()}
    _atomic_write(p, lambda f: torch.save(sd, f))
    if meta is not None:
        card = {**meta, "weights_digest": weights_digest(sd)}
        text = json.dumps(card, indent=2, sort_keys=True, default=str) + "\n"
        _atomic_write(card_path(p), lambda f: f.write(text.encode()))
    return p


def read_card(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON card written beside a checkpoint by ``save_checkpoint``, or None when there is none."""
    cp = card_path(path)
    if not cp.exists():
        return None
    try:
        return json.loads(cp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"model card {cp} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read model card {cp}: {exc.strerror}") from None


def _atomic_write(target: Path, write: Any) -> None:
    # Same directory as the target so os.replace is a rename on one filesystem (atomic on POSIX).
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
