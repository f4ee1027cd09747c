"""Elastic training on Horovod's elastic machinery: survive a lost worker, take in a new one.

Launched by ``horovodrun --gloo --min-np M --max-np N --host-discovery-script S ...`` (Horovod's
Gloo controller; Horovod's elastic mode has no MPI launch), the training loop runs inside
:func:`run` with a :class:`State`::

    agent = hva.TorchAgent(model, optimizer, strategy=hva.Sync())
    state = hva.elastic.State(agent, epoch=0, position=0)

    @hva.elastic.run
    def train(state):
        while state.epoch < epochs:
            while (batch := hva.elastic.epoch_batch(len(x), state.position, 32, epoch=state.epoch)):
                indices, state.position = batch
                ...  # forward, backward, optimizer.step() as always
                if step % 10 == 0:
                    state.commit()
            state.epoch, state.position = state.epoch + 1, 0
            state.commit()

    train(state)
    agent.close()

A ``KerasAgent`` trains the same way, its step being :meth:`~hvdagents.KerasAgent.train_on_batch`
(Keras' compiled train step on this rank's share, then the strategy's step)::

    agent = hva.KerasAgent(model, strategy=hva.Sync())   # model compiled and built
    state = hva.elastic.State(agent, epoch=0, position=0)
    ...     # the same train(state), with agent.train_on_batch(x[indices], y[indices]) as the step

It is built on ``horovod.tensorflow``'s primitives and ``horovod.common.elastic``, not on
``horovod.tensorflow.keras.elastic`` (which does not run under Keras 3). ``agent.fit`` is not
elastic: Keras' loop cannot resume an epoch at a sample position nor re-shard its data for a new
world; an epoch of ``fit`` between commits would be redone whole after a lost worker.

What happens when (Horovod's rules, which :func:`run` keeps):

- a worker dies (SIGKILL, a lost host): the collective in flight fails on the survivors with
  ``HorovodInternalError``; each one puts back its last commit (:meth:`State.restore`), Horovod
  is restarted on the survivors (its driver blacklists the failed worker's host: for the rest of
  the job, unless horovodrun was given ``--blacklist-cooldown-range``), and after
  :meth:`State.sync` every rank holds rank 0's commit: training continues from there with N−1
  workers. Steps since the last commit are done again.
- a host appears in the discovery script's output: Horovod's driver tells rank 0, and at the
  next :meth:`State.commit` every rank raises ``HostsUpdatedInterrupt`` together; Horovod is
  restarted with the new worker, which gets the state from rank 0 in :meth:`State.sync`, and
  the world grows. Nothing is rolled back.
- fewer workers than ``--min-np`` are left: Horovod's driver waits for hosts up to
  ``--elastic-timeout`` seconds (default 600), then ends the job with "Timed out waiting for
  ... at least M Horovod processes".

After a reset, :func:`hvdagents.context` (and ``agent.context``) hold the new rank and size,
the strategy's runner is rebound to the new world (``Sync``'s gradient reducer is made again;
with ``KerasAgent`` the compiled train step is traced again),
and the callbacks given to :meth:`State.register_reset_callbacks` run, before the sync: the place
to rescale a learning rate with the world size (the user's choice; nothing is rescaled
otherwise).

Refused (:class:`~hvdagents.UsageError` at :class:`State` construction, and at the agent's
under an elastic launch): the asynchronous strategies (``Downpour``, ``EASGD``, ``Gossip``,
``max_staleness``: their MPI windows cannot change size), ``ZeRO`` (each rank holds a part of the
optimizer's state, which a lost worker takes with it), and ``hierarchical``/``node_period``
(communicators per node). Their way to survive a lost worker is a checkpoint and a requeue
(:mod:`hvdagents.preemption`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np
from horovod.common.elastic import State as HorovodState
from horovod.common.elastic import run_fn
from horovod.common.exceptions import HorovodInternalError

from .agent import ROOT_RANK, Agent, check_same_model
from .data import shard_bounds
from .errors import UsageError
from .strategies.base import RunnerState
from .strategies.config import Strategy, ZeRO

__all__ = ["State", "run", "epoch_batch", "elastic_launch", "elastic_problem", "ELASTIC_VARIABLE"]

#: The variable ``horovodrun`` sets to 1 in every worker of an elastic launch.
ELASTIC_VARIABLE = "HOROVOD_ELASTIC"

#: The way out that the refusals name.
_INSTEAD = ("To survive a lost worker with it, checkpoint and requeue instead (agent.save_checkpoint + "
            "hvdagents.preemption.PreemptionFlag, slurm/requeue.sbatch), launched without --min-np/--max-np.")

#: Names a :class:`State` keeps for itself (a user value cannot take them).
_RESERVED = frozenset({"agent", "commit", "save", "restore", "sync", "reset", "on_reset", "on_hosts_updated",
                       "check_host_updates", "register_reset_callbacks", "values"})


def elastic_launch(env: Mapping[str, str]) -> bool:
    """Whether this process is a worker of ``horovodrun``'s elastic launch (``--min-np``,
    ``--max-np`` or ``--host-discovery-script``). Pure: reads ``env`` only."""
    return env.get(ELASTIC_VARIABLE) == "1" and bool(env.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"))


def elastic_problem(agent_kind: str, strategy: Strategy) -> Optional[tuple[type, str]]:
    """``(error class, message)`` when an agent of ``agent_kind`` with ``strategy`` cannot
    train elastically, else ``None``. Pure."""
    name = type(strategy).__name__
    if agent_kind not in ("TorchAgent", "KerasAgent"):
        return UsageError, (f"hva.elastic supports TorchAgent and KerasAgent; {agent_kind} cannot train under an "
                            f"elastic launch. {_INSTEAD}")
    if not strategy.synchronous or getattr(strategy, "max_staleness", None) is not None:
        return UsageError, (f"hva.{name} is asynchronous (MPI one-sided windows, whose world cannot grow or "
                            f"shrink) and cannot train elastically. {_INSTEAD}")
    if isinstance(strategy, ZeRO):
        return UsageError, ("hva.ZeRO cannot train elastically: each rank holds a part of the optimizer's state, "
                            "which a lost worker takes with it. Use hva.Sync() (the whole state on every rank), "
                            f"or ZeRO with a checkpoint and a requeue. {_INSTEAD}")
    if getattr(strategy, "hierarchical", False) or getattr(strategy, "node_period", None) is not None:
        return UsageError, (f"hva.{name}(hierarchical=True / node_period=...) builds communicators per node, which "
                            f"an elastic reset cannot rebuild; use it without them. {_INSTEAD}")
    return None


@dataclass
class _Commit:
    """One commit, held by every rank: host or device copies, nothing shared with the model."""

    framework: Any  # the agent's checkpoint state: model and optimizer state dicts
    strategy: dict[str, int]  # RunnerState.to_dict()
    shared: Optional[np.ndarray]  # the runner's snapshot (DiLoCo's outer state), or None
    values: dict[str, Any]  # the user's values (epoch, position, ...)


class State(HorovodState):
    """What an elastic job keeps to survive a lost worker: the agent's model and optimizer (Keras:
    the weights and every optimizer variable, its iteration counter included), the strategy's
    running state (step counters; ``LocalSGD``'s place in its period; ``DiLoCo``'s
    θ_global and outer momentum), and the user's values, given as keywords and read and written
    as attributes (``State(agent, epoch=0, position=0)``; ``state.epoch += 1``).

    The pieces are those :meth:`~hvdagents.Agent.save_checkpoint` stores (``_framework_state``,
    the runner's state and snapshot): a commit is a checkpoint held in memory by every rank.

    Collective construction is not needed: it is local (every rank commits its own state; the
    first :meth:`sync`, at the start of :func:`run`, gives every rank rank 0's). Refuses, with
    :class:`~hvdagents.UsageError`, what cannot be elastic (see :mod:`hvdagents.elastic`), and
    a job of more than one rank launched by MPI (``mpirun``; Horovod's elastic mode runs on its
    Gloo controller only).

    Learning-rate scaling with the world size is the user's choice: ``register_reset_callbacks
    ([fn])`` (Horovod's) runs ``fn()`` on every rank after each reset, with
    :func:`hvdagents.context` already holding the new size, before the state is synced.
    """

    def __init__(self, agent: Agent, **values: Any) -> None:
        if not isinstance(agent, Agent):
            raise TypeError(f"hva.elastic.State takes an agent (hva.TorchAgent, hva.KerasAgent); "
                            f"got {type(agent).__name__}")
        refused = elastic_problem(type(agent).__name__, agent.strategy)
        if refused is not None:
            raise refused[0](refused[1])
        if agent.context.mpi_world and agent.context.size > 1:
            raise UsageError(
                f"hva.elastic needs Horovod's elastic launch (horovodrun --gloo --min-np ... --max-np ... "
                f"--host-discovery-script ...); this job was launched by {agent.context.launcher} with "
                f"{agent.context.size} MPI ranks, where a lost rank ends the job. {_INSTEAD}"
            )
        taken = sorted(_RESERVED.intersection(values)) + sorted(k for k in values if k.startswith("_"))
        if taken:
            raise ValueError(f"hva.elastic.State: {taken[0]!r} cannot be a value's name (State uses it); "
                             "choose another name")
        self.agent = agent
        self._names = tuple(values)
        for name, value in values.items():
            setattr(self, name, value)
        super().__init__(bcast_object=self._broadcast_object, get_rank=lambda: agent.context.rank)
        self._saved: Optional[_Commit] = None
        self._synced = False  # True once this rank took part in a sync (it holds the job's state)
        self.save()

    @property
    def values(self) -> dict[str, Any]:
        """The user's values now, by name. Local."""
        return {name: getattr(self, name) for name in self._names}

    # -- Horovod's State: save / restore / sync / reset --------------------------------------------
    def commit(self) -> None:
        """Collective (every rank at the same step): :meth:`save`, then Horovod's check for
        hosts added or removed (one small broadcast from rank 0), which raises
        ``HostsUpdatedInterrupt`` on every rank alike when the world must change (handled by
        :func:`run`). Its cost is a copy of the model and the optimizer's state in memory and
        that broadcast (measured in the README's "Elastic training")."""
        with _lost_peer_errors(self.agent):
            super().commit()

    def save(self) -> None:
        """Local: copy the model's and optimizer's state, the strategy's state and the user's
        values (the copies share nothing with the live ones; tensors stay on their device)."""
        agent = self.agent
        shared = agent._runner.snapshot()
        self._saved = _Commit(
            framework=copy.deepcopy(agent._framework_state()),
            strategy=agent.runner_state.to_dict(),
            shared=None if shared is None else np.array(shared, copy=True),
            values=copy.deepcopy(self.values),
        )

    def restore(self) -> None:
        """Local: put back the last commit (model, optimizer, strategy counters, user values),
        undoing every step since. A runner's shared state (``DiLoCo``'s outer state) is put back
        by the :meth:`sync` that :func:`run` makes next."""
        saved = self._saved
        agent = self.agent
        # A fresh copy: torch's Optimizer.load_state_dict keeps the very tensors it is given
        # (same device and dtype), which the next steps would change in place.
        agent._restore_framework_state(copy.deepcopy(saved.framework))
        agent._runner.state = RunnerState.from_dict(saved.strategy)
        for name, value in copy.deepcopy(saved.values).items():
            setattr(self, name, value)

    def sync(self) -> None:
        """Collective over the (new) world: every rank takes the last commit of the lowest rank
        that trained before (rank 0 at the start of the job; after a reset the lowest survivor,
        since Horovod may give rank 0 to a worker that just joined), that rank included (it first
        puts its commit back; progress since is dropped), then commits it, so that every rank's
        next :meth:`restore` puts back the same state.

        Checks first that every rank built the same model
        (:class:`~hvdagents.ModelMismatchError` on every rank). Then model and optimizer travel
        as the agent's resume from a checkpoint does (Horovod's broadcasts), the strategy's
        counters, the user's values and the runner's snapshot as one object, and the runner's
        shared state is set through its own collective restore (``DiLoCo``: exact)."""
        with _lost_peer_errors(self.agent):
            self._sync()

    def _sync(self) -> None:
        agent = self.agent
        gathered = agent._allgather_object((agent._signature(), self._synced), name="hvdagents.elastic.start")
        check_same_model([signature for signature, _ in gathered])
        root = next((rank for rank, (_, synced) in enumerate(gathered) if synced), ROOT_RANK)
        is_root = agent.context.rank == root
        if is_root:
            self.restore()
        agent._broadcast_state(root=root)
        rest = agent._broadcast_object(
            {"strategy": agent.runner_state.to_dict(), "values": self.values, "shared": self._saved.shared}
            if is_root else None, name="hvdagents.elastic.state", root=root)
        agent._runner.state = RunnerState.from_dict(rest["strategy"])
        for name, value in rest["values"].items():
            setattr(self, name, value)
        agent._runner.restore(agent, rest["shared"] if agent.context.rank == ROOT_RANK else None)  # read on rank 0
        agent._elastic_synced = self._synced = True
        self.save()

    def reset(self) -> None:
        """Local, called by Horovod after it restarted with the new world, before the reset
        callbacks and :meth:`sync`: the process's context and the agent's take the new rank and
        size, and the strategy's runner is rebound to the new world."""
        from .runtime import refresh_from_horovod

        self.agent.context = refresh_from_horovod(_framework(self.agent))
        self.agent._runner.rebind(self.agent)

    def _broadcast_object(self, obj: Any) -> Any:
        """Collective: rank 0's ``obj`` on every rank (Horovod's host-update check)."""
        return self.agent._broadcast_object(obj, name="hvdagents.elastic.hosts")


def run(train: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: ``run(train)(state, *args, **kwargs)`` calls ``train(state, ...)`` under
    Horovod's elastic loop (``horovod.common.elastic.run_fn`` with the reset of the agent's
    binding, as ``horovod.torch.elastic.run`` and ``horovod.tensorflow.elastic.run`` make it)
    and returns what it returns.

    Before the first call, and after every reset, :meth:`State.sync` gives every rank rank 0's
    commit. A lost worker (``HorovodInternalError`` in a collective): every survivor restores its
    last commit, Horovod restarts on the survivors, ``train`` is called again. Hosts added or
    removed (``HostsUpdatedInterrupt``, raised by :meth:`State.commit`): Horovod restarts with the
    new world and ``train`` is called again, with nothing rolled back. ``train`` must read its
    position (epoch, sample) from ``state`` so that it resumes where the commit was; nothing
    collective may run between the agent's construction and the call (a joining worker would
    meet the others' sync).

    ``KerasAgent``: Horovod's TensorFlow ops fail with TensorFlow's errors; every such error that
    a Horovod op raised in ``train``, :meth:`State.commit` or :meth:`State.sync` is turned into
    ``HorovodInternalError`` here (``horovod.tensorflow.elastic.run`` does it for three op names
    only, not the grouped all-reduce of ``Sync``'s train step, and drops the other errors).

    A worker lost during :meth:`~hvdagents.Agent.close` (after ``run`` returned) ends the job."""

    @functools.wraps(train)
    def wrapper(state: State, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(state, State):
            raise TypeError(f"hva.elastic.run: the first argument must be an hva.elastic.State; "
                            f"got {type(state).__name__}")
        framework = _framework(state.agent)
        binding = state.agent._hvd

        def reset() -> None:  # Horovod's elastic reset: restart the binding on the new world
            binding.shutdown()
            binding.init()

        def converted(state: State, *args: Any, **kwargs: Any) -> Any:
            with _lost_peer_errors(state.agent):
                return train(state, *args, **kwargs)

        return run_fn(converted if framework == "tensorflow" else train, reset)(state, *args, **kwargs)

    return wrapper


def _framework(agent: Agent) -> str:
    """``"torch"`` or ``"tensorflow"``: the Horovod binding ``agent`` communicates through. Pure."""
    return "tensorflow" if agent._hvd is not None and agent._hvd.__name__.startswith("horovod.tensorflow") \
        else "torch"


def _from_horovod(err: BaseException) -> bool:
    """Whether a TensorFlow error was raised by one of Horovod's ops (their type names start
    with ``Horovod``; a lost peer fails them with "Horovod has been shut down" or Gloo's error). Pure."""
    return "Horovod" in str(err)


@contextlib.contextmanager
def _lost_peer_errors(agent: Agent) -> Iterator[None]:
    """``KerasAgent``: a TensorFlow error raised by a Horovod op becomes ``HorovodInternalError``
    (what Horovod's elastic loop recovers from); ``TorchAgent``'s binding raises it itself."""
    if _framework(agent) != "tensorflow":
        yield
        return
    import tensorflow as tf

    try:
        yield
    except tf.errors.OpError as err:
        if _from_horovod(err):
            raise HorovodInternalError(err) from err
        raise


@functools.lru_cache(maxsize=4)
def _permutation(n: int, epoch: int, seed: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(n)


def epoch_batch(n: int, position: int, batch_size: int, *, epoch: int, seed: int = 0,
                rank: Optional[int] = None, size: Optional[int] = None) -> Optional[tuple[np.ndarray, int]]:
    """This rank's share of the next global batch of an epoch, and the position after it; or
    ``None`` when the epoch is over. Pure (local, no communication).

    The epoch visits the ``n`` samples in one order, the same on every rank and in every world
    (a permutation drawn from ``(seed, epoch)``). ``position`` is the number of samples of that
    order the job consumed this epoch: the next global batch is the next ``batch_size * size``
    of them (fewer at the end), cut between the ranks as :func:`hvdagents.shard` cuts (sizes
    differ by one at most). Keep ``position`` in the :class:`State` (``state.position``).

    The guarantee, across any number of resets: in an epoch, every sample enters exactly one
    committed step, none is skipped, none is used twice, whatever the world size was at each
    step. Steps rolled back after a lost worker used their samples without effect on the state
    (the commit is before them), and they are consumed again, re-split for the new world. The
    one exception: an epoch's last global batch when it has fewer samples than ranks is
    dropped (every rank must take part in every step), so up to ``size - 1`` samples of an epoch
    are skipped, the same ones for a given world size. ``rank``/``size`` default to the job's
    now (:func:`hvdagents.context`, which a reset updates)."""
    if rank is None or size is None:
        from .runtime import context

        ctx = context()
        rank = ctx.rank if rank is None else rank
        size = ctx.size if size is None else size
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"epoch_batch: batch_size must be an int >= 1; got {batch_size!r}")
    if not 0 <= position <= n:
        raise ValueError(f"epoch_batch: position must be in [0, {n}]; got {position}")
    stop = min(n, position + batch_size * size)
    if stop - position < size:
        return None
    lo, hi = shard_bounds(stop - position, rank, size)
    return _permutation(n, epoch, seed)[position + lo:position + hi], stop
