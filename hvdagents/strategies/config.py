"""Strategy settings: frozen, validated config objects.

A strategy object says *how* agents agree on parameters; it holds settings only. The
running state (step counters, the last pull) lives in the runner the agent builds from it
(:mod:`hvdagents.strategies.base`), so a checkpoint can save and restore it.

Strong (synchronous): :class:`Sync`, :class:`LocalSGD`. Weak (asynchronous, through MPI
one-sided windows): :class:`Downpour`, :class:`EASGD`, :class:`Gossip`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["Strategy", "Sync", "LocalSGD", "Downpour", "EASGD", "Gossip"]

#: Tolerance for the row and column sums of a Gossip mixing matrix.
ROW_SUM_TOLERANCE = 1e-6


def _check_int(owner: str, field: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner}.{field} must be an int; got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{owner}.{field} must be >= {low}; got {value}")


def _check_staleness(owner: str, value: Optional[int]) -> None:
    if value is not None:
        _check_int(owner, "max_staleness", value, 0)


@dataclass(frozen=True)
class Strategy:
    """Base of all strategy settings. ``synchronous`` tells the two families apart, for
    readers (the synchronous ones communicate collectively, through Horovod); what an agent
    does for a strategy is its runner's business (:mod:`.registry`)."""

    synchronous = True


@dataclass(frozen=True)
class Sync(Strategy):
    """Gradient all-reduce every step (Horovod ring all-reduce, data parallel).

    ``compression``: ``None`` or ``"fp16"`` (gradients scaled by 1/size, then cast to
    float16 on the wire). ``backward_passes_per_step``: gradients of this many backward
    passes are accumulated locally before one all-reduce and one optimizer step (PyTorch:
    exactly that many; ``agent.no_sync()`` is the flexible form).

    ``nonfinite``: ``"pass"`` (the default, as DDP and Horovod) steps on an averaged gradient
    that holds a NaN or an infinity: every rank gets the same one (``GradScaler`` relies on
    that to skip the step on every rank alike). ``"raise"`` (PyTorch) checks the averaged
    gradient before every optimizer step (``step(closure)``: after it) and raises
    :class:`~hvdagents.errors.NonFiniteError` on every rank alike, naming the step and the
    first such parameter; a step ``GradScaler`` skips is not checked.
    """

    compression: Optional[str] = None
    backward_passes_per_step: int = 1
    nonfinite: str = "pass"

    def __post_init__(self) -> None:
        if self.compression not in (None, "fp16"):
            raise ValueError(f"Sync.compression must be None or 'fp16'; got {self.compression!r}")
        if self.nonfinite not in ("pass", "raise"):
            raise ValueError(f"Sync.nonfinite must be 'pass' or 'raise'; got {self.nonfinite!r}")
        _check_int("Sync", "backward_passes_per_step", self.backward_passes_per_step, 1)


def _check_bool(owner: str, field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}.{field} must be a bool; got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class LocalSGD(Strategy):
    """Local steps, with parameters averaged over all ranks every ``period`` steps.

    ``node_period`` (k1, PyTorch's ``HierarchicalModelAverager`` with two levels): the ranks
    of each node (the processes that share memory) also average among themselves every k1
    steps, and all ranks every ``period`` (k2) steps; k2 must be a multiple of k1. ``None``
    (the default): no node-level average. ``hierarchical``: every average over all ranks is
    summed inside each node first, then by one leader per node across the nodes, then
    broadcast inside the node (:mod:`~.hierarchy`), so one rank per node, not every rank,
    sends across the network. Both need an MPI world (not ``horovodrun --gloo``).
    """

    period: int = 8
    node_period: Optional[int] = None
    hierarchical: bool = False

    def __post_init__(self) -> None:
        _check_int("LocalSGD", "period", self.period, 1)
        if self.node_period is not None:
            _check_int("LocalSGD", "node_period", self.node_period, 1)
            if self.period % self.node_period:
                raise ValueError(
                    f"LocalSGD.period must be a multiple of LocalSGD.node_period ({self.node_period}), so that "
                    f"every average over all ranks falls on a node-level step (as PyTorch's "
                    f"HierarchicalModelAverager requires); got period={self.period}"
                )
        _check_bool("LocalSGD", "hierarchical", self.hierarchical)


@dataclass(frozen=True)
class Downpour(Strategy):
    """Asynchronous parameter server on a sharded window (Dean et al. 2012).

    Every ``period`` local steps an agent pushes its accumulated change since its last pull
    and pulls the centre. ``normalize`` (the default) divides the change by ``period``, as
    ADAG does: without it the centre moves by every agent's whole change, and asynchrony adds
    implicit momentum (Mitliagkas et al. 2016); with 4 agents, SGD momentum 0.9 and
    ``normalize=False``, digits runs collapsed after 20–200 epochs (measured in
    ``bench/longrun.py``), while the normalized default held ≥ 0.96 for 200 epochs.
    ``staleness_aware``: each push is divided by τ, the number of updates the centre
    received since this agent's pull (its own included), so late updates count less (Zhang
    et al. 2016). ``max_staleness``: no agent runs more than this many steps ahead of the
    slowest (Stale Synchronous Parallel); ``None`` for no bound.

    ``hierarchical`` (the same for :class:`EASGD` and :class:`AsyncDiLoCo`;
    :mod:`~hvdagents.strategies.node_centre`): the centre is sharded over one leader per node
    (local rank 0), and the ranks of a node exchange together: they sum their pushes inside the
    node, the leader pushes the sum and pulls the centre, and broadcasts it inside the node. One
    push and one pull per node cross the network instead of one per rank (local_size times fewer
    bytes). An exchange becomes collective over the node's ranks: a straggler holds back its
    own node, not the other nodes; τ (``staleness_aware``) counts node pushes. Needs an MPI
    world, as every asynchronous strategy.
    """

    synchronous = False
    period: int = 4
    max_staleness: Optional[int] = None
    normalize: bool = True
    staleness_aware: bool = False
    hierarchical: bool = False

    def __post_init__(self) -> None:
        _check_int("Downpour", "period", self.period, 1)
        _check_staleness("Downpour", self.max_staleness)
        for field in ("normalize", "staleness_aware", "hierarchical"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"Downpour.{field} must be a bool; got {getattr(self, field)!r}")


@dataclass(frozen=True)
class EASGD(Strategy):
    """Asynchronous elastic averaging SGD (Zhang, Choromanska, LeCun 2015).

    Every ``period`` steps: read the centre c, d = alpha (x - c), x -= d, push +d to the centre.
    ``hierarchical``: as for :class:`Downpour` (the node's ranks read the centre their leader
    pulled; the leader pushes the sum of their differences).
    """

    synchronous = False
    alpha: float = 0.1
    period: int = 4
    max_staleness: Optional[int] = None
    hierarchical: bool = False

    def __post_init__(self) -> None:
        _check_bool("EASGD", "hierarchical", self.hierarchical)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.floating)):
            raise TypeError(f"EASGD.alpha must be a float; got {self.alpha!r}")
        if not 0.0 < float(self.alpha) < 1.0:
            raise ValueError(f"EASGD.alpha must be in (0, 1); got {self.alpha}")
        _check_int("EASGD", "period", self.period, 1)
        _check_staleness("EASGD", self.max_staleness)


@dataclass(frozen=True)
class Gossip(Strategy):
    """Decentralized averaging through the peers' own windows (Lian et al. 2018, AD-PSGD).

    Every ``period`` steps agent i averages with its peers' effective models (their last
    publication plus what others delivered to them since), and the peers' side of each
    average reaches them one-sidedly (delivered to their window, folded in at their next
    exchange), so the mean of all models never changes. ``weights=None`` is uniform pairwise gossip (one random
    peer; both end at the pair's average); a matrix W must be square, non-negative and doubly
    stochastic (every row and every column sums to 1: a mixing that preserves the mean;
    checked here, and against the world size when the agent starts); a round of exchanges
    then mixes by (W + Wᵀ) / 2, W itself when it is symmetric.
    ``max_staleness``: as for Downpour (not needed for a good consensus: 200-epoch runs on 4
    ranks sharing 2 cores ended at 0.97-0.98 unbounded, ``bench/longrun.py``).
    """

    synchronous = False
    period: int = 1
    weights: Optional[Sequence[Sequence[float]]] = None
    seed: int = 0
    max_staleness: Optional[int] = None

    def __post_init__(self) -> None:
        _check_int("Gossip", "period", self.period, 1)
        _check_int("Gossip", "seed", self.seed, 0)
        _check_staleness("Gossip", self.max_staleness)
        if self.weights is None:
            return
        try:
            w = np.asarray(self.weights, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("Gossip.weights must be a square matrix of numbers") from None
        if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] == 0:
            raise ValueError(f"Gossip.weights must be a square matrix; got shape {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("Gossip.weights must be finite and non-negative")
        for axis, kind in ((1, "row"), (0, "column")):
            sums = w.sum(axis=axis)
            bad = np.flatnonzero(np.abs(sums - 1.0) > ROW_SUM_TOLERANCE)
            if bad.size:
                raise ValueError(
                    "Gossip.weights must be doubly stochastic (every row and every column sums "
                    "to 1), so that mixing preserves the mean of the models; "
                    f"{kind} {int(bad[0])} sums to {sums[bad[0]]:.6g}"
                )
        # store an immutable copy so the frozen object cannot change under us
        object.__setattr__(self, "weights", tuple(tuple(float(v) for v in row) for row in w))

    def matrix(self, size: int) -> Optional[np.ndarray]:
        """The mixing matrix for a world of ``size`` ranks (``None`` = uniform pairwise)."""
        if self.weights is None:
            return None
        w = np.asarray(self.weights, dtype=np.float64)
        if w.shape != (size, size):
            raise ValueError(f"Gossip.weights must be {size}x{size} for {size} ranks; got {w.shape[0]}x{w.shape[1]}")
        return w


# -- sharded data parallelism (ZeRO) ----------------------------------------------------------------
#: The stages of :class:`ZeRO`: what each shards beside the optimizer state.
ZERO_STAGES = {1: "optimizer state", 2: "optimizer state and gradients"}


@dataclass(frozen=True)
class ZeRO(Strategy):
    """Sharded synchronous data parallelism (ZeRO, Rajbhandari et al. 2020): ``Sync``'s
    mathematics with the optimizer state (stage 1), and the gradients too (stage 2), split
    over the ranks.

    Each dtype of each param group is one flat vector of elements, cut into contiguous
    ranges, one per rank, balanced to within one element; each rank steps the user's own
    optimizer (its class and every param group's hyper-parameters, read again at every
    step) on its range only, so its state exists for 1/N of the elements. Per step:

    - ``stage=1``: the gradients are all-reduced as under :class:`Sync` (the mean is in
      ``.grad`` when ``backward()`` returns), each rank steps its range, then the ranges
      are all-gathered into every rank's parameters (all-reduce + all-gather).
    - ``stage=2``: at the end of backward the gradients are reduce-scattered (each rank
      receives the mean of its range only) and every ``.grad`` becomes ``None``; each rank
      steps its range, then the ranges are all-gathered (reduce-scatter + all-gather: the
      bytes of one all-reduce). Clip with ``agent.clip_grad_norm_`` (one extra all-reduce
      of one number).

    Only optimizers whose update of an element depends on that element alone can be cut so
    (PyTorch: SGD, Adam, AdamW, Adamax, NAdam, RAdam, Adagrad, RMSprop, Adadelta; Keras: SGD,
    Adam, AdamW, Adamax, RMSprop, Adagrad, Adadelta, Lion); any other class is refused on every
    rank when the agent is made. Checkpoints hold the whole
    optimizer state, as ``Sync``'s do, and load under either strategy at any world size.
    """

    stage: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.stage, bool) or not isinstance(self.stage, (int, np.integer)):
            raise TypeError(f"ZeRO.stage must be an int; got {type(self.stage).__name__} {self.stage!r}")
        if self.stage not in ZERO_STAGES:
            raise ValueError(f"ZeRO.stage must be 1 or 2; got {self.stage}")


__all__ += ["ZeRO"]


# -- DiLoCo: local steps and an outer optimizer (Douillard et al. 2023) ------------------------------
#: The pseudo-gradient's dtypes on the wire, each with its unit roundoff u (the relative error
#: of rounding one value to it). Horovod 0.28 reduces no bfloat16 (neither its torch nor its
#: TensorFlow ops), so "bfloat16" is refused with that reason.
DILOCO_WIRE_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11}


def _check_real(owner: str, field: str, value: Any, inside: Any, interval: str) -> None:
    """A finite real number with ``inside(value)``, or the error naming ``interval``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{owner}.{field} must be a float; got {type(value).__name__} {value!r}")
    if not (np.isfinite(float(value)) and inside(float(value))):
        raise ValueError(f"{owner}.{field} must be in {interval}; got {value}")


@dataclass(frozen=True)
class DiLoCo(Strategy):
    """DiLoCo (Douillard et al. 2023): ``inner_steps`` (H) local steps of the user's optimizer
    (the inner optimizer), then the ranks all-reduce the *pseudo-gradient* Δ = θ_global − θ_local
    and an outer optimizer, SGD with ``outer_momentum`` (Nesterov when ``nesterov``, PyTorch's
    ``torch.optim.SGD`` rule), steps θ_global with the mean Δ, and every rank continues from the
    new θ_global. The defaults are the paper's (H = 500, lr 0.7, momentum 0.9, Nesterov);
    ``DiLoCo(H, outer_lr=1, outer_momentum=0)`` is ``LocalSGD(period=H)``.

    Communication: one Horovod all-reduce of the trainable parameters' pseudo-gradient (one
    flat host vector) per H steps, collective over every rank, plus one of 3 float64 numbers
    (the ranks still training, and a check that they share the same parameters).

    ``fragments`` (P, Streaming DiLoCo, Douillard et al. 2025): the flat vector is cut into P
    contiguous ranges of equal size (to one element); fragment k is sent after every step t
    with t ≡ (k+1)·H/P (mod H), so each fragment is synced once every H steps and the
    exchanges are spread over the H steps (H must be a multiple of P). ``overlap`` (τ): the
    all-reduce started after step t is non-blocking and finished after step t + τ, while the
    next τ inner steps compute (τ = 0: blocking, the DiLoCo paper; τ < H/P, so that at most
    one fragment is in flight). When it finishes, the fragment's outer step is applied and the
    fragment of the model is set to the new θ_global: the τ local steps it took meanwhile are
    dropped for that fragment (the paper's mixing factor α = 0). ``KerasAgent`` keeps this
    schedule but its all-reduce is blocking (Horovod's TensorFlow ops give no handle to finish
    later), so there the communication does not overlap the inner steps. ``close()`` first
    finishes a fragment in flight, then sends every fragment trained since its last exchange.

    ``wire_dtype``: the pseudo-gradient travels and is summed in "float32" (default),
    "float16" (half the bytes; each rank's Δ is divided by the number of ranks first, as
    ``Sync(compression="fp16")`` does, so the sum stays in range) or "float64". With N ranks
    and u the dtype's unit roundoff (2⁻²⁴ float32, 2⁻¹¹ float16), rounding each rank's Δ and
    every partial sum to the wire dtype errs the mean pseudo-gradient, element-wise, by at
    most about N·u·max_i |Δ_i| (first order); θ_global moves by ``outer_lr`` times it (times
    1 + momentum with Nesterov) per outer step, and momentum carries it into later steps.
    float16 also has an absolute error of up to 2⁻²⁵ ≈ 3·10⁻⁸ on each |Δ|/N below 6·10⁻⁵
    (subnormals; below 3·10⁻⁸ it becomes 0), so the bound gains N·2⁻²⁴, and it overflows
    above 65,504. "bfloat16" is refused: Horovod 0.28 cannot reduce it (torch nor TensorFlow).

    ``hierarchical``: every sum (the pseudo-gradient's and the control numbers') is reduced
    inside each node, all-reduced by one leader per node across the nodes, and broadcast
    inside the node (:mod:`~.hierarchy`): one rank per node sends across the network instead
    of every rank. Those sums are blocking (the schedule and ``overlap`` stay, the
    communication does not overlap the inner steps), and need an MPI world.

    The outer state, θ_global and the momentum buffer, is NumPy float64 on the host (16 bytes
    per parameter beside the model), the same bits on every rank (each applies the same update
    to the same all-reduced sum), saved in checkpoints and restored on resume.
    """

    inner_steps: int = 500
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    fragments: int = 1
    overlap: int = 0
    wire_dtype: str = "float32"
    hierarchical: bool = False

    def __post_init__(self) -> None:
        _check_bool("DiLoCo", "hierarchical", self.hierarchical)
        _check_int("DiLoCo", "inner_steps", self.inner_steps, 1)
        _check_real("DiLoCo", "outer_lr", self.outer_lr, lambda v: 0.0 < v <= 10.0, "(0, 10]")
        _check_real("DiLoCo", "outer_momentum", self.outer_momentum, lambda v: 0.0 <= v < 1.0, "[0, 1)")
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"DiLoCo.nesterov must be a bool; got {self.nesterov!r}")
        _check_int("DiLoCo", "fragments", self.fragments, 1)
        if self.inner_steps % self.fragments:
            raise ValueError(f"DiLoCo.inner_steps must be a multiple of DiLoCo.fragments ({self.fragments}), "
                             f"so that a fragment is sent every inner_steps / fragments steps; got {self.inner_steps}")
        _check_int("DiLoCo", "overlap", self.overlap, 0)
        if self.overlap >= self.inner_steps // self.fragments:
            raise ValueError(f"DiLoCo.overlap must be < inner_steps / fragments = {self.inner_steps // self.fragments} "
                             f"(at most one fragment in flight); got {self.overlap}")
        if self.wire_dtype == "bfloat16":
            raise ValueError("DiLoCo.wire_dtype 'bfloat16' is not available: Horovod 0.28 cannot all-reduce bfloat16 "
                             "(neither its torch nor its TensorFlow ops); use 'float16', the same bytes with 3 more "
                             "mantissa bits (pseudo-gradients are small differences, well inside its range)")
        if self.wire_dtype not in DILOCO_WIRE_ROUNDOFF:
            raise ValueError(f"DiLoCo.wire_dtype must be one of {sorted(DILOCO_WIRE_ROUNDOFF)}; "
                             f"got {self.wire_dtype!r}")


__all__ += ["DiLoCo"]


# -- asynchronous DiLoCo: DiLoCo's outer step on a centre in the store -----------------------------
@dataclass(frozen=True)
class AsyncDiLoCo(Strategy):
    """Asynchronous DiLoCo: :class:`DiLoCo`'s outer step applied to a centre in the sharded
    store (:mod:`~hvdagents.strategies.async_diloco`), with no waiting for the other agents.

    Every ``inner_steps`` (H) local steps of the user's optimizer an agent computes its
    pseudo-gradient Δ = θ_pulled − θ_local (θ_pulled: the centre it pulled last), steps its own
    outer momentum buffer (``outer_momentum``, Nesterov when ``nesterov``: PyTorch's SGD rule,
    float64), pushes ``−outer_lr``·(Δ + μ·b)/N into the centre (one-sided ``MPI_Accumulate``:
    concurrent pushes are never lost) and continues from the centre it pulls. When the N agents
    push once each from the same centre, the centre moves exactly as under :class:`DiLoCo`;
    otherwise each push counts for 1/N of an outer step, and a slow agent's push comes late
    (it is computed from an older centre), as Downpour's. ``max_staleness``: as for Downpour.
    The centre has the model's dtype (float32 or float64); the buffers are float64.

    Communication per outer step and agent: one push and one pull of the model (one-sided),
    nothing collective. ``close()`` pushes the last pseudo-gradient (when the model moved since
    the last pull) and leaves the centre on every rank. Checkpoints hold the centre and every
    agent's buffer and resume with the same number of ranks. ``hierarchical``: as for
    :class:`Downpour` (each rank keeps and steps its own buffer; the node pushes their sum).
    """

    synchronous = False
    inner_steps: int = 500
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    max_staleness: Optional[int] = None
    hierarchical: bool = False

    def __post_init__(self) -> None:
        _check_bool("AsyncDiLoCo", "hierarchical", self.hierarchical)
        _check_int("AsyncDiLoCo", "inner_steps", self.inner_steps, 1)
        _check_real("AsyncDiLoCo", "outer_lr", self.outer_lr, lambda v: 0.0 < v <= 10.0, "(0, 10]")
        _check_real("AsyncDiLoCo", "outer_momentum", self.outer_momentum, lambda v: 0.0 <= v < 1.0, "[0, 1)")
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"AsyncDiLoCo.nesterov must be a bool; got {self.nesterov!r}")
        _check_staleness("AsyncDiLoCo", self.max_staleness)

    @property
    def period(self) -> int:
        """Local steps between two exchanges (the asynchronous runner's name for H)."""
        return self.inner_steps


__all__ += ["AsyncDiLoCo"]
