"""Bring-up of an agent process: MPI, identity, launcher checks, Horovod bindings, abort.

``init()`` initialises MPI through mpi4py (which asks for ``MPI_THREAD_MULTIPLE``, as
Horovod needs), works out who we are and how we were launched, and installs the
abort-on-error hook; a rank that exits with an open agent while the others go on ends the
job too (:func:`agent_opened`). Horovod bindings are initialised lazily, per framework, by
:func:`horovod_binding` when the first agent of that framework is made: ``horovod.torch``
and ``horovod.tensorflow`` keep separate state and each needs its own ``init``.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Mapping

from . import horovod_settings
from .errors import LauncherError, ThreadLevelError, UsageError

__all__ = [
    "Context",
    "init",
    "context",
    "is_initialized",
    "detect_launcher",
    "check_launch",
    "no_mpi_world",
    "horovod_binding",
    "pin_gpu",
    "abort",
    "agent_opened",
    "agent_closed",
    "EXIT_AGREEMENT_S",
    "EXIT_AGREEMENT_VARIABLE",
    "exit_agreement_seconds",
]

#: How long a rank that exits with an open agent waits for every other rank to exit too
#: before it ends the job: ranks that leave together (``PreemptionFlag.exit_for_requeue``, a
#: script that ends on every rank without ``close()``) exit as they meant to; a rank that
#: leaves alone would leave the others waiting for it forever. The default of
#: :data:`EXIT_AGREEMENT_VARIABLE`.
EXIT_AGREEMENT_S = 10.0

#: The environment variable that sets that wait, in seconds (read by :func:`init`).
EXIT_AGREEMENT_VARIABLE = "HVDAGENTS_EXIT_AGREEMENT_S"

#: Polling interval of that wait.
_EXIT_POLL_S = 0.01

#: Horovod framework bindings by the name agents use.
_BINDINGS = {"torch": "horovod.torch", "tensorflow": "horovod.tensorflow"}


@dataclass(frozen=True)
class Context:
    """Who this process is in the job. Returned by :func:`init`; read-only.

    ``rank``/``size`` are the job's (MPI's, or Horovod's under a ``horovodrun --gloo``
    launch, where MPI sees a world of one); ``local_rank``/``local_size`` count the
    processes on this node. ``launcher`` is one of ``"mpirun"``, ``"srun"``,
    ``"horovodrun"``, ``"horovodrun-gloo"``, ``"mpiexec"`` or ``"python"`` (a world of one).
    ``mpi_world`` is False only under a Gloo launch: there is no MPI world, so one-sided
    (asynchronous) strategies cannot run.
    """

    rank: int
    size: int
    local_rank: int
    local_size: int
    launcher: str
    mpi_world: bool
    thread_level: str

    @property
    def is_root(self) -> bool:
        """True on rank 0, the rank that prints, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def comm(self) -> Any:
        """``MPI.COMM_WORLD`` (a world of one under a Gloo launch)."""
        from mpi4py import MPI

        return MPI.COMM_WORLD


_lock = threading.Lock()
_context: Context | None = None
_bindings: dict[str, ModuleType] = {}
_exit_comm: Any = None  # a duplicate of COMM_WORLD for the exit agreement only
_exit_agreement_s = EXIT_AGREEMENT_S  # this process's wait, from the environment at init()
_open_agents: dict[int, str] = {}  # id(agent) -> what it is, while it is open


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                continue
    return None


def exit_agreement_seconds(env: Mapping[str, str]) -> float:
    """The exit agreement's wait in seconds: :data:`EXIT_AGREEMENT_VARIABLE` in ``env``, or
    :data:`EXIT_AGREEMENT_S` when it is unset or empty. Pure; raises ``ValueError`` naming the
    variable unless it is a finite positive number."""
    text = env.get(EXIT_AGREEMENT_VARIABLE, "").strip()
    if not text:
        return EXIT_AGREEMENT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not (0 < seconds < float("inf")):
        raise ValueError(
            f"{EXIT_AGREEMENT_VARIABLE} must be a positive number of seconds (how long a rank that "
            f"exits with an open agent waits for the other ranks to exit too; default "
            f"{EXIT_AGREEMENT_S:g}); got {text!r}"
        )
    return seconds


def detect_launcher(env: Mapping[str, str]) -> str:
    """Name the launcher that started this process, from its environment variables alone."""
    if env.get("HOROVOD_GLOO_RENDEZVOUS_ADDR") or env.get("HOROVOD_CONTROLLER") == "gloo":
        return "horovodrun-gloo"
    started_by_mpirun = "OMPI_MCA_orte_hnp_uri" in env or "OMPI_COMM_WORLD_SIZE" in env
    if started_by_mpirun and env.get("OMPI_MCA_pml") == "ob1" and env.get("OMPI_MCA_btl") == "^openib":
        # horovodrun --mpi exports no variable of its own; it runs mpirun with exactly these
        # two MCA settings, which Open MPI passes to the ranks. A heuristic, used for reports.
        return "horovodrun"
    if started_by_mpirun:
        return "mpirun"
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return "srun"
    if "PMI_SIZE" in env or "PMI_RANK" in env:
        return "mpiexec"
    return "python"


#: Variables a process manager sets for MPI (PMIx, PMI-1/2, Open MPI's mpirun); a SLURM step
#: with none of them was started by srun without an MPI plugin.
_PMI_VARIABLES = ("PMIX_RANK", "PMI_RANK", "PMI_FD", "OMPI_COMM_WORLD_SIZE")


def check_launch(env: Mapping[str, str], mpi_size: int | None) -> None:
    """Refuse the classic launch mistakes with an error that names the fix.

    Pure: reads ``env`` and the MPI world size only. ``mpi_size=None`` is the check made
    before MPI is initialised: Open MPI itself aborts in ``MPI_Init`` under ``srun`` without
    ``--mpi=pmix``, so that mistake must be caught from the environment first.
    """
    step_tasks = _int(env, "SLURM_STEP_NUM_TASKS")
    no_pmi = not any(name in env for name in _PMI_VARIABLES)
    if step_tasks is not None and step_tasks > 1 and (mpi_size == 1 or (mpi_size is None and no_pmi)):
        raise LauncherError(
            f"SLURM started {step_tasks} tasks but MPI sees a world of one in each: every task "
            "is running alone. Launch with 'srun --mpi=pmix ...' (or set "
            "SLURM_MPI_TYPE=pmix), or use mpirun inside the allocation."
        )
    if mpi_size is None:
        return
    hvd_size = _int(env, "HOROVOD_SIZE")
    if mpi_size == 1 and hvd_size is not None and hvd_size > 1:
        if detect_launcher(env) != "horovodrun-gloo":
            raise LauncherError(
                f"Horovod's environment says {hvd_size} ranks but MPI sees a world of one. "
                "Launch with 'horovodrun --mpi' or 'mpirun', or with 'horovodrun --gloo' "
                "for synchronous strategies only."
            )
    elif mpi_size > 1 and hvd_size is not None and hvd_size != mpi_size:
        raise LauncherError(
            f"Horovod's environment says {hvd_size} ranks but MPI sees {mpi_size}: "
            "the job was started by two launchers at once; use one."
        )


def no_mpi_world(needs: str, otherwise: str | None = None) -> LauncherError:
    """The :class:`~hvdagents.errors.LauncherError` for a launch without an MPI world
    (``horovodrun --gloo``), for the caller to raise: ``needs`` says what needs MPI and for
    what, ``otherwise`` what works under Gloo instead (if anything). The fix it names, the
    launchers that make an MPI world, is the same for everything that needs one."""
    fix = "Launch with mpirun, srun --mpi=pmix, or horovodrun without --gloo"
    return LauncherError(
        f"{needs}, and this job was started by 'horovodrun --gloo', which has no MPI world "
        f"(MPI sees a world of one). {fix}" + (f"; or {otherwise}." if otherwise else ".")
    )


def _thread_level_name(level: int) -> str:
    from mpi4py import MPI

    names = {
        MPI.THREAD_SINGLE: "MPI_THREAD_SINGLE",
        MPI.THREAD_FUNNELED: "MPI_THREAD_FUNNELED",
        MPI.THREAD_SERIALIZED: "MPI_THREAD_SERIALIZED",
        MPI.THREAD_MULTIPLE: "MPI_THREAD_MULTIPLE",
    }
    return names.get(level, str(level))


def init(*, timeline: str | os.PathLike | None = None, autotune: bool | None = None,
         autotune_log: str | os.PathLike | None = None) -> Context:
    """Initialise this process as an agent and return its :class:`Context`. Idempotent.

    ``timeline``: a file that Horovod's timeline is written to (Chrome trace JSON, by rank 0:
    every collective's negotiation and execution, open it in ``chrome://tracing`` or Perfetto).
    ``autotune``: Horovod tunes its fusion threshold and cycle time while training (and logs
    its samples to ``autotune_log``). They take effect when the first agent starts Horovod;
    asking for them after that raises :class:`UsageError`. See
    :mod:`hvdagents.horovod_settings` for the defaults hvdagents gives Horovod.

    Collective on the first call (every rank must call it): MPI is initialised through
    mpi4py at ``MPI_THREAD_MULTIPLE`` and a node-local communicator is split off to find
    the local rank. Later calls return the same context without communicating.

    Call it first, before ``model.cuda()`` or building a TensorFlow model: when this process
    sees several GPUs it is pinned here to the one of its local rank (``CUDA_VISIBLE_DEVICES``
    narrowed, see :mod:`hvdagents.devices`); a framework that already started CUDA raises
    :class:`~hvdagents.UsageError` naming the fix.

    Raises :class:`ThreadLevelError` when MPI grants less than ``MPI_THREAD_MULTIPLE``, and
    :class:`LauncherError` for launches that cannot work (see :func:`check_launch`).
    A rank that dies of an uncaught exception afterwards prints its traceback prefixed with
    its rank and aborts the whole job (``MPI_Abort``); so does a rank that exits with an open
    agent while the other ranks do not exit (:func:`agent_opened`). Ranks other than 0 import TensorFlow
    without its start-up notices (:mod:`hvdagents.quiet`); everything else they print is kept.
    """
    global _context, _exit_agreement_s
    with _lock:
        if timeline is not None or autotune is not None or autotune_log is not None:
            if _bindings:
                raise UsageError(
                    "hva.init(timeline=..., autotune=...) came after Horovod started (an agent "
                    "exists already): pass them to the first hva.init() call"
                )
            horovod_settings.requested(timeline=timeline, autotune=autotune, autotune_log=autotune_log)
        if _context is not None:
            return _context
        env = os.environ
        check_launch(env, None)
        _exit_agreement_s = exit_agreement_seconds(env)  # a bad value fails here, not at exit
        import mpi4py

        mpi4py.rc.thread_level = "multiple"
        from mpi4py import MPI

        provided = MPI.Query_thread()
        if provided < MPI.THREAD_MULTIPLE:
            raise ThreadLevelError(
                f"MPI granted {_thread_level_name(provided)}; Horovod beside mpi4py needs "
                "MPI_THREAD_MULTIPLE. Use an MPI built with thread support (Open MPI >= 3 is), "
                "and do not initialise MPI before hvdagents with a lower level."
            )
        world = MPI.COMM_WORLD
        check_launch(env, world.Get_size())
        launcher = detect_launcher(env)
        if launcher == "horovodrun-gloo" and world.Get_size() == 1:
            rank = _int(env, "HOROVOD_RANK") or 0
            size = _int(env, "HOROVOD_SIZE") or 1
            local_rank = _int(env, "HOROVOD_LOCAL_RANK") or 0
            local_size = _int(env, "HOROVOD_LOCAL_SIZE") or 1
            mpi_world = False
        else:
            rank, size = world.Get_rank(), world.Get_size()
            local = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
            local_rank, local_size = local.Get_rank(), local.Get_size()
            local.Free()
            mpi_world = True
        _context = Context(
            rank=rank,
            size=size,
            local_rank=local_rank,
            local_size=local_size,
            launcher=launcher,
            mpi_world=mpi_world,
            thread_level=_thread_level_name(provided),
        )
        if size > 1:
            _install_abort_hook(_context)
            if mpi_world:
                global _exit_comm
                _exit_comm = world.Dup()  # collective, as init is; used at exit only
        if rank != 0:  # only rank 0 speaks: TensorFlow's start-up notices once, not per rank
            from .quiet import quiet_tensorflow_import

            quiet_tensorflow_import()
        from .devices import pin_process

        pin_process(local_rank, local_size)  # before any framework starts CUDA
        return _context


def is_initialized() -> bool:
    """Whether :func:`init` has run in this process."""
    return _context is not None


def context() -> Context:
    """The context of this process (calls :func:`init` on first use)."""
    return _context if _context is not None else init()


def refresh_from_horovod(framework: str) -> Context:
    """Local: take this process's rank, size, local rank and local size from ``framework``'s
    Horovod binding (restarted by an elastic reset, see :mod:`hvdagents.elastic`: the world
    grew or shrank) and return the new context, which :func:`context` returns from then on.
    Only under ``horovodrun --gloo`` (no MPI world, whose size never changes)."""
    global _context
    with _lock:
        hvd = _bindings.get(framework)
        if _context is None or hvd is None or _context.mpi_world:
            raise UsageError("refresh_from_horovod: only after an agent started Horovod under horovodrun --gloo")
        import dataclasses

        _context = dataclasses.replace(_context, rank=hvd.rank(), size=hvd.size(),
                                       local_rank=hvd.local_rank(), local_size=hvd.local_size())
        return _context


def horovod_binding(framework: str) -> ModuleType:
    """The Horovod binding for ``framework`` (``"torch"`` or ``"tensorflow"``), initialised.

    Collective on its first call for a framework: every rank must make its first agent of
    that framework at the same point. The binding is initialised on ``MPI.COMM_WORLD``
    (on Horovod's own Gloo controller under ``horovodrun --gloo``) and the process is
    pinned to its GPU by local rank when GPUs are visible.
    """
    if framework not in _BINDINGS:
        raise ValueError(f"framework must be one of {sorted(_BINDINGS)}; got {framework!r}")
    if framework in _bindings:
        return _bindings[framework]
    ctx = init()
    from importlib import import_module

    pin_gpu(framework)
    hvd = import_module(_BINDINGS[framework])
    if not hvd.is_initialized():
        horovod_settings.apply(horovod_settings.cores_per_rank(ctx.local_size))  # unless the user set them
        if ctx.mpi_world:
            hvd.init(comm=ctx.comm)
        else:
            hvd.init()
    if (hvd.rank(), hvd.size()) != (ctx.rank, ctx.size):
        raise LauncherError(
            f"{_BINDINGS[framework]} sees rank {hvd.rank()} of {hvd.size()} but MPI sees rank "
            f"{ctx.rank} of {ctx.size}; initialise Horovod through hvdagents only."
        )
    _bindings[framework] = hvd
    return hvd


_pinned: dict[str, int | None] = {}


def pin_gpu(framework: str) -> int | None:
    """Pin this process to the GPU of its local rank for ``framework`` (once; local).

    Returns the device index among the visible ones, or ``None`` without GPUs."""
    if framework not in _pinned:
        from . import devices

        ctx = init()
        pin = devices.pin_torch_gpu if framework == "torch" else devices.pin_tensorflow_gpu
        _pinned[framework] = pin(ctx.local_rank, ctx.local_size)
    return _pinned[framework]


def abort(errorcode: int = 1) -> None:
    """End the whole job now: ``MPI_Abort`` on ``COMM_WORLD`` (``os._exit`` without MPI)."""
    sys.stdout.flush()
    sys.stderr.flush()
    ctx = _context
    if ctx is not None and ctx.mpi_world and ctx.size > 1:
        ctx.comm.Abort(errorcode)
    os._exit(errorcode)


def _install_abort_hook(ctx: Context) -> None:
    """Make an uncaught exception on any rank (main or other thread) end the whole job.

    The rank's traceback is printed with every line prefixed by ``[rank N]`` so it can be
    told apart in the launcher's merged output, then the job is aborted: MPI collectives
    never wait for a rank that is gone.
    """
    previous = sys.excepthook

    def report_and_abort(exc_type, exc, tb) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            previous(exc_type, exc, tb)
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        prefix = f"[rank {ctx.rank}] "
        sys.stderr.write("".join(prefix + line + "\n" for line in text.rstrip("\n").split("\n")))
        abort(1)

    def thread_report_and_abort(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        report_and_abort(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = report_and_abort
    threading.excepthook = thread_report_and_abort


def agent_opened(agent: Any, description: str) -> None:
    """Local: ``agent`` is open from now on (until :func:`agent_closed`).

    A rank that exits while one of its agents is open (``sys.exit()``, an exception the
    user's code caught, the end of the script without ``close()``) waits up to
    :data:`EXIT_AGREEMENT_S` seconds (or :data:`EXIT_AGREEMENT_VARIABLE`'s, read by
    :func:`init`) for every other rank to exit too, then ends the whole job with
    ``MPI_Abort`` and a message naming the rank and the agent: the other ranks would wait
    for it forever in a collective, in ``close()``, or in ``MPI_Finalize``. The check is
    registered again here so that it runs before the ``atexit`` handlers registered earlier
    (Horovod's shutdown, registered when the agent started Horovod, runs after it)."""
    _open_agents[id(agent)] = description
    atexit.unregister(_exit_with_open_agents)
    atexit.register(_exit_with_open_agents)


def agent_closed(agent: Any) -> None:
    """Local: ``agent`` was closed; this rank may exit without ending the job."""
    _open_agents.pop(id(agent), None)


def _exit_with_open_agents() -> None:
    """At exit: nothing without an open agent; with one, a non-blocking barrier on every
    rank that leaves, and ``MPI_Abort`` when it does not complete in the exit agreement's wait
    (:func:`exit_agreement_seconds`, read by :func:`init`)."""
    ctx = _context
    if not _open_agents or ctx is None or _exit_comm is None:
        return
    request = _exit_comm.Ibarrier()
    deadline = time.monotonic() + _exit_agreement_s
    while not request.Test():
        if time.monotonic() >= deadline:
            agents = ", ".join(sorted(set(_open_agents.values())))
            sys.stderr.write(
                f"[rank {ctx.rank}] hvdagents: rank {ctx.rank} exited with an open {agents} "
                "(sys.exit(), an exception caught by the script, or the end of the script "
                f"without agent.close()) while other ranks did not exit within "
                f"{_exit_agreement_s:g} s: they would wait for it forever. Ending the job "
                "(MPI_Abort). Call agent.close() on every rank before leaving, or use "
                "'with agent:'.\n"
            )
            abort(1)
        time.sleep(_EXIT_POLL_S)
