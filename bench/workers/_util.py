"""Helpers for the MPI worker scripts: result lines, timing, command-line settings."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Callable

__all__ = ["emit", "timed", "mlp_dims", "overhead_args", "torch_mlp", "init_gloo", "RESULT_TAG"]

#: Must match :data:`bench._common.RESULT_TAG` (not imported: workers stay light).
RESULT_TAG = "BENCH"


def emit(obj: Any) -> None:
    """Print ``BENCH {json}`` as one write(2), so lines of several ranks never interleave."""
    os.write(1, f"{RESULT_TAG} {json.dumps(obj)}\n".encode())


def timed(comm: Any, body: Callable[[], None]) -> float:
    """Collective: barrier, run ``body``, barrier; the slowest rank's wall time in seconds."""
    comm.Barrier()
    start = time.perf_counter()
    body()
    comm.Barrier()
    return comm.allreduce(time.perf_counter() - start, op=_max())


def _max() -> Any:
    from mpi4py import MPI

    return MPI.MAX


def mlp_dims(text: str) -> list[int]:
    """``"1024,2048,10"`` -> ``[1024, 2048, 10]`` (layer widths, input first)."""
    dims = [int(d) for d in text.split(",")]
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"MLP dims need at least two positive widths; got {text!r}")
    return dims


def torch_mlp(dims: list[int], seed: int = 0) -> Any:
    """A PyTorch MLP of ``dims`` (Linear layers, ReLU between), the same weights for ``seed``."""
    import torch

    torch.manual_seed(seed)
    layers: list[Any] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def init_gloo(comm: Any) -> None:
    """Collective: torch.distributed over gloo, every MPI rank its rank, meeting at rank 0's
    ``MASTER_ADDR`` (default 127.0.0.1) on a port rank 0 picks."""
    import socket

    import torch.distributed as dist

    port = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port, root=0)
    address = os.environ.get("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=comm.Get_rank(),
                            world_size=comm.Get_size())


def overhead_args() -> argparse.Namespace:
    """The command line shared by the overhead workers (model, batch, steps, repetitions)."""
    p = argparse.ArgumentParser()
    p.add_argument("--dims", type=mlp_dims, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--reps", type=int, required=True)
    p.add_argument("--warmup", type=int, default=3)
    return p.parse_args()
