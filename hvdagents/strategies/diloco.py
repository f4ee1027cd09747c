"""DiLoCo's runner, outer optimizer and fragment schedule, framework-neutral.

The runner keeps the outer state on the host in NumPy float64: θ_global (the model every rank
agreed on at the last outer step of each fragment) and the outer momentum buffer. After the
schedule's steps (:func:`fragment_sent_after`) it computes this rank's pseudo-gradient
Δ = θ_global − θ_local of a fragment, starts its sum over the ranks through the adapter's
Horovod binding (:class:`FlatSum`, non-blocking), and when that finishes (``overlap`` steps
later, see :class:`~.config.DiLoCo`) applies :class:`OuterSGD` to the fragment on every rank
alike and writes the fragment of θ_global into the model.

Extension points (for an asynchronous DiLoCo, or a node-leader hierarchy): the update rule
is :class:`OuterSGD` alone (pure, float64, in place on a range); the schedule is
:func:`fragment_sent_after` alone (pure); the only collective is the adapter's
:meth:`FlatSum.start_sum`, which ``hierarchical=True`` replaces by the node leaders' sum
(:class:`~.hierarchy.HierarchicalSum`, the same contract) without touching the rest.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import numpy as np

from ..errors import ModelMismatchError, NonFiniteError, UsageError
from .base import ParameterAccess, Runner
from .config import DiLoCo, Strategy
from .hierarchy import HierarchicalSum, node_hierarchy
from .sharded import shard_ranges

__all__ = ["OuterSGD", "fragment_ranges", "fragment_sent_after", "FlatSum", "DiLoCoRunner"]


def fragment_ranges(length: int, fragments: int) -> list[tuple[int, int]]:
    """The P contiguous ranges ``[lo, hi)`` of a flat vector of ``length`` elements, in order,
    balanced to one element (the rule of :func:`~.sharded.shard_ranges`). Pure."""
    return shard_ranges(length, fragments)


def fragment_sent_after(step: int, inner_steps: int, fragments: int) -> Optional[int]:
    """The fragment whose pseudo-gradient is sent after local step ``step`` (counted from 1),
    or ``None``: fragment k after every step t ≡ (k+1)·H/P (mod H), t ≥ 1. Pure."""
    every = inner_steps // fragments
    if step < 1 or step % every:
        return None
    return (step // every - 1) % fragments


def last_sent(step: int, fragment: int, inner_steps: int, fragments: int) -> int:
    """The last step ≤ ``step`` after which ``fragment`` was sent (0: not yet). Pure."""
    first = (fragment + 1) * (inner_steps // fragments)
    return 0 if step < first else first + (step - first) // inner_steps * inner_steps


class OuterSGD:
    """The outer optimizer: PyTorch's ``torch.optim.SGD`` rule (dampening 0) on float64
    arrays, in place. For pseudo-gradient Δ and momentum μ: b ← μ·b + Δ; then
    θ ← θ − lr·(Δ + μ·b) with Nesterov, θ ← θ − lr·b without. Pure arithmetic, local."""

    def __init__(self, lr: float, momentum: float, nesterov: bool) -> None:
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)

    def step(self, theta: np.ndarray, buffer: np.ndarray, delta: np.ndarray) -> None:
        """Update ``theta`` and ``buffer`` (float64, same shape as ``delta``) in place."""
        if self.momentum == 0.0:
            theta -= self.lr * delta
            return
        buffer *= self.momentum
        buffer += delta
        direction = delta + self.momentum * buffer if self.nesterov else buffer
        theta -= self.lr * direction


class FlatSum(Protocol):
    """What DiLoCo needs of an adapter beyond :class:`~.base.ParameterAccess`."""

    def start_sum(self, values: np.ndarray, wire: str, name: str) -> Callable[[], np.ndarray]:
        """Collective, non-blocking: start the sum over all ranks of the 1-D host vector
        ``values`` (the same length and ``name`` on every rank, in the same order), sent and
        summed in ``wire`` dtype; returns a function that waits for the sum and returns it in
        float64. Ranks that left early (torch, uneven data) contribute zeros."""

    def trainable_mask(self) -> np.ndarray:
        """Booleans in :meth:`~.base.ParameterAccess.get_flat` order: True for the elements
        of the parameters that are trained (and averaged) now. Local."""


@dataclass
class _InFlight:
    """One fragment's sums in flight: the pseudo-gradient and the control numbers."""

    fragment: int
    sent_after: int
    finish_after: int
    wait_delta: Callable[[], np.ndarray]
    wait_control: Callable[[], np.ndarray]
    mask: np.ndarray
    checksum: float


#: Numbers the runners of a process, in the order made (the same on every rank, agents being
#: made collectively), so that two agents' sums in flight never share a Horovod name.
_runner_numbers = itertools.count()


def _mask_checksum(mask: np.ndarray) -> float:
    """21 bits of the CRC-32 of ``mask``: its square is exact in float64."""
    return float(zlib.crc32(np.packbits(mask).tobytes()) >> 11)


class DiLoCoRunner(Runner):
    """:class:`~.config.DiLoCo` (see its docstring for the rule and the schedule).

    ``sync_log``: ``(fragment, sent after step, applied after step)`` for every fragment
    exchange this rank took part in, in order (what the tests compare with the schedule)."""

    strategy: DiLoCo

    def __init__(self, strategy: Strategy) -> None:
        super().__init__(strategy)
        s = self.strategy
        self.outer = OuterSGD(s.outer_lr, s.outer_momentum, s.nesterov)
        self.theta_global: Optional[np.ndarray] = None
        self.momentum: Optional[np.ndarray] = None
        self.sync_log: list[tuple[int, int, int]] = []
        self._ranges: list[tuple[int, int]] = []
        self._pending: Optional[_InFlight] = None
        self._applied = 0  # outer steps of fragments this rank applied since start/restore
        self._prefix = f"hvdagents.diloco.{next(_runner_numbers)}"
        self._summer: Optional[HierarchicalSum] = None  # hierarchical=True: made at start

    def _sum(self, params: ParameterAccess) -> Callable[..., Callable[[], np.ndarray]]:
        """The sum every exchange goes through: the adapter's ``start_sum`` (flat, Horovod), or
        with ``hierarchical`` the node leaders' (:class:`~.hierarchy.HierarchicalSum`, made
        collectively on first use, which :meth:`start` is)."""
        if not self.strategy.hierarchical:
            return params.start_sum  # type: ignore[attr-defined]
        if self._summer is None:
            self._summer = HierarchicalSum(params.start_sum, node_hierarchy(params))  # type: ignore[attr-defined]
        return self._summer

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, params: ParameterAccess) -> None:
        if getattr(params, "start_sum", None) is None:
            raise UsageError(f"hva.DiLoCo is not available for {type(params).__name__}")
        self._sum(params)
        self._from_model(params)

    def _from_model(self, params: ParameterAccess) -> None:
        """Collective only when a fragment was in flight (it is finished and dropped): θ_global
        starts again from the model (the same on every rank), with zero momentum."""
        self._drop_pending()
        self.theta_global = params.get_flat().astype(np.float64)
        self.momentum = np.zeros_like(self.theta_global)
        self._ranges = fragment_ranges(self.theta_global.size, self.strategy.fragments)
        self._applied = 0

    def snapshot_shape(self, num_parameters: int) -> tuple[int, ...]:
        return (2, num_parameters)

    def rebind(self, params: ParameterAccess) -> None:
        """Local: a fragment in flight is forgotten (its sums died with the old Horovod; its
        progress is still in θ_local − θ_global, as after a resume)."""
        self._pending = None

    def snapshot(self) -> Optional[np.ndarray]:
        """Local: θ_global and the momentum, as rows of one float64 array. A fragment in
        flight is not in it: after a resume it is sent again at its next turn (its progress
        is still in θ_local − θ_global, nothing is lost)."""
        return np.stack([self.theta_global, self.momentum])

    def restore(self, params: ParameterAccess, saved: Optional[np.ndarray]) -> None:
        """Collective: rank 0's saved outer state on every rank (one float64 sum through
        Horovod, where only rank 0 contributes, so the bits travel unchanged); without one
        (``None`` on rank 0), θ_global starts again from the model, with zero momentum."""
        self._drop_pending()
        n = params.num_parameters
        rank = params.context.rank  # type: ignore[attr-defined]
        local = np.zeros(1 + 2 * n)
        if rank == 0 and saved is not None:
            local[0] = 1.0
            local[1:] = np.asarray(saved, dtype=np.float64).reshape(-1)
        agreed = self._sum(params)(local, "float64", self._prefix + ".restore")()
        if agreed[0] == 0.0:
            self._from_model(params)
            return
        self.theta_global = agreed[1:1 + n].copy()
        self.momentum = agreed[1 + n:].copy()
        self._ranges = fragment_ranges(n, self.strategy.fragments)
        self._applied = 0

    # -- the schedule -------------------------------------------------------------------------
    def after_step(self, params: ParameterAccess) -> None:
        self.state.step += 1
        step = self.state.step
        if self._pending is not None and self._pending.finish_after <= step:
            self._finish(params, step)
        fragment = fragment_sent_after(step, self.strategy.inner_steps, self.strategy.fragments)
        if fragment is not None:
            self._send(params, fragment, step)
            if self.strategy.overlap == 0:
                self._finish(params, step)

    def settle(self, params: ParameterAccess) -> None:
        """The fragment in flight is finished and applied now, before the agent's close waits
        in Horovod's join (an all-reduce still in flight there never completed)."""
        if self._pending is not None:
            self._finish(params, self.state.step)

    def finish(self, params: ParameterAccess) -> None:
        """Collective: finish a fragment in flight; make the outer state the same everywhere
        (under uneven data the ranks that stopped early missed outer steps: they take the
        state of the rank that applied the most); send every fragment trained since its last
        exchange for one last outer step; then the model is θ_global on every rank."""
        step = self.state.step
        if self._pending is not None:
            self._finish(params, step)
        self._agree_on_outer_state(params)
        s = self.strategy
        for fragment in range(s.fragments):
            if last_sent(step, fragment, s.inner_steps, s.fragments) < step:
                self._send(params, fragment, step)
                self._finish(params, step)
        params.set_flat(self.theta_global)
        if self._summer is not None:
            self._summer.hierarchy.close()
            self._summer = None

    # -- one exchange -------------------------------------------------------------------------
    def _send(self, params: ParameterAccess, fragment: int, step: int) -> None:
        if params.num_parameters != self.theta_global.size:
            raise UsageError(
                f"the model has {params.num_parameters} trained parameters now but had {self.theta_global.size} when "
                "DiLoCo started: KerasAgent shares the trainable variables, so freeze layers before making the agent"
            )
        lo, hi = self._ranges[fragment]
        mask = np.asarray(params.trainable_mask())[lo:hi]  # type: ignore[attr-defined]
        delta = (self.theta_global[lo:hi] - params.get_flat()[lo:hi].astype(np.float64)) * mask
        wire = self.strategy.wire_dtype
        scale = 1.0 / params.context.size if wire == "float16" else 1.0  # type: ignore[attr-defined]
        checksum = _mask_checksum(mask)
        name = f"{self._prefix}.{fragment}"
        self._pending = _InFlight(
            fragment, step, step + self.strategy.overlap,
            self._sum(params)(delta * scale if scale != 1.0 else delta, wire, name),
            self._sum(params)(np.array([1.0, checksum, checksum * checksum]), "float64", name + ".control"),
            mask, checksum,
        )

    def _finish(self, params: ParameterAccess, step: int) -> None:
        flight, self._pending = self._pending, None
        total = flight.wait_delta()
        active, sums, squares = flight.wait_control()
        c = flight.checksum
        if sums != active * c or squares != active * c * c:
            raise ModelMismatchError(
                "the ranks train different sets of parameters under DiLoCo (fragment "
                f"{flight.fragment}, step {flight.sent_after}). Every rank must freeze and unfreeze the same "
                "parameters (requires_grad) and add the same param groups to its optimizer, at the same step."
            )
        size = params.context.size  # type: ignore[attr-defined]
        mean = total * (size / active) if self.strategy.wire_dtype == "float16" else total / active
        if not np.all(np.isfinite(mean)):
            first = int(np.flatnonzero(~np.isfinite(mean))[0])
            position = self._ranges[flight.fragment][0] + first
            raise NonFiniteError("DiLoCo", _name_at(params, position), float(mean[first]), "the mean pseudo-gradient",
                                 step=flight.sent_after, outcome="no outer step was applied, on any rank")
        lo, hi = self._ranges[flight.fragment]
        keep = flight.mask
        theta, buffer = self.theta_global[lo:hi], self.momentum[lo:hi]
        if keep.all():
            self.outer.step(theta, buffer, mean)
        else:  # elements of frozen parameters: no outer step, their state stays as it was
            t, b = theta[keep], buffer[keep]
            self.outer.step(t, b, mean[keep])
            theta[keep], buffer[keep] = t, b
        model = params.get_flat().astype(np.float64)
        model[lo:hi] = theta
        params.set_flat(model)  # frozen parameters are not written (the adapters' rule)
        self._applied += 1
        self.state.last_sync_step = step
        self.sync_log.append((flight.fragment, flight.sent_after, step))

    def _drop_pending(self) -> None:
        """Collective when a fragment is in flight: wait for its sums and drop them."""
        if self._pending is not None:
            self._pending.wait_delta()
            self._pending.wait_control()
            self._pending = None

    def _agree_on_outer_state(self, params: ParameterAccess) -> None:
        """Collective: when the ranks applied different numbers of outer steps, every rank
        takes θ_global and the momentum of the (lowest) rank that applied the most."""
        rank, size = params.context.rank, params.context.size  # type: ignore[attr-defined]
        counts = np.zeros(size)
        counts[rank] = self._applied
        counts = self._sum(params)(counts, "float64", self._prefix + ".applied")()
        if np.all(counts == counts[0]):
            return
        source = int(np.argmax(counts))
        n = self.theta_global.size
        local = np.concatenate([self.theta_global, self.momentum]) if rank == source else np.zeros(2 * n)
        agreed = self._sum(params)(local, "float64", self._prefix + ".adopt")()
        self.theta_global, self.momentum = agreed[:n].copy(), agreed[n:].copy()
        self._applied = int(counts[source])


def _name_at(params: Any, position: int) -> str:
    """The name of the parameter that holds element ``position`` of the flat vector."""
    offset = 0
    for name, count in params.parameter_sizes():
        if position < offset + count:
            return name
        offset += count
    return "?"
