"""Command-line overrides of a config (``equi run`` / ``resume`` / ``demo``): output folders, and where the run
executes. Network exposure is chosen here and only here (README, "Security defaults"): ``--cluster ADDRESS`` points
the run at an existing Dask scheduler, ``--listen HOST`` binds the local one to a non-loopback interface; a config
file cannot do either (:func:`tasks.config_checks.refuse_network_fields`).

A flag that chooses how the run executes replaces the config's choice (``--in-process`` over ``cluster.n_workers``,
``--cluster`` over ``cluster.in_process``); two flags that contradict each other are an error.
"""

from __future__ import annotations

from typing import Any

from tasks.config import ConfigError, RunConfig, parse_config
from tasks.config_checks import check_listen_host, check_scheduler_address, is_loopback


def check_flags(cluster: str | None, listen: str | None, workers: int | None, in_process: bool) -> None:
    chosen = [
        flag
        for flag, given in (
            ("--cluster", cluster is not None),
            ("--in-process", in_process),
            ("--workers", workers is not None),
            ("--listen", listen is not None),
        )
        if given
    ]
    # --workers and --listen together shape one local cluster; every other pair contradicts itself.
    if len(chosen) > 1 and set(chosen) != {"--workers", "--listen"}:
        raise ConfigError(f"{chosen[0]} and {chosen[1]} conflict: choose one way to run")


def apply_overrides(
    cfg: RunConfig,
    *,
    cluster: str | None = None,
    listen: str | None = None,
    workers: int | None = None,
    in_process: bool = False,
    results_dir: str | None = None,
    cache_dir: str | None = None,
    device: str | None = None,
) -> RunConfig:
    """``cfg`` with the flags applied and validated again (ConfigError naming the flag)."""
    check_flags(cluster, listen, workers, in_process)
    data = cfg.model_dump(mode="json")
    c: dict[str, Any] = data["cluster"]
    if cluster is not None:
        c.update(address=check_scheduler_address(cluster), in_process=False, n_workers=None)
    if in_process:
        c.update(in_process=True, address=None, n_workers=None)
    if workers is not None:
        c.update(n_workers=workers, in_process=False)
    if listen is not None:
        if c["in_process"]:
            raise ConfigError("--listen: the config runs in process (cluster.in_process), with no scheduler to bind")
        c.update(host=check_listen_host(listen))
    if results_dir:
        data["results_dir"] = results_dir
    if cache_dir:
        data["cache_dir"] = cache_dir
    if device is not None:
        data["device"] = device  # where it runs, not what it computes: the run id stays
    return parse_config(data, "config")


def exposure_warning(cfg: RunConfig) -> str | None:
    """What to print when ``--listen`` makes the local cluster reachable from the network (else None)."""
    c = cfg.cluster
    if c.in_process or c.address is not None or is_loopback(c.host):
        return None
    return (
        f"--listen {c.host}: the Dask scheduler and workers accept connections from the network, and anyone who "
        "reaches them can run code as you; restrict the network or use TLS (README, Security defaults)"
    )
