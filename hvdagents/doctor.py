"""``python -m hvdagents doctor``: is this environment ready for hvdagents?

Reports the MPI library and thread level, whether the windows' one-sided operations work
between the ranks (a real probe: concurrent accumulates from every rank, with MPI's windows
inside each node and through the relay between nodes, or however ``HVDAGENTS_WINDOWS`` says),
Open MPI's one-sided (``osc``) components, the Horovod settings in force and who chose them,
Horovod's build (frameworks, controllers, NCCL), TensorFlow/Keras/PyTorch versions, the GPUs
seen, the launcher and the ranks, then a verdict. Exits non-zero when something required is
missing. Run it plainly or under the launcher you will use (``mpirun -np 2 python -m
hvdagents doctor``): every rank checks, rank 0 prints.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["Check", "run_checks", "main"]

OK, WARN, FAIL = "ok", "warn", "FAIL"
ONE_SIDED = "one-sided windows"
#: One-sided components that work at MPI_THREAD_MULTIPLE (osc/pt2pt refuses it).
GOOD_OSC = ("rdma", "ucx", "sm")


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None


def _mpi() -> list[Check]:
    from mpi4py import MPI

    import hvdagents as hva

    ctx = hva.init()
    checks = [
        Check("MPI library", OK, MPI.Get_library_version().replace("\x00", "").splitlines()[0].strip()),
        Check("mpi4py", OK, _version("mpi4py") or "?"),
        Check("thread level", OK if ctx.thread_level == "MPI_THREAD_MULTIPLE" else FAIL, ctx.thread_level),
        Check("launcher", OK, f"{ctx.launcher}; rank {ctx.rank} of {ctx.size}, "
                              f"local rank {ctx.local_rank} of {ctx.local_size}"),
    ]
    if ctx.size > 1 and ctx.mpi_world:
        hosts = ctx.comm.gather(socket.gethostname(), root=0)
        if ctx.is_root:
            checks.append(Check("ranks", OK, f"{ctx.size} ranks on {len(set(hosts))} node(s)"))
    if not ctx.mpi_world:
        checks.append(Check("MPI world", WARN, "Gloo launch: sync strategies only (async ones need MPI)"))
    else:
        ok, detail = _windows_probe(ctx.comm)  # collective: real one-sided operations between these ranks
        checks.append(Check(ONE_SIDED, OK if ok else WARN, detail if ok else
                            f"{detail} -- asynchronous strategies unavailable; synchronous ones work"))
    return checks


#: Pushes of the relay probe per rank, and their length.
RELAY_PROBE_PUSHES, RELAY_PROBE_ELEMENTS = 16, 4096


def _windows_probe(comm) -> tuple[bool, str]:
    """Collective: MPI's one-sided probe inside each group of the windows' layout, then, when
    the layout has a relay, every rank pushes to a store sharded over all ranks and ticks a
    clock through it; the totals must be exact on every rank."""
    import numpy as np

    from .strategies.windows import ClockWindow, ParameterWindow
    from .strategies.windows.relay import layout_for
    from .strategies.windows.transport import probe, shared_problem

    layout = layout_for(comm)
    problem = shared_problem(layout.group, whole=comm)  # a failing group, the same on every rank
    where = {"mpi": "MPI windows across all ranks", "relay": "the relay between every pair of ranks",
             "auto": "MPI windows inside each node"}[layout.mode]
    detail = probe(layout.group).detail  # this rank's group (cached)
    if problem is not None or layout.relay is None:
        return problem is None, f"{where}: {problem or detail}"
    size = comm.Get_size()
    with ParameterWindow(RELAY_PROBE_ELEMENTS * size, np.float64, comm=comm) as store, \
            ClockWindow(comm=comm) as clock:
        for _ in range(RELAY_PROBE_PUSHES):
            store.push(np.ones(RELAY_PROBE_ELEMENTS * size))
            clock.tick()
        comm.Barrier()
        wrong = int(np.count_nonzero(store.pull() != RELAY_PROBE_PUSHES * size))
        wrong += int(np.count_nonzero(clock.clocks() != RELAY_PROBE_PUSHES))
        comm.Barrier()
    wrong = comm.allreduce(wrong)
    relay = f"relay between {layout.groups} {'node' if layout.mode == 'auto' else 'rank'}s"
    if wrong:
        return False, f"{where} ok, but the {relay} lost or corrupted {wrong} element(s) ({detail})"
    return True, (f"{where} ({detail}); {relay}: {RELAY_PROBE_PUSHES} pushes and ticks per rank "
                  "through it, none lost")


def _osc() -> list[Check]:
    if not shutil.which("ompi_info"):
        return [Check("osc components", WARN, "ompi_info not found (not Open MPI?); not checked")]
    out = subprocess.run(["ompi_info", "--parsable"], capture_output=True, text=True, timeout=60).stdout
    found = sorted({line.split(":")[2] for line in out.splitlines() if line.startswith("mca:osc:")})
    good = [c for c in found if c in GOOD_OSC]
    status = OK if good else FAIL
    return [Check("osc components", status, ", ".join(found) + ("" if good else
                  " -- none works at MPI_THREAD_MULTIPLE; async strategies cannot run"))]


def _horovod() -> list[Check]:
    checks = []
    built = {}
    for framework, module in (("PyTorch", "horovod.torch"), ("TensorFlow", "horovod.tensorflow")):
        try:
            hvd = importlib.import_module(module)
        except Exception as err:  # noqa: BLE001
            checks.append(Check(f"Horovod {framework}", WARN, f"not built/importable ({type(err).__name__})"))
            continue
        built[framework] = hvd
        checks.append(Check(f"Horovod {framework}", OK, "built"))
    if not built:
        return [Check("Horovod", FAIL, "no framework binding importable; run tools/setup.sh")] + checks
    hvd = next(iter(built.values()))
    controllers = [n for n, f in (("MPI", hvd.mpi_built), ("Gloo", hvd.gloo_built)) if f()]
    ops = [n for n, f in (("NCCL", hvd.nccl_built), ("CUDA", hvd.cuda_built)) if f()]
    from .horovod_settings import cores_per_rank, in_force
    from .runtime import init

    cores = cores_per_rank(init().local_size)
    checks.append(Check("Horovod settings", OK, f"{cores:g} core(s) per rank: " + ", ".join(
        f"{x.name.removeprefix('HOROVOD_')}={x.value or '-'} ({x.source})" for x in in_force(cores))))
    checks.insert(0, Check("Horovod", OK if "MPI" in controllers else FAIL,
                           f"{_version('horovod')}; controllers: {', '.join(controllers) or 'none'}; "
                           f"GPU ops: {', '.join(ops) or 'none (CPU build)'}"))
    return checks


def _frameworks() -> list[Check]:
    torch_v, tf_v, keras_v = _version("torch"), _version("tensorflow"), _version("keras")
    checks = [
        Check("PyTorch", OK if torch_v else WARN, torch_v or "not installed (TorchAgent unavailable)"),
        Check("TensorFlow", OK if tf_v else WARN, tf_v or "not installed (KerasAgent unavailable)"),
        Check("Keras", OK if keras_v and keras_v.startswith("3") else WARN, keras_v or "not installed"),
    ]
    if not (torch_v or tf_v):
        checks.append(Check("frameworks", FAIL, "neither PyTorch nor TensorFlow is installed"))
    gpus = []
    if torch_v:
        import torch

        if torch.cuda.is_available():
            gpus.append(f"torch sees {torch.cuda.device_count()} CUDA device(s)")
    if tf_v:
        import tensorflow as tf

        n = len(tf.config.list_physical_devices("GPU"))
        if n:
            gpus.append(f"TensorFlow sees {n} GPU(s)")
    checks.append(Check("GPUs", OK, "; ".join(gpus) or "none visible (CPU training)"))
    return checks


def _guard(section: Callable[[], list[Check]], name: str) -> list[Check]:
    try:
        return section()
    except Exception as err:  # noqa: BLE001 - the doctor reports, it does not crash
        return [Check(name, FAIL, f"{type(err).__name__}: {err}")]


def run_checks() -> list[Check]:
    """All checks, in report order. Collective when run on several ranks (a gather)."""
    checks = _guard(_mpi, "MPI") + _guard(_osc, "osc components") + _guard(_horovod, "Horovod")
    return checks + _guard(_frameworks, "frameworks")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hvdagents doctor", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    checks = run_checks()
    failed = [c for c in checks if c.status == FAIL]
    import hvdagents as hva

    ctx = hva.init()
    if ctx.mpi_world and ctx.size > 1:
        failed_anywhere = ctx.comm.allreduce(len(failed))
    else:
        failed_anywhere = len(failed)
    if ctx.is_root:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"[{c.status:>4}] {c.name:<{width}}  {c.detail}")
        sync_only = any(c.name == ONE_SIDED and c.status != OK for c in checks)
        if failed_anywhere:
            print(f"verdict: NOT ready ({failed_anywhere} failed check(s))")
        else:
            print("verdict: ready" + (" for synchronous strategies only (see one-sided windows)" if sync_only else ""))
    elif failed:
        for c in failed:
            print(f"[rank {ctx.rank}] [{c.status}] {c.name}: {c.detail}")
    return 1 if failed_anywhere else 0
