"""MPI one-sided windows for the asynchronous strategies: the parameter store and its companions.

Three window kinds, one module each, share one lifecycle (:mod:`._base`):

- :class:`ParameterWindow` — one vector *sharded* over all ranks: any rank adds to it
  (``push``, element-wise atomic) or reads it (``pull``) without the owners taking part.
  Downpour and EASGD keep their centre here.
- :class:`InboxWindow` — every rank holds a *full* vector that any rank adds to (``deliver``)
  or reads (``read``) and that only its owner empties (``take``). Gossip keeps each agent's
  effective model here (last publication + what peers delivered since).
- :class:`ClockWindow` — one int64 step counter per rank, for bounded staleness and for
  counting the updates a centre received (staleness-aware Downpour).

RMA rules followed throughout: memory comes from ``MPI.Win.Allocate``; every window is in
one passive-target epoch (``Lock_all``, shared, ``MODE_NOCHECK``) from construction to
:meth:`close`; writes are ``Accumulate``/``Fetch_and_op`` and reads that may race with them
are ``Get_accumulate(op=NO_OP)``, never plain ``Get``, so every element read is a whole
value; an operation returns after ``Flush`` (complete at the target). Only shared locks
exist, so no two ranks can deadlock on lock order. Concurrent operations on one location
only combine one op with ``NO_OP`` (MPI's default ``accumulate_ops=same_op_no_op``).

Freeing: ``close()`` is collective (``MPI_Win_free``). A collective free cannot run from
garbage collection, which happens at different moments on different ranks; so a window that
is dropped without ``close()`` is *not* freed by the collector (its ``__del__`` only emits a
``ResourceWarning``). Its MPI side stays registered here, and an ``atexit`` hook, registered
with the first window, frees every window still open in creation order before mpi4py
finalizes MPI. Every rank created its windows in the same collective order, so every rank
frees them in an order that cannot deadlock. A rank that dies of an exception does not get
there: :func:`hvdagents.init`'s abort hook ends the whole job first. mpi4py itself never
frees windows on collection either (it leaves that to ``Win.Free``).
"""

from ._base import SUPPORTED_DTYPES
from .clock import RETIRED, ClockWindow
from .inbox import InboxWindow
from .store import ParameterWindow

__all__ = ["ParameterWindow", "InboxWindow", "ClockWindow", "RETIRED", "SUPPORTED_DTYPES"]
