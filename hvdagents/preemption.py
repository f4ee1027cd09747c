"""Checkpoint-and-requeue on a signal: the training-script half of ``slurm/requeue.sbatch``.

The contract between a batch script and a training script:

1. Before its time runs out, SLURM signals the batch shell (``#SBATCH --signal=B:USR1@300``);
   the shell forwards ``SIGUSR1`` to the ``srun`` step, which delivers it to every task.
2. Each task's :class:`PreemptionFlag` handler only sets a flag. The training loop calls
   :meth:`PreemptionFlag.should_stop` at step or epoch boundaries: a tiny all-reduce (MAX of a
   0/1 int) so every rank stops at the *same* step, even when the signal reached them at
   different moments.
3. On ``True``, rank 0 writes the checkpoint atomically (``agent.save_checkpoint``, or
   :func:`hvdagents.checkpoint.write_atomic` for your own files), every rank waits for it
   (:meth:`PreemptionFlag.exit_for_requeue` holds a barrier) and exits with
   :data:`REQUEUE_EXIT_CODE`.
4. The batch shell sees that exit code, runs ``scontrol requeue $SLURM_JOB_ID``, and the rerun
   (``SLURM_RESTART_COUNT`` > 0) passes ``--resume`` so the script continues from the checkpoint.

Example::

    flag = PreemptionFlag()              # early, in the main thread, before training starts
    ...
    for epoch in range(start_epoch, args.epochs):
        train_one_epoch()
        agent.save_checkpoint(args.checkpoint, epoch=epoch + 1)   # rank 0, atomic
        if flag.should_stop():           # collective: every rank calls it at the same points
            flag.exit_for_requeue()      # barrier, then SystemExit(REQUEUE_EXIT_CODE)

Importing this module has no side effects; MPI is touched only by :meth:`should_stop` and
:meth:`exit_for_requeue`.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any, Sequence

from .errors import ClosedError, UsageError

__all__ = ["PreemptionFlag", "REQUEUE_EXIT_CODE"]

#: Exit status meaning "checkpointed, please run me again" (``EX_TEMPFAIL`` in sysexits.h).
#: ``slurm/requeue.sbatch`` requeues the job when the step exits with it.
REQUEUE_EXIT_CODE = 75


class PreemptionFlag:
    """Catch a preemption signal (default ``SIGUSR1``) and agree across ranks when to stop.

    Installing the handler is local and must happen in the main thread (Python's rule for
    signal handlers); do it before the slow imports so an early signal is not fatal. The
    handler only records the signal. ``comm`` is the communicator to agree on (default: the
    job's ``MPI.COMM_WORLD`` from :func:`hvdagents.init`, looked up on first use).
    Use as a context manager, or call :meth:`close`, to restore the previous handlers.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGUSR1,), *, comm: Any = None) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise UsageError(
                "PreemptionFlag must be created in the main thread: Python only runs signal "
                "handlers there. Create it at the start of the training script."
            )
        self._comm = comm
        self._requested = False
        self._agreed = False
        self._closed = False
        self.signal: int | None = None
        self._previous = {int(sig): signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._requested = True
        self.signal = signum

    @property
    def requested(self) -> bool:
        """Whether a signal reached *this* rank (local; no communication)."""
        return self._requested

    def request(self) -> None:
        """Ask for a stop from code (as if the signal had arrived on this rank)."""
        self._requested = True

    def should_stop(self) -> bool:
        """Whether any rank was signalled; the same answer on every rank.

        Collective over ``comm`` and blocking: every rank must call it at the same points of
        the loop (the same step or epoch boundaries), or the job deadlocks. Costs one
        all-reduce of a single int (MAX). Once it has returned True it keeps returning True
        without communicating.
        """
        if self._closed:
            raise ClosedError("PreemptionFlag is closed")
        if self._agreed:
            return True
        comm = self._comm_or_world()
        if comm.Get_size() == 1:
            self._agreed = self._requested
            return self._agreed
        import numpy as np
        from mpi4py import MPI

        from .strategies.staleness import in_collective

        mine = np.array([1 if self._requested else 0], dtype=np.int32)
        anyone = np.zeros(1, dtype=np.int32)
        with in_collective():  # ranks with fewer steps must not hold a max_staleness bound
            comm.Allreduce(mine, anyone, op=MPI.MAX)
        self._agreed = bool(anyone[0])
        return self._agreed

    def exit_for_requeue(self) -> None:
        """Wait until every rank gets here, then exit with :data:`REQUEUE_EXIT_CODE`.

        Collective (a barrier over ``comm``): call it on every rank after rank 0 has written
        its checkpoint, so no rank's exit ends the job (``mpirun`` kills the rest when one rank
        exits non-zero) before the checkpoint is on disk. Raises ``SystemExit``.
        """
        comm = self._comm_or_world()
        if comm.Get_size() > 1:
            comm.Barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        raise SystemExit(REQUEUE_EXIT_CODE)

    def close(self) -> None:
        """Restore the signal handlers that were there before. Local; idempotent."""
        if self._closed:
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._closed = True

    def __enter__(self) -> PreemptionFlag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _comm_or_world(self) -> Any:
        if self._comm is not None:
            return self._comm
        from .runtime import init, no_mpi_world

        ctx = init()
        if ctx.size > 1 and not ctx.mpi_world:
            raise no_mpi_world("PreemptionFlag agrees through MPI")
        self._comm = ctx.comm
        return self._comm
