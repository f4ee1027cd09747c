"""ZeRO for ``KerasAgent`` (Keras 3 on TensorFlow): the user's optimizer applied to this rank's
range of the parameters.

**Partition.** Each dtype of the model's trainable variables (in ``trainable_variables``
order) is one flat vector, cut by :func:`~hvdagents.strategies.sharded.shard_ranges` as the
PyTorch side cuts it. Every variable has a *piece* on every rank: a 1-D ``keras.Variable``
holding the part of it that falls in this rank's range (empty when none does), with the
variable's own path, so the *inner* optimizer (the user's class, made from its
``get_config()``: same hyper-parameters, same learning-rate schedule), built on the pieces,
names its state exactly as the user's optimizer built on the whole model would, and holds it
for this rank's range only. Exact for optimizers whose update of an element depends on that
element alone (:data:`SHARDABLE`); any other class, and the per-variable ``clipnorm``,
``use_ema`` and ``gradient_accumulation_steps``, are refused on every rank.

**A step** (:meth:`ShardedOptimizer.apply`, inside Keras' compiled train step; it wraps the
inner optimizer the way Keras' ``LossScaleOptimizer`` does):

1. stage 1: the gradients are averaged by one grouped all-reduce (``Sync``'s); stage 2: each
   dtype's flat gradient is reduce-scattered (sum, then divided by the number of ranks), so
   each rank receives the mean of its range only;
2. ``global_clipnorm``: the norm of the whole mean gradient (stage 2: one all-reduce of this
   range's sum of squares), applied as Keras applies it;
3. every piece is read again from its variable; the inner optimizer applies this range's
   mean gradient to the pieces of the variables that have one;
4. each dtype's ranges are all-gathered and written into every variable that had a gradient.

**Checkpoints** hold what ``Sync``'s hold, variable by variable in the same order and with
the same names: gathered to rank 0 one state variable at a time (``MPI_Gatherv``), scattered
back the same way on load.
"""

from __future__ import annotations

import itertools
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..collectives import bcast_object_over
from ..errors import UsageError
from ..keras.optimizer import DelegatesToInner
from ..strategies.sharded import shard_ranges

__all__ = ["SHARDABLE", "ShardedOptimizer", "refuse_unshardable"]

#: Keras optimizer classes whose update of one element reads that element's gradient and
#: state alone (checked against Keras 3.15's code): applying each range apart is applying
#: the whole. Exact classes, not subclasses.
SHARDABLE = (keras.optimizers.SGD, keras.optimizers.Adam, keras.optimizers.AdamW, keras.optimizers.Adamax,
             keras.optimizers.RMSprop, keras.optimizers.Adagrad, keras.optimizers.Adadelta, keras.optimizers.Lion)

#: Settings of a Keras optimizer that couple the elements of a variable or keep a whole copy.
_REFUSED_SETTINGS = {
    "clipnorm": "clips each variable's gradient by that variable's own norm, which no rank holds whole",
    "use_ema": "keeps a moving average of every whole variable",
    "gradient_accumulation_steps": "accumulates whole gradients in the optimizer",
}

#: Numbers the ZeRO optimizers of this process in order (the same on every rank).
_numbers = itertools.count()


def _public_name(cls: type) -> str:
    """``keras.optimizers.Adafactor`` for Keras' own classes, else ``module.QualName``."""
    if getattr(keras.optimizers, cls.__name__, None) is cls:
        return f"keras.optimizers.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def refuse_unshardable(optimizer: Any) -> None:
    """Raise :class:`UsageError` unless ``optimizer`` is an exact :data:`SHARDABLE` class
    without a refused setting. Local and the same on every rank."""
    cls = type(optimizer)
    if cls not in SHARDABLE:
        names = ", ".join(c.__name__ for c in SHARDABLE)
        raise UsageError(
            f"hva.ZeRO cannot shard {_public_name(cls)}: ZeRO applies each rank's range of the parameters "
            "apart, which equals one whole step only when the update of an element depends on that element "
            f"alone. Supported (exact classes): {names}. Use hva.Sync() for this optimizer."
        )
    config = optimizer.get_config()
    for key, why in _REFUSED_SETTINGS.items():
        if config.get(key):
            raise UsageError(f"hva.ZeRO cannot shard {_public_name(cls)} with {key}={config[key]!r}: it {why}. "
                             "Use global_clipnorm for clipping, or hva.Sync() for this optimizer.")
    # Keras keeps exclude_from_weight_decay() outside get_config(), so the shards' optimizer would
    # decay what the user excluded: refused rather than silently different from Sync.
    if getattr(optimizer, "_exclude_from_weight_decay", None) or getattr(
            optimizer, "_exclude_from_weight_decay_pattern", None) is not None:
        raise UsageError(f"hva.ZeRO cannot shard {_public_name(cls)} after exclude_from_weight_decay(): Keras keeps "
                         "the exclusions outside the optimizer's get_config(), from which ZeRO builds each rank's "
                         "optimizer, so the excluded variables would be decayed. Use hva.Sync() for this optimizer.")


@dataclass
class _Member:
    """A trainable variable: where it sits in its dtype's flat vector, and its piece here."""

    index: int  # in the partitioned trainable variables
    variable: Any
    offset: int
    numel: int
    start: int = 0  # its elements [start, stop) are this rank's
    stop: int = 0
    piece: Any = None
    counts: tuple[int, ...] = ()  # how many of its elements each rank holds


@dataclass
class _Bucket:
    dtype: str
    members: list[_Member]
    length: int = 0


@dataclass(frozen=True)
class _Entry:
    """One variable of the whole (``Sync``) optimizer state, in order: ``member`` is the
    trainable variable it is a state of, element by element, or ``None`` for a value kept
    whole (iteration, learning rate)."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    member: int | None
    held: Any  # the variable holding it here (the whole, or this rank's range)


def _piece(variable: Any, size: int) -> Any:
    """A 1-D variable of ``size`` elements with ``variable``'s path and dtype."""
    *scopes, name = variable.path.split("/")
    with ExitStack() as stack:
        for scope in scopes:
            stack.enter_context(keras.name_scope(scope))
        return keras.Variable(np.zeros(size, dtype=variable.dtype), name=name, dtype=variable.dtype, trainable=False)


class ShardedOptimizer(DelegatesToInner, keras.optimizers.Optimizer):
    """``model.optimizer`` under :class:`~hvdagents.ZeRO` (see the module): the user's
    optimizer, remade over this rank's pieces, wrapped by composition.

    Communication: ``apply`` is collective (every rank's train step must call it with the
    same variables); :meth:`gather_state` and :meth:`load_state` are collective.

    It is named ``distributed_<name>``, as ``Sync``'s :class:`~hvdagents.keras.DistributedOptimizer`
    is, so that its own variables (an unused iteration counter and learning rate) carry the
    same names in checkpoints and either strategy loads the other's."""

    def __init__(self, user: Any, *, hvd: Any, stage: int, comm: Any) -> None:
        refuse_unshardable(user)
        super().__init__(learning_rate=0.0, name="distributed_" + user.name)
        self._hvd, self._stage, self._comm = hvd, stage, comm
        self._rank, self._size = hvd.rank(), hvd.size()
        self._prefix = f"hvdagents.zero.keras.{next(_numbers)}."
        self._pending: list[np.ndarray] | None = None
        config = user.get_config()
        self._clipnorm = config.get("global_clipnorm")  # applied here, to the whole mean gradient
        self.inner_optimizer = type(user).from_config({**config, "global_clipnorm": None})
        self._members: list[_Member] = []
        self._buckets: list[_Bucket] = []
        self._by_id: dict[int, _Member] = {}
        self._entries: list[_Entry] = []

    # -- partition ---------------------------------------------------------------------------
    def partition(self, variables: list, user: Any) -> None:
        """Local: cut ``variables`` (the model's trainable variables) into ranges, build the
        inner optimizer on this rank's pieces and, when ``user`` was built (it stepped
        before: every rank holds rank 0's state), take this rank's ranges of its state."""
        buckets: dict[str, _Bucket] = {}
        for i, v in enumerate(variables):
            bucket = buckets.setdefault(str(v.dtype), _Bucket(str(v.dtype), []))
            member = _Member(i, v, bucket.length, int(np.prod(v.shape)))
            bucket.members.append(member)
            bucket.length += member.numel
            self._members.append(member)
            self._by_id[id(v)] = member
        self._buckets = list(buckets.values())
        for bucket in self._buckets:
            ranges = shard_ranges(bucket.length, self._size)
            lo, hi = ranges[self._rank]
            for m in bucket.members:
                m.counts = tuple(max(0, min(b, m.offset + m.numel) - max(a, m.offset)) for a, b in ranges)
                m.start = min(max(lo, m.offset), m.offset + m.numel) - m.offset
                m.stop = m.start + m.counts[self._rank]
                m.piece = _piece(m.variable, m.stop - m.start)
        self.inner_optimizer.build([m.piece for m in self._members])
        super().build(variables)
        self._entries = self._describe()
        if user.built:
            values = [np.asarray(v.numpy()) for v in user.variables]
            ours = self._entries[len(self._variables):]
            if [v.path for v in user.variables] != [e.path for e in ours]:
                raise UsageError("the model's optimizer was built on other variables than the model's trainable "
                                 "ones; make the agent with an optimizer that has not been built yet")
            self._assign([v.numpy() for v in self._variables] + values)

    def _describe(self) -> list[_Entry]:
        """Every variable of the whole optimizer state, in ``Sync``'s order (this wrapper's
        own, then the inner optimizer's), and which trainable variable each is a state of:
        by its name, the one Keras derives from the variable's path, and the piece's shape."""
        prefixes = sorted(((m.variable.path.replace("/", "_") + "_", m) for m in self._members),
                          key=lambda item: -len(item[0]))
        entries = [_Entry(v.path, tuple(v.shape), str(v.dtype), None, v) for v in self._variables]
        for v in self.inner_optimizer.variables:
            member = next((m for prefix, m in prefixes if v.name.startswith(prefix)
                           and tuple(v.shape) == (m.stop - m.start,)), None)
            if member is None and len(v.shape) != 0:
                raise UsageError(f"hva.ZeRO cannot shard {_public_name(type(self.inner_optimizer))}: its state "
                                 f"variable {v.path!r} is not one value per element; use hva.Sync()")
            if member is None:
                entries.append(_Entry(v.path, (), str(v.dtype), None, v))
            else:
                entries.append(_Entry(v.path, tuple(int(d) for d in member.variable.shape), str(v.dtype),
                                      member.index, v))
        return entries

    # -- the step ----------------------------------------------------------------------------
    def build(self, var_list: list) -> None:
        return None  # built by partition(), before Keras traces a train step

    def apply(self, grads: list, trainable_variables: list | None = None) -> None:
        """Collective: the mean gradient of this rank's range applied to its pieces, then the
        ranges all-gathered into the variables (see the module)."""
        if trainable_variables is None:
            trainable_variables = [m.variable for m in self._members]
        grad_of: dict[int, Any] = {}
        for g, v in zip(grads, trainable_variables):
            member = self._by_id.get(id(v))
            if member is None:
                raise UsageError(f"under hva.ZeRO the trainable variables cannot change after the agent was made; "
                                 f"{v.path!r} was not trainable then (make the agent after setting trainable)")
            if g is not None:
                grad_of[member.index] = tf.convert_to_tensor(g)
        if not grad_of:
            return
        present = [m for m in self._members if m.index in grad_of]
        mine = self._stage1(grad_of, present) if self._stage == 1 else self._stage2(grad_of)
        for m in self._members:  # the parameters read again: the user may have assigned them
            m.piece.assign(tf.reshape(m.variable, [-1])[m.start:m.stop])
        self.inner_optimizer.apply([mine[m.index] for m in present], [m.piece for m in present])
        self._gather([m.index for m in present])

    def _stage1(self, grad_of: dict[int, Any], present: list[_Member]) -> dict[int, Any]:
        dense = [grad_of[m.index] for m in present]
        if self._size > 1:
            dense = self._hvd.grouped_allreduce(dense, op=self._hvd.Average, name=f"{self._prefix}grads")
        if self._clipnorm:
            squares = tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, tf.float64))) for g in dense])
            dense = self._clip(dense, tf.sqrt(squares))
        return {m.index: tf.reshape(g, [-1])[m.start:m.stop] for m, g in zip(present, dense)}

    def _stage2(self, grad_of: dict[int, Any]) -> dict[int, Any]:
        ranges: dict[int, Any] = {}
        for b, bucket in enumerate(self._buckets):
            flat = tf.concat([tf.reshape(grad_of[m.index], [-1]) if m.index in grad_of
                              else tf.zeros([m.numel], dtype=bucket.dtype) for m in bucket.members], axis=0)
            if self._size > 1:
                flat = self._hvd.reducescatter(flat, op=self._hvd.Sum, name=f"{self._prefix}scatter.{b}")
                flat = flat / tf.constant(self._size, dtype=flat.dtype)
            at = 0
            for m in bucket.members:
                ranges[m.index] = flat[at:at + m.stop - m.start]
                at += m.stop - m.start
        if self._clipnorm:
            local = tf.add_n([tf.reduce_sum(tf.square(tf.cast(ranges[i], tf.float64))) for i in grad_of])
            total = local if self._size == 1 else self._hvd.allreduce(
                tf.reshape(local, [1]), op=self._hvd.Sum, name=f"{self._prefix}norm")[0]
            clipped = self._clip([ranges[i] for i in grad_of], tf.sqrt(total))
            ranges.update(zip(grad_of, clipped))
        return ranges

    def _clip(self, grads: list, norm: Any) -> list:
        """Keras' ``clip_by_global_norm`` with the norm of the whole mean gradient."""
        clip = tf.constant(float(self._clipnorm), dtype=tf.float64)
        scale = clip * tf.minimum(1.0 / norm, 1.0 / clip) + (norm - norm)
        return [g * tf.cast(scale, g.dtype) for g in grads]

    def _gather(self, present: list[int]) -> None:
        """Collective: every rank's range of every dtype into the variables that had a gradient."""
        wanted = set(present)
        for b, bucket in enumerate(self._buckets):
            mine = tf.concat([m.piece.value for m in bucket.members], axis=0)
            whole = self._hvd.allgather(mine, name=f"{self._prefix}gather.{b}") if self._size > 1 else mine
            for m in bucket.members:
                if m.index in wanted:
                    m.variable.assign(tf.reshape(whole[m.offset:m.offset + m.numel], m.variable.shape))

    def finalize_variable_values(self, var_list: list) -> None:
        return None  # no moving average (use_ema is refused)

    # -- state: bytes, checkpoints ----------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of the optimizer variables this rank holds. Local."""
        return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in self.variables)

    def signature(self) -> list[list[Any]]:
        """Path, whole shape and dtype of every variable of the whole state, in ``Sync``'s
        order: what a ``Sync`` agent's checkpoint header lists. Local."""
        return [[e.path, list(e.shape), e.dtype] for e in self._entries]

    def gather_state(self, root: int = 0) -> list[np.ndarray] | None:
        """Collective: on ``root``, the whole optimizer state (``Sync``'s variables, in order),
        gathered one variable at a time; ``None`` elsewhere."""
        out = []
        for k, e in enumerate(self._entries):
            if e.member is None:
                out.append(np.asarray(e.held.numpy()) if self._rank == root else None)
                continue
            counts = self._members[e.member].counts
            whole = self._transfer_gather(np.ascontiguousarray(e.held.numpy()), counts, root, f"state.{k}")
            out.append(None if whole is None else whole.reshape(e.shape))
        return out if self._rank == root else None

    def hold(self, arrays: list[np.ndarray]) -> None:
        """Local (the root of a load): keep a whole state read from a checkpoint until
        :meth:`load_state` hands it out."""
        self._pending = [np.asarray(a) for a in arrays]

    def load_state(self, root: int = 0) -> None:
        """Collective: when ``root`` holds a whole state (:meth:`hold`), every rank takes its
        ranges of it (values kept whole: root's); otherwise nothing moves."""
        held = bcast_object_over(self._comm, self._hvd, self._pending is not None, root, f"{self._prefix}held")
        if not held:
            return
        for k, e in enumerate(self._entries):
            value = self._pending[k] if self._rank == root else None
            if e.member is None:
                e.held.assign(bcast_object_over(self._comm, self._hvd, value, root, f"{self._prefix}load.{k}"))
                continue
            part = self._transfer_scatter(value, self._members[e.member].counts, np.dtype(e.dtype), root,
                                          f"load.{k}")
            e.held.assign(part)
        self._pending = None

    def _assign(self, arrays: list[np.ndarray]) -> None:
        """Local: every rank holds the whole state ``arrays``; take this rank's ranges."""
        for e, value in zip(self._entries, arrays):
            if e.member is None:
                e.held.assign(value)
            else:
                m = self._members[e.member]
                e.held.assign(np.ravel(value)[m.start:m.stop])

    # -- transport of one state variable (MPI when there is an MPI world, else Horovod) ------
    def _transfer_gather(self, part: np.ndarray, counts: tuple[int, ...], root: int, name: str) -> np.ndarray | None:
        if self._comm is None:
            whole = self._hvd.allgather(tf.constant(part), name=self._prefix + name).numpy()
            return whole if self._rank == root else None
        whole = np.empty(sum(counts), dtype=part.dtype) if self._rank == root else None
        size = part.dtype.itemsize
        recv = [whole.view(np.uint8), [c * size for c in counts]] if whole is not None else None
        self._comm.Gatherv(part.view(np.uint8), recv, root=root)
        return whole

    def _transfer_scatter(self, whole: np.ndarray | None, counts: tuple[int, ...], dtype: np.dtype, root: int,
                          name: str) -> np.ndarray:
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        if self._comm is None:
            full = np.ravel(whole).astype(dtype) if self._rank == root else np.zeros(sum(counts), dtype=dtype)
            full = self._hvd.broadcast(tf.constant(full), root_rank=root, name=self._prefix + name).numpy()
            return full[offsets[self._rank]:offsets[self._rank + 1]].copy()
        part = np.empty(counts[self._rank], dtype=dtype)
        send = None
        if self._rank == root:
            source = np.ascontiguousarray(np.ravel(whole).astype(dtype))
            send = [source.view(np.uint8), [c * dtype.itemsize for c in counts]]
        self._comm.Scatterv(send, part.view(np.uint8), root=root)
        return part
