"""Horovod's settings as hvdagents starts it: measured defaults, the user's own values first.

Horovod reads its ``HOROVOD_*`` environment variables once, in ``hvd.init()``. Before that
call (:func:`hvdagents.runtime.horovod_binding`), :func:`apply` sets the variables of
:func:`defaults` that the user has not set, and the timeline and autotuning asked for with
``hva.init(timeline=..., autotune=...)``. A ``HOROVOD_*`` variable already in the environment
is never changed, so the launcher's ``-x HOROVOD_CYCLE_TIME=...`` or an ``export`` wins.
:func:`in_force` lists every setting with its value and where it came from (``hvdagents
doctor`` prints it). Local: no communication.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, MutableMapping, Optional

__all__ = ["HOROVOD_DEFAULTS", "Setting", "defaults", "cores_per_rank", "requested", "apply", "in_force"]

#: ``HOROVOD_CYCLE_TIME`` (ms) where every rank has a core to spare. The cycle time is the
#: pause between two rounds of Horovod's background thread; every collective waits for the next
#: round, so it is a floor under every step. Measured (``bench/workers/cycle_time.py``, README
#: Performance): with a spare core, a 4 KiB all-reduce takes the cycle time + ~80 µs (1.1 ms
#: at Horovod's 1 ms, 0.18 ms at 0.1 ms) and the idle thread uses 14% of a core instead of 3%;
#: with one core per rank the thread competes with training: the 85K-parameter MLP ran at half
#: the steps/s at any cycle time below 1 ms, and the idle thread took 70-100% of a core.
SPARE_CORE_CYCLE_TIME_MS = "0.1"
#: Cores per rank from which a rank has a core to spare for Horovod's thread.
SPARE_CORES_PER_RANK = 2

#: Horovod 0.28.1's own defaults for the settings :func:`in_force` reports (from its sources).
HOROVOD_DEFAULTS: dict[str, str] = {
    "HOROVOD_CYCLE_TIME": "1",
    "HOROVOD_FUSION_THRESHOLD": str(128 * 1024 * 1024),
    "HOROVOD_CACHE_CAPACITY": "1024",
    "HOROVOD_HIERARCHICAL_ALLREDUCE": "0",
    "HOROVOD_HIERARCHICAL_ALLGATHER": "0",
    "HOROVOD_AUTOTUNE": "0",
    "HOROVOD_TIMELINE": "",
}


def defaults(cores_per_rank: float) -> dict[str, str]:
    """What hvdagents sets when the user has not: a shorter cycle time where each rank of
    this node has ``SPARE_CORES_PER_RANK`` cores or more, Horovod's own values elsewhere."""
    if cores_per_rank >= SPARE_CORES_PER_RANK:
        return {"HOROVOD_CYCLE_TIME": SPARE_CORE_CYCLE_TIME_MS}
    return {}


def cores_per_rank(local_size: int) -> float:
    """Cores this rank may use: its own affinity set when the launcher bound it to fewer cores
    than the node has, else the node's cores shared by its ``local_size`` ranks. Local."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if allowed < (os.cpu_count() or allowed):
        return float(allowed)
    return allowed / max(local_size, 1)


_requests: dict[str, str] = {}
_applied: set[str] = set()


@dataclass(frozen=True)
class Setting:
    """One Horovod setting: its value and who chose it (``user``, ``hvdagents`` or ``horovod``)."""

    name: str
    value: str
    source: str


def requested(*, timeline: Optional[str | os.PathLike] = None, autotune: Optional[bool] = None,
              autotune_log: Optional[str | os.PathLike] = None) -> dict[str, str]:
    """Record what ``hva.init`` was asked for (a timeline file, autotuning); return all requests.

    Explicit arguments are the user's choice: they override the environment when applied."""
    if timeline is not None:
        _requests["HOROVOD_TIMELINE"] = _file_path("timeline", timeline)
    if autotune is not None:
        if not isinstance(autotune, bool):
            raise TypeError(f"autotune must be True or False; got {autotune!r}")
        _requests["HOROVOD_AUTOTUNE"] = "1" if autotune else "0"
    if autotune_log is not None:
        _requests["HOROVOD_AUTOTUNE_LOG"] = _file_path("autotune_log", autotune_log)
    return dict(_requests)


def _file_path(name: str, value: Any) -> str:
    """``value`` as a file path, or a ``TypeError``/``ValueError`` naming the argument."""
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else value
    if not isinstance(path, str):  # bytes, a number, or a PathLike whose path is bytes
        raise TypeError(f"{name} must be a file path (str or os.PathLike); got {type(value).__name__} {value!r}")
    if not path:
        raise ValueError(f"{name} must be a file path; got an empty string")
    return path


def apply(cores: float, env: Optional[MutableMapping[str, str]] = None) -> dict[str, str]:
    """Set the requests and the :func:`defaults` for ``cores`` per rank that the user has not
    set in ``env`` (default: ``os.environ``); return what was set. Call before ``hvd.init()``."""
    env = os.environ if env is None else env
    changed = {name: value for name, value in defaults(cores).items() if name not in env}
    _applied.update(changed)
    changed.update(_requests)
    env.update(changed)
    return changed


def in_force(cores: float, env: Optional[MutableMapping[str, str]] = None) -> list[Setting]:
    """Every setting of :data:`HOROVOD_DEFAULTS` (and any other ``HOROVOD_*`` variable set)
    with the value Horovod uses and its source, as :func:`apply` for ``cores`` per rank leaves
    them (or has left them)."""
    env = os.environ if env is None else env
    ours = defaults(cores)
    names = list(HOROVOD_DEFAULTS) + sorted(n for n in env if n.startswith("HOROVOD_") and n not in HOROVOD_DEFAULTS)
    settings = []
    for name in names:
        if name in _requests:
            settings.append(Setting(name, _requests[name], "hva.init"))
        elif name in env:
            settings.append(Setting(name, env[name], "hvdagents" if name in _applied else "user"))
        elif name in ours:
            settings.append(Setting(name, ours[name], "hvdagents"))
        else:
            settings.append(Setting(name, HOROVOD_DEFAULTS[name], "horovod"))
    return settings
