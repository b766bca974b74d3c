"""Models a user brings: a factory function in their own module, or a whole-model file (torch.export / TorchScript).

Nothing here decides *whether* user code may run: a config names its factory module explicitly (``model.factory``
with ``plugins:``, resolved by :mod:`tasks.user_code`), and this module only imports that one file by its path.

- :func:`import_module_file` imports a module (and its parent packages) from files, under its own name, and
  re-imports it when the file changed since (so a process never runs stale code under a new digest).
- :func:`build_factory_model` calls the factory with the config's ``params`` and loads a state_dict checkpoint into
  what it returns (``weights_only=True``, strict).
- :func:`load_model_file` reads a ``torch.export`` program (``.pt2``) or a TorchScript archive. ``torch.export.load``
  falls back to unrestricted unpickling for some entries, so every pickled entry of a ``.pt2`` is first checked with
  ``torch.load(..., weights_only=True)`` and archives holding Python objects or compiled code are refused.
  Programs are unflattened (:func:`torch.export.unflatten`) so their submodules keep their names and forward hooks
  work (a ``feature_layer`` can be hooked); TorchScript modules refuse Python hooks, so they take
  ``feature_layer: logits`` only.
- :class:`InputNormalized` puts a ``(x - mean) / std`` in front of a model that expects normalised input (the
  pipeline's images are in [0, 1]; the built-in models normalise themselves).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from equicore.adapters.base import unwrap_output
from equicore.errors import CheckpointError, InvalidInputError
from equicore.models.checkpoint import load_into
from equicore.models.common import Normalize
from equicore.registry import accepted_params

_IMPORTED: dict[str, tuple[str, str]] = {}  # module name -> (file, sha256 of its bytes when imported)


class UserModelError(InvalidInputError):
    """A user's factory, model file or model output does not do what the config declares."""


_SHA256: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> digest


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, computed once per process per file version (keys ask for it per unit)."""
    p = Path(path).resolve()
    st = p.stat()
    ident = (str(p), st.st_size, st.st_mtime_ns)
    if ident not in _SHA256:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA256[ident] = h.hexdigest()
    return _SHA256[ident]


# ------------------------------------------------------------------------------------------------ factories
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def import_module_file(
    name: str, file: Path, package_dirs: Sequence[Path] = (), search_root: Path | None = None
) -> Any:
    """Import module ``name`` from ``file``; ``package_dirs`` are the folders of its parent packages, outermost
    first (``a.b.c`` from ``root/a/b/c.py`` -> ``[root/a, root/a/b]``). ``search_root`` goes to the end of
    ``sys.path`` so the module's own ``import helper`` finds its neighbours (it cannot shadow installed modules)."""
    if search_root is not None and str(search_root) not in sys.path:
        sys.path.append(str(search_root))
    parts = name.split(".")
    for i, pkg_dir in enumerate(package_dirs):
        _import_one(".".join(parts[: i + 1]), pkg_dir / "__init__.py", pkg_dir)
    return _import_one(name, file, file.parent if file.name == "__init__.py" else None)


def _import_one(name: str, file: Path, package_dir: Path | None) -> ModuleType:
    file = file.resolve()
    digest = file_sha256(file)
    loaded = sys.modules.get(name)
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
        ours = name in _IMPORTED  # a user module imported here before (another config's): replaced by this file
        if not ours and (origin is None or Path(origin).resolve() != file):
            raise UserModelError(
                f"cannot import {file} as module {name!r}: a module of that name is already imported from "
                f"{origin or 'a built-in'}; rename your file"
            )
        if _IMPORTED.get(name) == (str(file), digest):
            return loaded
    locations = [str(package_dir)] if package_dir is not None else None
    spec = importlib.util.spec_from_file_location(name, file, submodule_search_locations=locations)
    if spec is None or spec.loader is None:
        raise UserModelError(f"cannot import {file}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    no_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # no __pycache__ written into the user's folder: a run writes only its outputs
    try:
        spec.loader.exec_module(module)  # the user's own code, named explicitly by model.factory
    except BaseException as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise UserModelError(f"importing {file} failed ({_first_line(exc)})") from None
    finally:
        sys.dont_write_bytecode = no_bytecode
    _IMPORTED[name] = (str(file), digest)
    return module


def factory_callable(module: Any, attr: str, spec: str, file: Path) -> Callable[..., Any]:
    fn = getattr(module, attr, None)
    if fn is None:
        raise UserModelError(f"model.factory {spec!r}: {file} has no attribute {attr!r}")
    if not callable(fn):
        raise UserModelError(f"model.factory {spec!r}: {attr} in {file} is a {type(fn).__name__}, not callable")
    return fn


def build_factory_model(
    fn: Callable[..., Any], spec: str, params: Mapping[str, Any], checkpoint: str | os.PathLike[str] | None
) -> nn.Module:
    """``fn(**params)``, which must return an ``nn.Module``; then ``checkpoint`` (a state_dict) loaded strictly."""
    accepted = accepted_params(fn)
    unknown = sorted(set(params) - accepted) if accepted is not None else []
    if unknown:
        raise UserModelError(
            f"model.params: factory {spec!r} got unknown parameter(s) {unknown}; it accepts {sorted(accepted or ())}"
        )
    try:
        model = fn(**params)
    except Exception as exc:  # noqa: BLE001  (the user's code: report it in one line, naming the factory)
        raise UserModelError(f"model.factory {spec!r}: calling it failed ({_first_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise UserModelError(
            f"model.factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module (return the model "
            "itself, e.g. `return Net()`)"
        )
    if checkpoint is not None:
        load_into(model, checkpoint, strict=True, name=spec)
    return model.eval()


# ------------------------------------------------------------------------------------------------ model files
def model_file_kind(path: Path) -> str:
    """``"export"`` (a ``torch.export.save`` archive) or ``"torchscript"`` (``torch.jit.save``); CheckpointError
    for anything else, e.g. a state_dict (which goes in ``model.checkpoint`` with a name or factory)."""
    if not path.exists():
        raise CheckpointError(f"model file not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"model file is not a file: {path}")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(
            f"model file {path} is not a torch.export (.pt2) or TorchScript archive ({_first_line(exc)})"
        ) from None
    if any(n.split("/", 1)[-1] == "archive_format" for n in names):
        return "export"
    if any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    raise CheckpointError(
        f"model file {path} is neither a torch.export program (torch.export.save) nor a TorchScript archive "
        "(torch.jit.save); a state_dict goes in model.checkpoint, with model.name or model.factory"
    )


def _is_pickled(blob: bytes) -> bool:
    return blob[:2] == b"PK" or blob[:1] == b"\x80"  # a torch.save zip, or a pickle (protocol >= 2)


def check_export_archive(path: Path) -> None:
    """Refuse a ``.pt2`` whose loading would unpickle anything but tensors, or load compiled code.

    Raw tensor payloads (listed with ``use_pickle: false`` in the weights/constants configs) are bytes, not
    pickles; every other binary entry must load with ``weights_only=True``.
    """
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        raw: set[str] = set()
        for n in names:
            if n.endswith("_config.json") and "/data/" in n:
                folder = n.rsplit("/", 1)[0]
                try:
                    entries = json.loads(z.read(n)).get("config", {})
                except (ValueError, AttributeError):
                    raise CheckpointError(f"model file {path}: {n} is not valid JSON") from None
                for meta in entries.values():
                    name = str(meta.get("path_name", ""))
                    if "custom_obj" in name or "opaque_obj" in name:
                        raise CheckpointError(
                            f"refusing to load {path}: it holds Python or script objects ({name}) that load through "
                            "pickle; export a program of tensors only"
                        )
                    if not meta.get("use_pickle"):
                        raw.add(f"{folder}/{name}")
        for n in names:
            if "/aotinductor/" in n or n.endswith((".so", ".dll", ".dylib")):
                raise CheckpointError(
                    f"refusing to load {path}: it holds compiled code ({n}); save the program with torch.export.save"
                )
            if n in raw or n.endswith((".json", "/")):
                continue
            blob = z.read(n)
            if not _is_pickled(blob):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001  (the safe loader's refusal, whatever its type)
                raise CheckpointError(
                    f"refusing to load {path}: entry {n} is not readable by the safe loader (weights_only=True): "
                    f"{_first_line(exc)[:200]}"
                ) from None


def load_model_file(path: str | os.PathLike[str]) -> tuple[nn.Module, str]:
    """(module in eval mode, kind) of a ``.pt2`` program or TorchScript archive at ``path``."""
    p = Path(path)
    kind = model_file_kind(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "export":
                check_export_archive(p)
                model: nn.Module = torch.export.unflatten(torch.export.load(p))
            else:
                model = torch.jit.load(str(p), map_location="cpu")
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001  (torch reports damaged archives with many exception types)
        what = "torch.export program" if kind == "export" else "TorchScript archive"
        raise CheckpointError(f"model file {p}: cannot load the {what} ({_first_line(exc)[:300]})") from None
    return model.eval(), kind


# ------------------------------------------------------------------------------------------------ wrappers
class InputNormalized(nn.Module):
    """``net((x - mean) / std)``: for a model that expects normalised input. The wrapped model is ``net`` (so its
    layer ``layer3`` is ``net.layer3`` here); Normalize's buffers stay out of the state_dict."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: Tensor) -> Any:
        return self.net(self.normalize(x))


class InputNormalizedLowres(InputNormalized):
    """The same for a segmentation model with ``logits_lowres`` (the segmentation adapter's features)."""

    def logits_lowres(self, x: Tensor) -> Tensor:
        return self.net.logits_lowres(self.normalize(x))


def normalized(net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> InputNormalized:
    cls = InputNormalizedLowres if callable(getattr(net, "logits_lowres", None)) else InputNormalized
    return cls(net, mean, std)


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


# ------------------------------------------------------------------------------------------------ checks
_SHAPES = {"classification": "B x K logits", "segmentation": "B x K x H x W logits"}


def check_output(model: nn.Module, x: Tensor, task: str, num_classes: int | None, label: str) -> None:
    """The model's output on ``x`` fits ``task`` (2-D logits for classification, 4-D for segmentation) and has
    ``num_classes`` channels; UserModelError naming the model and both shapes otherwise."""
    if task not in _SHAPES:
        return  # instance models: the instance adapter checks torchvision's detection outputs itself
    try:
        with torch.no_grad():
            out = unwrap_output(model(x))
    except Exception as exc:  # noqa: BLE001  (the user's model failing on a real image: say so, once)
        raise UserModelError(
            f"model {label}: its forward failed on a batch of shape {list(x.shape)} ({_first_line(exc)[:300]})"
        ) from None
    if not isinstance(out, Tensor):
        raise UserModelError(f"model {label}: output is a {type(out).__name__}, expected a tensor of {_SHAPES[task]}")
    want = 2 if task == "classification" else 4
    if out.ndim != want or out.shape[0] != x.shape[0]:
        raise UserModelError(
            f"model {label}: output shape {list(out.shape)} does not fit a {task} model (expected {_SHAPES[task]} "
            f"for a batch of {x.shape[0]})"
        )
    if num_classes is not None and out.shape[1] != num_classes:
        raise UserModelError(f"model {label}: outputs {out.shape[1]} classes but the dataset has {num_classes}")


def check_dynamic_shapes(model: nn.Module, x: Tensor, label: str) -> None:
    """A model file must take other batch sizes (the last batch of a shard) and other image sizes (the defenses'
    resize views); a program exported with static shapes fails here, in one line, instead of mid-run."""
    h, w = x.shape[-2:]
    probes = {
        "a batch of 2": x.expand(2, *x.shape[1:]).contiguous(),
        f"an image of {h * 3 // 2}x{w * 3 // 2}": torch.nn.functional.interpolate(
            x, size=(h * 3 // 2, w * 3 // 2), mode="bilinear", align_corners=False
        ),
    }
    for what, probe in probes.items():
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model(probe)
        except Exception as exc:  # noqa: BLE001
            raise UserModelError(
                f"model {label}: it does not accept {what} ({_first_line(exc)[:200]}); export it with dynamic "
                "batch, height and width (torch.export.export(..., dynamic_shapes=...), see the README)"
            ) from None
