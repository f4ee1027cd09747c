"""hvdagents: make a Keras 3 or PyTorch model a distributed agent.

Synchronous data parallelism through Horovod's ring all-reduce, and asynchronous parameter
sharing through MPI one-sided windows, behind one API::

    import hvdagents as hva
    ctx = hva.init()
    agent = hva.TorchAgent(model, optimizer, strategy=hva.Sync())

Importing this package has no side effects: MPI starts at ``hva.init()`` (or at the first
agent), and TensorFlow/PyTorch are imported only by the agent that needs them.
"""

from __future__ import annotations

from typing import Any

from .data import shard
from .errors import (
    ClosedError,
    HvdAgentsError,
    LauncherError,
    ModelMismatchError,
    NonFiniteError,
    OneSidedUnavailableError,
    ThreadLevelError,
    UsageError,
)
from .runtime import Context, context, init
from .strategies.config import EASGD, AsyncDiLoCo, DiLoCo, Downpour, Gossip, LocalSGD, Strategy, Sync, ZeRO

__version__ = "0.1.0"

__all__ = [
    "init",
    "context",
    "Context",
    "shard",
    "Strategy",
    "Sync",
    "LocalSGD",
    "Downpour",
    "EASGD",
    "Gossip",
    "ZeRO",
    "DiLoCo",
    "AsyncDiLoCo",
    "ParameterWindow",
    "TorchAgent",
    "KerasAgent",
    "keras",
    "elastic",
    "HvdAgentsError",
    "LauncherError",
    "OneSidedUnavailableError",
    "ThreadLevelError",
    "ModelMismatchError",
    "NonFiniteError",
    "ClosedError",
    "UsageError",
]

# Heavy or MPI-touching names load on first use, so `import hvdagents` stays cheap.
_LAZY = {
    "ParameterWindow": ("hvdagents.strategies.windows", "ParameterWindow"),
    "TorchAgent": ("hvdagents.frameworks.torch", "TorchAgent"),
    "KerasAgent": ("hvdagents.frameworks.keras", "KerasAgent"),
    "keras": ("hvdagents.keras", None),
    "elastic": ("hvdagents.elastic", None),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hvdagents' has no attribute {name!r}")
    from importlib import import_module

    module_name, attr = _LAZY[name]
    module = import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
