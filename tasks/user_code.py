"""A config's own code: where ``model.factory`` lives, how its module is found and imported, and its identity.

The rule "a config file alone never runs code" holds by making it explicit: only a ``model.factory`` entry imports
a module, and only one of the user's own files: a ``.py`` next to the config file or on its ``plugins:`` list.
``os:system`` or any installed package is not on that list, so it is refused before anything is imported.

``plugins:`` entries are paths relative to the config file: a ``.py`` file is the module named by its stem; a
folder with ``__init__.py`` is the package named by the folder; any other folder holds modules and packages.
:func:`resolve_plugins` makes them absolute when the config is loaded and adds the factory's own file when it sits
next to the config, so the stored config (a run's manifest) finds the same files from any process or worker.

A factory model's code identity (the ``model`` component of every cache key, :mod:`tasks.code_identity`) is the
digest of the factory's module file and of every ``.py`` file in the plugins entries: editing them recomputes the
run's attacks and scores, never reusing results of the old code.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from equicore.code_identity import code_version as _modules_version
from tasks.config_errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

# The torch-side helpers (equicore.models.user) are imported where a model is built or hashed, not at module level:
# config validation uses this module's path checks and must not import torch (the CLI's quick commands).

FACTORY_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
MAX_PLUGIN_FILES = 1000  # .py files hashed per plugins entry (a folder pointed at by mistake would be huge)
LOADER_MODULES = ("equicore.models.user", "equicore.models.checkpoint", "equicore.models.common")


def check_factory_string(value: str) -> str:
    if not FACTORY_PATTERN.match(value):
        raise ValueError(
            f"{value!r} is not 'module:function' (Python identifiers, e.g. my_models:build); a factory names a "
            "function in your own module"
        )
    return value


def _candidates(module: str, entry: Path) -> list[tuple[Path, list[Path], Path]]:
    """(file, parent package folders, sys.path root) where ``module`` would live under plugins ``entry``."""
    parts = module.split(".")
    if entry.is_file():
        return [(entry, [], entry.parent)] if len(parts) == 1 and entry.suffix == ".py" and entry.stem == module else []
    if (entry / "__init__.py").is_file():  # a package: the module must be inside it
        if parts[0] != entry.name:
            return []
        root = entry.parent
    else:
        root = entry
    base = root.joinpath(*parts)
    packages = [root.joinpath(*parts[: i + 1]) for i in range(len(parts) - 1)]
    return [(base.with_suffix(".py"), packages, root), (base / "__init__.py", packages, root)]


def find_module(module: str, plugins: Sequence[str]) -> tuple[Path, list[Path], Path] | None:
    """(file, parent package folders, root) of ``module`` in the plugins entries, or None. The file must be inside
    its entry (no symlink leading elsewhere) and every parent package must have an ``__init__.py``."""
    for raw in plugins:
        entry = Path(raw)
        for file, packages, root in _candidates(module, entry):
            if not file.is_file() or not all((p / "__init__.py").is_file() for p in packages):
                continue
            real, home = file.resolve(), (entry if entry.is_dir() else entry.parent).resolve()
            if not real.is_relative_to(home):
                raise ConfigError(f"model.factory: {file} resolves to {real}, outside its plugins entry {entry}")
            return file, packages, root
    return None


def _not_found(module: str, plugins: Sequence[str], config_dir: Path | None) -> ConfigError:
    where = f"neither next to the config ({config_dir}) nor" if config_dir is not None else "not"
    return ConfigError(
        f"model.factory: module {module!r} is {where} in plugins {list(plugins)}; a factory must name a function "
        "in your own module (a .py file beside the config, or on plugins:), never an installed package"
    )


def resolve_plugins(data: dict[str, Any], config_dir: Path) -> dict[str, Any]:
    """The config as loaded from a file in ``config_dir``: ``plugins`` absolute, and the factory's module file added
    to them when it sits next to the config. ConfigError for a missing entry or a module found nowhere."""
    plugins = data.get("plugins")
    if plugins is None:
        plugins = []
    if not isinstance(plugins, list) or not all(isinstance(p, str) and p for p in plugins):
        return data  # the schema reports the type error, naming the field
    resolved = []
    for i, p in enumerate(plugins):
        path = Path(os.path.expanduser(p))
        path = Path(os.path.abspath(path if path.is_absolute() else config_dir / path))
        if not path.exists():
            raise ConfigError(f"plugins.{i}: {path} does not exist (paths are relative to the config file)")
        if not (path.is_dir() or path.suffix == ".py"):
            raise ConfigError(f"plugins.{i}: {path} is neither a .py file nor a folder")
        resolved.append(str(path))
    model = data.get("model")
    factory = model.get("factory") if isinstance(model, dict) else None
    alone = isinstance(model, dict) and model.get("name") is None and model.get("file") is None  # else: schema
    if alone and isinstance(factory, str) and FACTORY_PATTERN.match(factory):
        module = factory.split(":")[0]
        if find_module(module, resolved) is None:
            beside = find_module(module, [str(Path(os.path.abspath(config_dir)))])
            if beside is None:
                raise _not_found(module, resolved, Path(os.path.abspath(config_dir)))
            file, packages, _root = beside
            resolved.append(str(packages[0] if packages else file.parent if file.name == "__init__.py" else file))
    if not resolved and "plugins" not in data:
        return data
    return {**data, "plugins": resolved}


def check_factory_found(factory: str, plugins: Sequence[str]) -> None:
    """At validation (also of a stored config, in another process): the factory's module is in the plugins."""
    module = factory.split(":")[0]
    relative = [p for p in plugins if not Path(p).is_absolute()]
    if relative:
        raise ConfigError(f"plugins: {relative[0]!r} is relative; plugins are resolved against the config file")
    if find_module(module, plugins) is None:
        raise _not_found(module, plugins, None)


# ------------------------------------------------------------------------------------------------ identity
def _py_files(entry: Path) -> list[Path]:
    if entry.is_file():
        return [entry]
    files = sorted(p for p in entry.rglob("*.py") if p.is_file() and "__pycache__" not in p.parts)
    if len(files) > MAX_PLUGIN_FILES:
        raise ConfigError(
            f"plugins: {entry} holds {len(files)} .py files (at most {MAX_PLUGIN_FILES} are hashed); point plugins at "
            "the folder of your model's code"
        )
    return files


def plugins_digest(factory: str, plugins: Sequence[str]) -> str:
    """sha256 over the factory's module file and every ``.py`` file of the plugins entries (names and bytes)."""
    from equicore.models.user import file_sha256

    found = find_module(factory.split(":")[0], plugins)
    named: dict[str, Path] = {}  # by their path inside their entry, so a moved folder keeps its identity
    if found:
        named[found[0].name] = found[0]
    for entry in map(Path, plugins):
        for f in _py_files(entry):
            named[f.relative_to(entry.parent).as_posix()] = f
    h = hashlib.sha256()
    for rel in sorted(named):
        h.update(f"{rel}\0{file_sha256(named[rel])}\n".encode())
    return h.hexdigest()


def user_model_code_version(factory: str | None, file: str | None, plugins: Sequence[str]) -> str:
    """The ``model`` component of the cache keys for a factory model (its code) or a model file (its bytes: the
    program's graph is not in the weights digest), plus the loader and normalisation code."""
    from equicore.models.user import file_sha256

    loader = _modules_version("1", LOADER_MODULES)
    if factory is not None:
        return f"factory:{plugins_digest(factory, plugins)[:16]}+{loader}"
    if file is not None:
        return f"file:{file_sha256(file)[:16]}+{loader}"
    raise ValueError("a user model has a factory or a file")


# ------------------------------------------------------------------------------------------------ building
def build_user_model(model: Any, plugins: Sequence[str]) -> tuple[nn.Module, dict[str, Any]]:
    """(the model a factory or model file gives, wrapped in its declared normalisation; the adapter options, with
    a ``feature_layer`` renamed into the wrapper). ``model`` is a :class:`tasks.config_model.ModelConfig`."""
    from equicore.models.common import RANDOM_INIT
    from equicore.models.user import (
        UserModelError,
        build_factory_model,
        factory_callable,
        import_module_file,
        layer_names,
        load_model_file,
        normalized,
    )

    adapter = dict(model.adapter)
    layer = adapter.get("feature_layer", "logits")
    if model.factory is not None:
        module_name, attr = model.factory.split(":")
        found = find_module(module_name, plugins)
        if found is None:
            raise _not_found(module_name, plugins, None)
        file, packages, root = found
        try:
            module = import_module_file(module_name, file, packages, root)
        except UserModelError as exc:
            raise UserModelError(f"model.factory {model.factory!r}: {exc}") from None
        checkpoint = None if model.checkpoint in (None, RANDOM_INIT) else model.checkpoint
        net = build_factory_model(
            factory_callable(module, attr, model.factory, file), model.factory, model.params, checkpoint
        )
    else:
        net, kind = load_model_file(model.file)
        if kind == "torchscript" and layer != "logits":
            raise UserModelError(
                f"model.feature_layer {layer!r}: a TorchScript model cannot be hooked (PyTorch runs its forward inside "
                "TorchScript, where Python forward hooks are not supported); save it with torch.export (.pt2) to use "
                "a feature layer, or use feature_layer: logits"
            )
    if layer != "logits" and layer not in dict(net.named_modules()):
        raise UserModelError(
            f"model.feature_layer {layer!r} is not a module of {model.label}; known: {layer_names(net)[:40]}"
        )
    if model.normalize is not None:
        net = normalized(net, model.normalize.mean, model.normalize.std)
        if layer != "logits":
            adapter["feature_layer"] = f"net.{layer}"
    return net, adapter
