"""Checks of what a config may say, beyond its schema (README, "Security defaults"):

- Network exposure is a command-line choice, never a config file's: a file naming ``cluster.address`` (an existing
  Dask scheduler: it runs the run's code, and what it sends back is unpickled here) or a ``cluster.host`` that is not
  a loopback interface is refused, naming the flag to use instead (``equi run --cluster ADDRESS`` /
  ``--listen HOST``). The same holds for a run's manifest on ``equi resume``: its recorded network settings are
  dropped, the flags give them again.
- ``${VAR}`` expands only in path fields (``cache_dir``, ``results_dir``, ``model.checkpoint``, ``model.file``,
  ``plugins`` entries, a defense's ``head`` and a dataset's path parameters): elsewhere, e.g.
  ``report.title: ${API_TOKEN}``, it would copy a secret of the environment into the run's manifest and reports.
- Parameters of attacks, defenses, datasets and models are checked against the types their factories declare: a
  boolean is not a number (``eps: true`` is not 1/255), a number is not a boolean, floats are finite.
"""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tasks.config_errors import ConfigError

PATH_PARAM_SUFFIXES = ("_root", "_dir", "_file", "_path")
LOCALHOST = "127.0.0.1"


def is_path_param(key: str) -> bool:
    """A dataset parameter that names a file or folder."""
    return key == "root" or key.endswith(PATH_PARAM_SUFFIXES)


def shown(value: Any) -> str:
    """A value as the YAML that gave it (``true``, ``null``, ``.nan``), else its repr, cut to 60 characters."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}[str(value)]
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------------------- network
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_ADDRESS = re.compile(r"^(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen_host(host: str, where: str = "--listen") -> str:
    """An interface to bind to: an IP address or a host name (no scheme, no port)."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return host.strip("[]")
    except ValueError:
        pass
    if not _HOSTNAME.match(host):
        raise ConfigError(f"{where}: {host!r} is not an IP address or host name to listen on (e.g. 0.0.0.0, 10.0.0.5)")
    return host


def check_scheduler_address(address: str, where: str = "--cluster") -> str:
    """A Dask scheduler address: ``tcp://HOST:PORT`` or ``tls://HOST:PORT`` (``HOST:PORT`` means tcp)."""
    full = address if "://" in address else f"tcp://{address}"
    m = _ADDRESS.match(full)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise ConfigError(
            f"{where}: {address!r} is not a Dask scheduler address (expected tcp://HOST:PORT or tls://HOST:PORT)"
        )
    return full


def refuse_network_fields(data: dict[str, Any]) -> None:
    """A config FILE may not expose the run on the network nor point it at a scheduler (module docstring)."""
    cluster = data.get("cluster")
    if not isinstance(cluster, dict):
        return
    if cluster.get("address") is not None:
        raise ConfigError(
            "cluster.address: a config file cannot point a run at a Dask scheduler (it runs the run's code and its "
            "results are unpickled here); pass --cluster ADDRESS to equi run"
        )
    host = cluster.get("host")
    if isinstance(host, str) and not is_loopback(host):
        raise ConfigError(
            f"cluster.host: {host!r} is not a loopback interface; a config file cannot expose the run's Dask "
            f"scheduler (which runs submitted code) on the network: pass --listen {host} to equi run"
        )


def without_network(data: dict[str, Any]) -> dict[str, Any]:
    """A recorded config (a run's manifest) without its network settings: ``equi resume`` takes them from flags.
    A run recorded in process stays in process (its local-cluster settings were ignored then, and are dropped)."""
    cluster = dict(data.get("cluster") or {})
    cluster["address"] = None
    if not is_loopback(str(cluster.get("host", LOCALHOST))):
        cluster["host"] = LOCALHOST
    if cluster.get("in_process"):
        cluster.update(n_workers=None, dashboard=False, host=LOCALHOST)
    return {**data, "cluster": cluster}


# ------------------------------------------------------------------------------------------------- ${VAR}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def is_env_field(where: str) -> bool:
    """Fields in which ``${VAR}`` expands: paths (module docstring)."""
    parts = where.split(".")
    if where in ("cache_dir", "results_dir", "model.checkpoint", "model.file"):
        return True
    if len(parts) == 3 and parts[:2] == ["dataset", "params"]:
        return is_path_param(parts[2])
    if len(parts) == 2 and parts[0] == "plugins":
        return True
    return len(parts) == 3 and parts[0] == "defenses" and parts[2] == "head"


def expand_env(data: Any, where: str = "") -> Any:
    """Replace ``${VAR}`` in path fields (dataset roots, checkpoint paths of the paper presets); unset variables
    are one error naming every one of them and its field, not paths that silently do not exist."""
    missing: list[tuple[str, str]] = []
    out = _expand(data, where, missing)
    if len(missing) == 1:
        raise ConfigError(f"{missing[0][1]}: environment variable {missing[0][0]} is not set")
    if missing:
        names = sorted({name for name, _ in missing})
        needs = "; ".join(f"{field} needs ${{{name}}}" for name, field in missing)
        raise ConfigError(f"environment variables {', '.join(names)} are not set ({needs}); set them all and run again")
    return out


def _expand(data: Any, where: str, missing: list[tuple[str, str]]) -> Any:
    if isinstance(data, dict):
        return {k: _expand(v, f"{where}.{k}" if where else str(k), missing) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand(v, f"{where}.{i}", missing) for i, v in enumerate(data)]
    if isinstance(data, str) and _ENV_REF.search(data):
        if not is_env_field(where):
            raise ConfigError(
                f"{where}: ${{VAR}} expands only in path fields (cache_dir, results_dir, model.checkpoint, model.file, "
                "plugins, a defense's head, dataset path parameters), so a config cannot copy the environment into "
                "results"
            )

        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in os.environ:
                missing.append((m.group(1), where))
                return m.group(0)
            return os.environ[m.group(1)]

        return _ENV_REF.sub(sub, data)
    return data


# ------------------------------------------------------------------------------------------------- parameter types
def factory_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    """Declared types of a registered factory's keyword parameters (a dataclass's init fields, or a function's);
    empty when they cannot be resolved (then the factory checks its parameters itself)."""
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # noqa: BLE001  (unresolvable annotations: no type checks, never an error of their own)
        return {}
    if dataclasses.is_dataclass(factory):
        names = {f.name for f in dataclasses.fields(factory) if f.init}
    else:
        try:
            names = set(inspect.signature(factory).parameters)
        except (TypeError, ValueError):
            return {}
    return {k: v for k, v in hints.items() if k in names}


_SEQUENCES = (list, tuple, Sequence, set, frozenset)
_MAPPINGS = (dict, Mapping)


def _accepts(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from YAML) fits ``hint`` as far as these checks go: exact scalars, containers by kind;
    anything else (``Any``, callables, classes) is left to the factory."""
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    origin = typing.get_origin(hint) or hint
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, arm) for arm in typing.get_args(hint))
    if origin in _SEQUENCES:
        return isinstance(value, list | tuple)
    if origin in _MAPPINGS:
        return isinstance(value, dict)
    return True


def _expected(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "null"}
    origin = typing.get_origin(hint) or hint
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_expected(a) for a in typing.get_args(hint)))
    if origin in _SEQUENCES:
        return "a list"
    if origin in _MAPPINGS:
        return "a mapping"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_param_types(label: str, hints: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    """ConfigError ``label.param: expected ..., got ...`` for the first parameter whose value does not fit."""
    for key, value in params.items():
        hint = hints.get(key)
        if hint is not None and not _accepts(value, hint):
            raise ConfigError(f"{label}.{key}: expected {_expected(hint)}, got {shown(value)}")
