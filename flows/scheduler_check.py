"""Asking a Dask scheduler who it is, within a time limit: the connect check of ``--cluster`` and of the warm cluster
of ``equi server`` (:mod:`flows.warm_cluster`). A light module (``distributed`` is imported only when asked), so the
start-up can use it before the engine is imported.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tasks.config import ConfigError


def short_error(exc: BaseException) -> str:
    """The first line of an error, with its type: what a failure record and the summary show."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:500]


def check_scheduler(address: str, timeout_s: float, what: str = "--cluster") -> dict[str, Any]:
    """Ask the scheduler at ``address`` who it is, all within ``timeout_s`` (distributed's own connect timeout does
    not cover its handshake: a port that accepts and never answers would hang it): its identity (``id``,
    ``n_workers``, ...), or ConfigError in one line that starts with ``what``."""
    with ThreadPoolExecutor(1) as pool:  # a loop of its own, whether or not the caller runs one
        try:
            info = pool.submit(asyncio.run, _identity(address, timeout_s)).result()
        except (TimeoutError, OSError) as e:
            why = f" ({short_error(e)})" if str(e) else ""
            raise ConfigError(f"{what} {address}: no Dask scheduler answered within {timeout_s:g} s{why}") from None
        except Exception as e:  # noqa: BLE001  (TLS settings, protocol errors: one line)
            raise ConfigError(f"{what} {address}: cannot connect ({short_error(e)})") from None
    if not isinstance(info, dict) or info.get("type") != "Scheduler":
        kind = info.get("type") if isinstance(info, dict) else type(info).__name__
        raise ConfigError(f"{what} {address}: a Dask {kind} answered, not a scheduler")
    return info


async def _identity(address: str, timeout_s: float) -> Any:
    from distributed.comm import connect
    from distributed.security import Security  # TLS certificates from Dask's config (README, Security defaults)

    async def ask() -> Any:
        comm = await connect(address, timeout=timeout_s, **Security().get_connection_args("client"))
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            await comm.close()

    return await asyncio.wait_for(ask(), timeout_s)
