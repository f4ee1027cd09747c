"""ZeRO for ``TorchAgent``: the user's optimizer stepped on this rank's range of the parameters.

**Partition.** The parameters of each (param group, dtype, device) of the user's optimizer,
in the group's order, are cut into *buckets* of consecutive parameters (a bucket closes once
it holds :data:`CHUNK_ELEMENTS` elements; a parameter that large is a bucket of its own).
Each bucket's elements are one flat vector cut by
:func:`~hvdagents.strategies.sharded.shard_ranges` (contiguous, rank order, balanced to
within one element). The parts of parameters that fall in this rank's range are *pieces*:
1-D views into one buffer per bucket (this rank's values). An *inner* optimizer of the
user's class holds the pieces, in param groups aligned with the user's, so its state (and
so the optimizer memory) is this rank's ranges only: ``1/N`` of ``Sync``'s, to within one
element per bucket. Exact for optimizers whose update of an element depends on that
element alone (:data:`SHARDABLE`); any other class is refused on every rank.

**A step** (whoever steps the user's optimizer: a pre-hook does the work, then hides the
gradients from the user's own step, which therefore changes nothing and keeps no state; a
post-hook gives them back):

1. every group's hyper-parameters are copied from the user's groups (schedulers, edits);
2. this rank's range of the parameters is read into the pieces (parameters re-read);
3. the pieces' gradients are this rank's range of the mean gradient: stage 1, slices of the
   all-reduced ``.grad`` (:class:`~.torch_grads.GradientAllreducer`); stage 2, what the
   bucket reductions during backward left (``.grad`` is ``None`` from then on);
4. the inner optimizer steps (``None`` gradients are skipped, as the user's would);
5. the ranges are all-gathered (in rounds, :func:`~hvdagents.strategies.sharded.rounds`)
   and written into every parameter that had a gradient; the others keep their bits.

**Stage 2's backward pass.** Its first gradient opens the pass with a small presence
all-reduce (the ranks still training; the same trainable names everywhere). Then, from the
last bucket to the first, each bucket whose trainable parameters have all had their gradient
accumulated is summed over the ranks (Horovod, asynchronous: an in-place all-reduce on one
node, of which this rank keeps its range; a reduce-scatter across nodes) and its ``.grad``
freed, so at most about :data:`IN_FLIGHT` buckets of gradients exist at once instead of the
whole gradient. A bucket waiting on a parameter this pass does not reach (unused, or used on
other ranks only) holds back those before it until the end of backward, where the rest go
(zeros for what this rank lacks) and one all-reduce says which parameters had a gradient on
some rank.

**Uneven data** (as under ``Sync``): a rank that runs out of batches closes its agent and
then *serves* (:meth:`ShardedOptimizer.serve`) until every rank has closed: it takes part in
the others' reductions with zeros (each step averages over the ranks still training), steps
its own range when they step, with their hyper-parameters, and receives the all-gathered
parameters. So every rank ends with the parameters, and each range with the optimizer state,
of the rank that made the most steps. Once a rank has left, the ranks still training
announce each step (and stage 2's clipping) through the presence all-reduce that a backward
pass already makes, plus one all-gather of the step's hyper-parameters: nothing more moves
while every rank trains.

**Checkpoints** hold the user's optimizer's ordinary ``state_dict``: gathered to rank 0 one
parameter's state tensor at a time (``MPI_Gatherv``), scattered back the same way on load.
"""

from __future__ import annotations

import inspect
import itertools
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from ..collectives import allgather_object_over, bcast_array, bcast_object_over
from ..errors import ModelMismatchError, UsageError
from ..strategies.sharded import rounds, shard_ranges
from .torch_grads import GradientAllreducer, names_checksum

__all__ = ["SHARDABLE", "ShardedOptimizer"]

#: Optimizer classes whose update of one element reads that element's gradient and state
#: alone (checked against PyTorch 2.13's code; ``foreach``/``fused`` variants compute the
#: same): stepping each range apart is stepping the whole. Exact classes, not subclasses.
SHARDABLE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
             torch.optim.RAdam, torch.optim.Adagrad, torch.optim.RMSprop, torch.optim.Adadelta)

#: Elements (over all ranks) one reduce-scatter or all-gather round moves at most, so a
#: round's buffer stays small beside the model.
ROUND_ELEMENTS = 1 << 24

#: A bucket closes once it holds at least this many elements: stage 2 reduce-scatters a
#: bucket as soon as backward has produced its gradients and frees them, so at most about one
#: bucket of gradients exists at a time (PyTorch DDP's buckets, 25 MB by default, are the same idea).
CHUNK_ELEMENTS = 1 << 22

#: Stage 2: bucket reductions under way at once, at most (each holds its bucket's gradients).
IN_FLIGHT = 2

#: State entries of the :data:`SHARDABLE` optimizers that are one value per tensor (the
#: step count, NAdam's running product); every other tensor entry is element by element.
_PER_TENSOR_KEYS = frozenset({"step", "mu_product"})

#: Horovod 0.28 cannot reduce these; they travel widened (exactly).
_WIRE_DTYPES = {torch.bfloat16: torch.float32}

#: Numbers the ZeRO optimizers of this process in order (the same on every rank).
_numbers = itertools.count()

#: What a stage 2 presence all-reduce announces (its second element, summed over the ranks
#: still training): a backward pass's reduce-scatter, a clipping norm, a step.
_PASS, _CLIP, _STEP = 1.0, 2.0, 3.0


@dataclass
class _Member:
    """A parameter of a bucket: where its elements sit in the bucket's flat vector."""

    param: torch.Tensor
    name: str
    index: int  # its number in the user's optimizer ``state_dict``
    offset: int
    numel: int


@dataclass
class _Piece:
    """The part of a parameter in this rank's range: ``param.reshape(-1)[start:stop]`` is
    ``values`` (a view into its bucket's buffer)."""

    member: _Member
    start: int
    stop: int
    values: torch.Tensor


@dataclass
class _Bucket:
    group: int
    dtype: torch.dtype
    device: torch.device
    members: list[_Member]
    length: int
    lo: int = 0
    hi: int = 0
    values: torch.Tensor | None = None  # this rank's range of the parameters
    pieces: list[_Piece] = field(default_factory=list)


def _chunks(group: int, dtype: torch.dtype, device: torch.device, members: list[_Member],
            least: int) -> list[_Bucket]:
    """``members`` (one param group's parameters of one dtype and device, in the group's order)
    cut into buckets of consecutive parameters, each closed once it holds ``least`` elements
    or more; a parameter of ``least`` elements or more is a bucket of its own (its gradient is
    reduce-scattered, and its values all-gathered, in place). Each member's ``offset`` is set
    within its bucket."""
    buckets: list[_Bucket] = []
    for m in members:
        if not buckets or buckets[-1].length >= least or (buckets[-1].members and m.numel >= least):
            buckets.append(_Bucket(group, dtype, device, [], 0))
        m.offset = buckets[-1].length
        buckets[-1].members.append(m)
        buckets[-1].length += m.numel
    return buckets


def refuse_unshardable(optimizer: torch.optim.Optimizer) -> None:
    """Raise :class:`UsageError` unless ``optimizer`` is an exact :data:`SHARDABLE` class. Local
    and the same on every rank (the same class everywhere: the constructor checked the model)."""
    cls = type(optimizer)
    if cls in SHARDABLE:
        return
    names = ", ".join(c.__name__ for c in SHARDABLE)
    raise UsageError(
        f"hva.ZeRO cannot shard {cls.__module__}.{cls.__qualname__}: ZeRO steps each rank's range of "
        "the parameters apart, which equals one whole step only when the update of an element depends on "
        f"that element alone. Supported (exact classes): {names}. Use hva.Sync() for this optimizer."
    )


class ShardedOptimizer:
    """This rank's part of the user's optimizer and the hooks that step it (see the module).

    Communication: every optimizer step is collective (all-gather; stage 2 also every
    averaging backward pass: reduce-scatter and a small all-reduce); :meth:`state_dict` and
    :meth:`load_state_dict` are collective. Every rank must step, save and load alike.
    :meth:`close` removes every hook (local)."""

    def __init__(self, hvd: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, stage: int,
                 comm: Any, gradients: GradientAllreducer | None) -> None:
        refuse_unshardable(optimizer)
        sparse = [name for name, module in model.named_modules()
                  if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and module.sparse]
        if sparse:
            raise UsageError(f"hva.ZeRO cannot shard sparse gradients ({', '.join(sparse)}: sparse=True): each rank "
                             "steps a range of the flat dense gradient. Use sparse=False, or hva.Sync().")
        self._hvd, self._optimizer, self._comm = hvd, optimizer, comm
        self._stage, self._gradients = stage, gradients
        self._rank, self._size = hvd.rank(), hvd.size()
        self._one_node = hvd.local_size() == hvd.size()
        self._prefix = f"hvdagents.zero.{next(_numbers)}."
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._buckets: list[_Bucket] = []
        self._groups: list[tuple[int, ...]] = []  # ids of each user group's parameters, as partitioned
        self._inner: torch.optim.Optimizer | None = None
        self._hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handles: list[Any] = [optimizer.register_step_pre_hook(self._before_step),
                                    optimizer.register_step_post_hook(self._after_step)]
        # stage 2: the mean gradient of this rank's range, per bucket, since the last step
        self._grads: dict[int, torch.Tensor] = {}
        self._buffers: dict[int, torch.Tensor] = {}  # what self._grads holds, kept from step to step
        self._kept: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}  # see _buffer
        self._present: set[int] = set()  # ids of parameters some rank had a gradient for
        self._reduced = False
        self._left = False  # a rank closed while this one trains: its steps are announced (serve)
        self._serving = False  # this rank closed and serves the others' steps
        self._in_pass = False
        self._syncing = True
        self._hooked: set[int] = set()
        # stage 2, the averaging pass under way: its ranks still training, the ids of the
        # parameters whose gradient arrived, of those this rank had a gradient for, the next
        # bucket to reduce (from the last)
        self._active = float(self._size)
        self._arrived: set[int] = set()
        self._had: set[int] = set()
        self._next = -1
        self._waiting: list[int] = []  # per bucket: its trainable parameters whose gradient has not arrived
        self._in_flight: list[tuple[_Bucket, Any]] = []  # reductions under way: (bucket, Horovod handle)
        self._late: set[int] = set()  # buckets reduced in this pass before a gradient of theirs came again
        self._bucket_of: dict[int, int] = {}  # parameter id -> its bucket's index
        self._lock = threading.RLock()  # autograd may run hooks on a device thread and the caller's at once
        try:
            self._layout()
            self._take_state(self._optimizer.state_dict(), root=None)
        except BaseException:
            self.close()
            raise

    # -- partition ----------------------------------------------------------------------------
    def _layout(self) -> None:
        """Partition groups added since the last call (``add_param_group``); refuse a group
        whose parameters changed. Local, the same on every rank."""
        groups = [tuple(id(p) for p in g["params"]) for g in self._optimizer.param_groups]
        if groups[:len(self._groups)] != self._groups:
            raise UsageError("under hva.ZeRO a param group's parameters cannot change after the agent was made "
                             "(each rank holds a range of them); add parameters with optimizer.add_param_group")
        if len(groups) == len(self._groups):
            return
        if self._left or self._serving:
            raise UsageError("under hva.ZeRO optimizer.add_param_group cannot be called once a rank has closed "
                             "its agent (uneven data): the ranks that closed cannot take part in the new group")
        index = sum(len(g) for g in self._groups)
        for gi in range(len(self._groups), len(groups)):
            kinds: dict[tuple[torch.dtype, torch.device], list[_Member]] = {}
            for p in self._optimizer.param_groups[gi]["params"]:
                name = self._names.get(id(p))
                if name is None:
                    raise UsageError("the optimizer holds a parameter that is not in the agent's model "
                                     f"(shape {tuple(p.shape)}); build the optimizer from model.parameters()")
                kinds.setdefault((p.dtype, p.device), []).append(_Member(p, name, index, 0, p.numel()))
                index += 1
            for (dtype, device), members in kinds.items():
                for bucket in _chunks(gi, dtype, device, members, CHUNK_ELEMENTS):
                    self._partition(bucket)
                    self._buckets.append(bucket)
            self._add_inner_group(gi)
        self._groups = groups
        self._bucket_of = {id(m.param): b for b, bucket in enumerate(self._buckets) for m in bucket.members}
        if self._stage == 2:
            for bucket in self._buckets:
                for m in bucket.members:
                    if id(m.param) not in self._hooked:
                        self._handles.append(m.param.register_post_accumulate_grad_hook(self._on_gradient))
                        self._hooked.add(id(m.param))

    def _partition(self, bucket: _Bucket) -> None:
        bucket.lo, bucket.hi = shard_ranges(bucket.length, self._size)[self._rank]
        bucket.values = torch.empty(bucket.hi - bucket.lo, dtype=bucket.dtype, device=bucket.device)
        for m in bucket.members:
            start, stop = max(bucket.lo, m.offset) - m.offset, min(bucket.hi, m.offset + m.numel) - m.offset
            if start < stop:
                at = m.offset + start - bucket.lo
                bucket.pieces.append(_Piece(m, start, stop, bucket.values[at:at + stop - start]))

    def _add_inner_group(self, gi: int) -> None:
        settings = {k: v for k, v in self._optimizer.param_groups[gi].items() if k != "params"}
        pieces = [piece.values for b in self._buckets if b.group == gi for piece in b.pieces]
        if self._inner is None:
            cls = type(self._optimizer)
            accepted = inspect.signature(cls).parameters
            defaults = {k: v for k, v in self._optimizer.defaults.items() if k in accepted}
            self._inner = cls([{**settings, "params": pieces}], **defaults)
        else:
            self._inner.add_param_group({**settings, "params": pieces})

    def _pieces(self) -> Iterator[_Piece]:
        for bucket in self._buckets:
            yield from bucket.pieces

    # -- the step -----------------------------------------------------------------------------
    def _before_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        if len(args) > 1 and args[1] is not None or kwargs.get("closure") is not None:
            raise UsageError("optimizer.step(closure) is not supported under hva.ZeRO (the step of each rank's "
                             "range runs before the closure's backward); call backward, then step()")
        self._layout()
        if self._stage == 1:
            self._left = self._left or self._gradients.active != self._size
            present = {id(m.param) for b in self._buckets for m in b.members if m.param.grad is not None}
        else:
            if self._in_pass:  # backward raised elsewhere (not in a hook of ours): its end never came
                self._abandon_pass()
                raise UsageError("optimizer.step() after a backward pass that did not finish (it raised): under "
                                 "hva.ZeRO(stage=2) its gradients were not all averaged. Run backward again "
                                 "before stepping.")
            if not self._reduced:
                raise UsageError("optimizer.step() would step with gradients that were not averaged over the ranks: "
                                 "no backward pass ran since the last step. Call loss.backward() before every step.")
            present = self._present
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self._optimizer.param_groups]
        if self._left:  # the ranks that closed step their ranges too (serve)
            if self._stage == 1:
                self._gradients.announce()
                indices = sorted(m.index for b in self._buckets for m in b.members if id(m.param) in present)
                root, _ = self._exchange((settings, indices))
                self._share_gradients(root, present)
            else:
                self._event(_STEP)
                self._exchange((settings, None))
        self._step_ranges(settings, present, {k: v for k, v in kwargs.items() if k != "closure"})
        # the user's own step runs next: it finds no gradient, so it changes nothing, keeps no state
        self._hidden = [(p, p.grad) for g in self._optimizer.param_groups for p in g["params"] if p.grad is not None]
        for p, _ in self._hidden:
            p.grad = None

    def _step_ranges(self, settings: list[dict[str, Any]], present: set[int], step_kwargs: dict[str, Any]) -> None:
        """Collective: step the inner optimizer on this rank's ranges with the mean gradient
        (stage 1: slices of ``.grad``; stage 2: the reduce-scattered ranges) and the user's
        hyper-parameters ``settings``, then all-gather the ranges into the parameters in
        ``present`` (ids of those some rank had a gradient for)."""
        for bucket in self._buckets:
            grads = self._grads.get(id(bucket))
            for piece in bucket.pieces:
                if self._stage == 1:
                    grad = piece.member.param.grad
                    piece.values.grad = None if grad is None else grad.reshape(-1)[piece.start:piece.stop]
                else:
                    at = piece.member.offset + piece.start - bucket.lo
                    piece.values.grad = (grads[at:at + piece.stop - piece.start]
                                         if grads is not None and id(piece.member.param) in present else None)
        for gi, group in enumerate(settings):
            self._inner.param_groups[gi].update(group)
        with torch.no_grad():
            for piece in self._pieces():
                piece.values.copy_(piece.member.param.detach().reshape(-1)[piece.start:piece.stop])
            self._inner.step(**step_kwargs)
            for piece in self._pieces():
                piece.values.grad = None
            self._gather(present)

    # -- a rank that ran out of data ------------------------------------------------------------
    def serve(self) -> None:
        """Collective over all ranks, on a rank that closed (``agent.close()``, uneven data)
        after its last step: take part in every collective the ranks still training make, until
        every rank has closed. It contributes zero gradients (so each step averages over the
        ranks still training, as under ``Sync``), steps its own range with the mean gradient and
        the trainers' hyper-parameters when they step, and receives the all-gathered
        parameters: every rank ends with the same parameters, and each range's optimizer state
        is the one a rank that trained to the end would hold.

        The ranks still training learn that a rank left from the first averaging pass after it
        (the presence all-reduce counts the ranks in a pass); from then on they announce every
        other collective (the clipping norm, the step) through that same all-reduce, followed by
        one all-gather of the step's hyper-parameters (or the clipping's arguments)."""
        if self._size == 1:
            return
        self._serving = True
        if self._stage == 1:
            while True:
                event = self._gradients.serve()
                if event == "closed":
                    return
                if event == "step":
                    self._layout()
                    root, (settings, indices) = self._exchange(None)
                    wanted = set(indices)
                    present = {id(m.param) for b in self._buckets for m in b.members if m.index in wanted}
                    self._share_gradients(root, present)
                    self._step_ranges(settings, present, {})
        while True:
            totals = self._event(0.0)
            active = totals[0].item()
            if active == 0:
                return
            kind = totals[1].item() / active
            if kind == _PASS:
                self._active, self._next = active, len(self._buckets) - 1
                self._finish_pass(contribute=False)
            elif kind == _CLIP:
                _, (max_norm, norm_type) = self._exchange(None)
                self._clip_ranges(max_norm, norm_type)
            elif kind == _STEP:
                _, (settings, _) = self._exchange(None)
                self._step_ranges(settings, self._present, {})
                self._grads, self._present, self._reduced = {}, set(), False
            else:
                raise RuntimeError(f"hva.ZeRO: an announcement this rank cannot read ({totals[1].item()} over "
                                   f"{active} ranks); the ranks still training disagree on what comes next")

    def _exchange(self, value: Any) -> tuple[int, Any]:
        """Collective: the lowest rank still training (those that closed give ``None``) and
        its ``value``: the hyper-parameters of a step, or the arguments of a clipping."""
        values = allgather_object_over(self._comm, self._hvd, value, f"{self._prefix}exchange")
        root = next(r for r, v in enumerate(values) if v is not None)
        return root, values[root]

    def _share_gradients(self, root: int, present: set[int]) -> None:
        """Collective (stage 1, once a rank has left): ``root``'s ``.grad`` of the parameters
        in ``present``, one flat vector per bucket, into ``.grad`` on the ranks that closed,
        which run none of the user's code between backward and the step (clipping, a
        ``GradScaler``'s unscaling). The ranks still training hold the same bits already."""
        with torch.no_grad():
            for b, bucket in enumerate(self._buckets):
                members = [m for m in bucket.members if id(m.param) in present]
                if not members:
                    continue
                if self._rank == root:
                    flat = torch.cat([m.param.grad.detach().reshape(-1).cpu() for m in members])
                else:
                    flat = torch.empty(sum(m.numel for m in members), dtype=bucket.dtype)
                if self._comm is not None:
                    bcast_array(self._comm, flat.view(torch.uint8).numpy(), root=root)
                else:
                    wire = flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat
                    flat = self._hvd.broadcast(wire, root_rank=root, name=f"{self._prefix}grads.{b}").view(flat.dtype)
                if not self._serving:
                    continue
                at = 0
                for m in members:
                    m.param.grad = flat[at:at + m.numel].view_as(m.param).to(m.param.device)
                    at += m.numel

    def _after_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        for p, grad in self._hidden:
            p.grad = grad
        self._hidden = []
        self._grads, self._present, self._reduced = {}, set(), False

    def _gather(self, present: set[int]) -> None:
        """Collective: every rank's range of every bucket into the parameters that had a
        gradient (in rounds of at most :data:`ROUND_ELEMENTS`)."""
        for b, bucket in enumerate(self._buckets):
            plan = rounds(bucket.length, self._size, ROUND_ELEMENTS)
            only = bucket.members[0].param if len(bucket.members) == 1 and len(plan) == 1 else None
            for j, parts in enumerate(plan):
                lo, hi = parts[self._rank]
                mine = bucket.values[lo - bucket.lo:hi - bucket.lo]
                if (self._comm is not None and mine.device.type == "cpu" and only is not None and id(only) in present
                        and only.is_contiguous() and only.dtype == mine.dtype):  # one parameter: into it
                    size = mine.element_size()
                    self._comm.Allgatherv(mine.view(torch.uint8).numpy(),
                                          [only.data.view(-1).view(torch.uint8).numpy(),
                                           [(z - a) * size for a, z in parts]])
                    continue
                if self._comm is not None and mine.device.type == "cpu":  # MPI into a kept buffer
                    whole = self._buffer("gather", sum(z - a for a, z in parts), mine.dtype, mine.device)
                    size = mine.element_size()
                    self._comm.Allgatherv(mine.view(torch.uint8).numpy(),
                                          [whole.view(torch.uint8).numpy(), [(z - a) * size for a, z in parts]])
                else:
                    wire = mine.view(torch.int16) if mine.dtype == torch.bfloat16 else mine
                    whole = self._hvd.allgather(wire, name=f"{self._prefix}gather.{b}.{j}")
                    if whole.dtype != bucket.dtype:
                        whole = whole.view(bucket.dtype)
                at = 0
                for lo, hi in parts:
                    self._write(bucket, lo, whole[at:at + hi - lo], present)
                    at += hi - lo

    @staticmethod
    def _write(bucket: _Bucket, lo: int, values: torch.Tensor, present: set[int]) -> None:
        """Copy ``values`` (the bucket's elements from ``lo``) into the parameters they cover
        that had a gradient this step."""
        hi = lo + values.numel()
        for m in bucket.members:
            a, z = max(lo, m.offset), min(hi, m.offset + m.numel)
            if a >= z or id(m.param) not in present:
                continue
            target = m.param.data.view(-1) if m.param.is_contiguous() else None
            if target is not None:
                target[a - m.offset:z - m.offset].copy_(values[a - lo:z - lo])
            else:  # a strided parameter: rewrite it whole through a contiguous copy
                flat = m.param.detach().reshape(-1).clone()
                flat[a - m.offset:z - m.offset].copy_(values[a - lo:z - lo])
                m.param.data.copy_(flat.view_as(m.param))

    # -- stage 2: reduce-scatter at the end of backward ---------------------------------------
    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate in ``.grad`` locally; the first pass after
        it reduce-scatters everything accumulated. Local."""
        previous, self._syncing = self._syncing, False
        try:
            yield
        finally:
            self._syncing = previous

    def _on_gradient(self, p: torch.Tensor) -> None:
        if not self._syncing:
            return
        with self._lock:
            try:
                if not self._in_pass:
                    self._begin_pass()
                    self._in_pass = True
                    torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)
                if p.grad is not None and p.grad.is_sparse:
                    raise UsageError(f"hva.ZeRO cannot shard the sparse gradient of {self._names.get(id(p))} "
                                     "(an nn.Embedding(sparse=True)?): use a dense gradient or hva.Sync()")
                b = self._bucket_of.get(id(p))
                if b is not None and b > self._next:  # its bucket went already: this is a second gradient
                    self._late.add(b)
                elif b is not None and id(p) not in self._arrived:
                    self._waiting[b] -= 1
                self._arrived.add(id(p))
                self._reduce_ready()
            except BaseException:
                self._abandon_pass()
                raise

    def _abandon_pass(self) -> None:
        """Forget a pass that raised (local): the next gradient opens a new one. Reductions
        it started are not waited for; what they would have added is dropped with the step's
        partial mean, so the next step starts from its own passes only."""
        self._in_pass = False
        self._arrived, self._had, self._late, self._next, self._in_flight = set(), set(), set(), -1, []
        self._grads, self._present, self._reduced = {}, set(), False

    def _begin_pass(self) -> None:
        """Collective (stage 2, at the first gradient of an averaging pass): the presence
        all-reduce, which counts the ranks still training (a rank that closed serves from
        here) and checks that they train the same parameters. Buckets are then reduced from
        the last, the order in which backward produces them."""
        self._layout()
        totals = self._event(_PASS)
        self._active = totals[0].item()
        self._left = self._left or self._active != self._size
        self._arrived, self._had, self._next = set(), set(), len(self._buckets) - 1
        self._waiting = [sum(m.param.requires_grad for m in b.members) for b in self._buckets]

    def _reduce_ready(self) -> None:
        """Collective (stage 2, during backward): reduce-scatter, in bucket order from the last,
        every bucket whose trainable parameters have all had their gradient accumulated in
        this pass, and free those gradients. A bucket waiting on a parameter this pass does not
        reach holds back the ones before it until :meth:`_end_pass`, so every rank makes the
        same reductions in the same order whatever its graph."""
        while self._next >= 0 and self._waiting[self._next] == 0:
            self._reduce_bucket(self._next, contribute=True)
            self._next -= 1

    def _end_pass(self) -> None:
        """Collective (stage 2, at the end of backward): the buckets not reduced yet, then which
        parameters some rank had a gradient for. ``.grad`` is ``None`` from here to the step."""
        with self._lock:
            self._in_pass = False
            try:
                self._finish_pass(contribute=True)
            except BaseException:
                self._abandon_pass()
                raise

    def _finish_pass(self, contribute: bool) -> None:
        """Collective (stage 2): reduce-scatter the buckets left (zeros for the gradients this
        rank lacks; a rank that closed, ``contribute=False``, sends zeros only), then one
        all-reduce of the flags "this rank had a gradient", per parameter, and "a gradient of
        this bucket came again after the bucket went" (reentrant checkpointing, a parameter
        accumulated twice in one backward), per bucket: those buckets go once more, on every
        rank, with what came since (``.grad`` was freed when they went, so it holds only that)."""
        while self._next >= 0:
            self._reduce_bucket(self._next, contribute)
            self._next -= 1
        members = [m for b in self._buckets for m in b.members]
        flags = torch.tensor([1.0 if id(m.param) in self._had else 0.0 for m in members]
                             + [1.0 if b in self._late else 0.0 for b in range(len(self._buckets))],
                             dtype=torch.float64)
        try:
            counts = self._hvd.allreduce(flags, name=f"{self._prefix}flags", op=self._hvd.Sum)
        except Exception as err:  # noqa: BLE001 - Horovod reports a shape mismatch here
            raise self._mismatch(sum(m.param.requires_grad for m in members)) from err
        late = counts[len(members):].tolist()
        for b in reversed(range(len(self._buckets))):
            if late[b] > 0:
                self._reduce_bucket(b, contribute)
        self._settle(0)
        self._present.update(id(m.param) for m, count in zip(members, counts.tolist()) if count > 0)
        self._had, self._late = set(), set()
        self._reduced = True

    def _event(self, kind: float) -> torch.Tensor:
        """Collective (stage 2): the presence all-reduce, ``[1, kind, checksum, checksum**2]``
        summed over the ranks; a rank that closed sends zeros (``kind`` 0). The ranks still
        training raise :class:`~hvdagents.ModelMismatchError` when they differ in their
        trainable names or in ``kind``."""
        members = [m for b in self._buckets for m in b.members]
        trained = [m.name for m in members if m.param.requires_grad]
        if kind == 0.0:
            presence = torch.zeros(4, dtype=torch.float64)
        else:
            checksum = float(names_checksum(trained))
            presence = torch.tensor([1.0, kind, checksum, checksum * checksum], dtype=torch.float64)
        try:
            totals = self._hvd.allreduce(presence, name=f"{self._prefix}presence", op=self._hvd.Sum)
        except Exception as err:  # noqa: BLE001 - Horovod reports a shape mismatch here
            raise self._mismatch(len(trained)) from err
        active = totals[0].item()
        if kind != 0.0 and (totals[1].item() != active * kind or totals[-2].item() != active * presence[-2].item()
                            or totals[-1].item() != active * presence[-1].item()):
            raise self._mismatch(len(trained))
        return totals

    def _reduce_bucket(self, b: int, contribute: bool) -> None:
        """Start the sum over the ranks of bucket ``b``'s gradients (Horovod, asynchronous, on
        its background thread while backward goes on): one node, an in-place all-reduce of
        which this rank keeps its range (Open MPI's shared-memory all-reduce beats its
        reduce-scatter); across nodes, a reduce-scatter (half the bytes on the wire). The
        members' ``.grad`` are freed (``contribute``: this rank is training; else it sends
        zeros). At most :data:`IN_FLIGHT` buckets are under way: beyond, the oldest is waited for."""
        bucket = self._buckets[b]
        wire_dtype = _WIRE_DTYPES.get(bucket.dtype, bucket.dtype)
        grads = [m.param.grad if contribute else None for m in bucket.members]
        first = grads[0]
        with torch.no_grad():
            if (len(grads) == 1 and first is not None and first.is_contiguous() and first.dtype == wire_dtype
                    and first.device == bucket.device):
                send = first.detach().reshape(-1)  # the gradient itself: one parameter
            else:
                whole = all(g is not None for g in grads)
                send = (torch.empty if whole else torch.zeros)(bucket.length, dtype=wire_dtype, device=bucket.device)
                for m, g in zip(bucket.members, grads):
                    if g is not None:
                        send[m.offset:m.offset + m.numel].copy_(g.reshape(-1))
        for m, g in zip(bucket.members, grads):
            if g is not None:
                self._had.add(id(m.param))
            if contribute:
                m.param.grad = None
        name = f"{self._prefix}scatter.{b}"
        if self._one_node:
            handle = self._hvd.allreduce_async_(send, name=name, op=self._hvd.Sum)
        else:
            handle = self._hvd.reducescatter_async(send, name=name, op=self._hvd.Sum)
        self._in_flight.append((bucket, handle))
        self._settle(IN_FLIGHT)

    def _settle(self, keep: int) -> None:
        """Add the finished reductions (all but ``keep`` at most still under way, oldest
        first) to this rank's range of the mean gradient, divided by the ranks training."""
        while self._in_flight and (len(self._in_flight) > keep or self._hvd.poll(self._in_flight[0][1])):
            bucket, handle = self._in_flight.pop(0)
            out = self._hvd.synchronize(handle)
            mine = out[bucket.lo:bucket.hi] if self._one_node else out
            if mine.numel() != bucket.hi - bucket.lo:
                raise RuntimeError(f"Horovod's reducescatter gave rank {self._rank} {mine.numel()} elements; "
                                   f"the partition expects {bucket.hi - bucket.lo}")
            grads = self._grads.get(id(bucket))
            if grads is None:  # the first pass since the step: the bucket's buffer, zeroed (kept: no page faults)
                grads = self._buffers.get(id(bucket))
                if grads is None:
                    grads = self._buffers[id(bucket)] = torch.empty(bucket.hi - bucket.lo, dtype=bucket.dtype,
                                                                    device=bucket.device)
                self._grads[id(bucket)] = grads.zero_()
            with torch.no_grad():
                grads.add_(mine.div_(self._active).to(bucket.dtype))

    def _buffer(self, role: str, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The first ``length`` elements of a buffer kept for one role of the collectives
        (``"gather"``: an all-gather's output), at most one round (:data:`ROUND_ELEMENTS`)
        long: a fresh buffer per step would fault its pages in again (tens of milliseconds per
        10M elements)."""
        buffer = self._kept.get((role, dtype, device))
        if buffer is None or buffer.numel() < length:
            buffer = self._kept[(role, dtype, device)] = torch.empty(length, dtype=dtype, device=device)
        return buffer[:length]

    def _mismatch(self, trained: int) -> ModelMismatchError:
        return ModelMismatchError(
            f"the ranks train different sets of parameters (this rank trains {trained}). Every rank must "
            "freeze and unfreeze the same parameters (requires_grad) and add the same param groups to its "
            "optimizer, at the same step."
        )

    # -- clipping -----------------------------------------------------------------------------
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Collective (stage 2): ``torch.nn.utils.clip_grad_norm_`` over the whole mean
        gradient, which no rank holds: each rank's range's norm, one all-reduce, the same
        coefficient applied by every rank to its range. Stage 1: torch's own on ``.grad``."""
        if self._stage == 1:
            params = [p for g in self._optimizer.param_groups for p in g["params"] if p.grad is not None]
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
        if self._left:  # the ranks that closed take part in the norm (serve)
            self._event(_CLIP)
            self._exchange((float(max_norm), float(norm_type)))
        return self._clip_ranges(float(max_norm), float(norm_type))

    def _clip_ranges(self, max_norm: float, norm_type: float) -> torch.Tensor:
        """Collective (stage 2): the norm of the whole mean gradient over every rank's range
        (one all-reduce), each range scaled by the same coefficient."""
        grads = [g for g in self._grads.values() if g.numel()]
        if norm_type == math.inf:
            local = max((g.abs().max().to(torch.float64) for g in grads), default=torch.zeros((), dtype=torch.float64))
            total = self._hvd.allreduce(local.reshape(1).cpu(), name=f"{self._prefix}norm", op=self._hvd.Max)[0]
        else:
            local = sum((g.to(torch.float64).abs().pow(norm_type).sum() for g in grads),
                        torch.zeros((), dtype=torch.float64))
            total = self._hvd.allreduce(local.reshape(1).cpu(), name=f"{self._prefix}norm",
                                        op=self._hvd.Sum)[0].pow(1.0 / norm_type)
        coefficient = float(max_norm) / (float(total) + 1e-6)
        if coefficient < 1.0:
            for g in grads:
                g.mul_(coefficient)
        return total

    # -- state: bytes, checkpoints -------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of the tensors in this rank's optimizer state. Local."""
        return sum(t.numel() * t.element_size() for st in self._inner.state.values() for t in st.values()
                   if torch.is_tensor(t))

    def state_dict(self, root: int = 0) -> dict | None:
        """Collective: on ``root``, the user's optimizer's ordinary ``state_dict`` with the
        whole state, gathered one parameter's state tensor at a time; ``None`` elsewhere."""
        self._layout()
        layout: dict[int, dict[str, Any]] = {}  # index -> key -> ("range", dtype) | ("value", v)
        for piece in self._pieces():
            if piece.start != 0:
                continue  # described by the rank holding its first element
            layout[piece.member.index] = _describe(self._inner.state.get(piece.values, {}))
        described: dict[int, dict[str, Any]] = {}
        for part in allgather_object_over(self._comm, self._hvd, layout):
            described.update(part)
        full = self._optimizer.state_dict() if self._rank == root else None
        state: dict[int, dict[str, Any]] = {}
        for m, length, mine in self._members():
            keys = described.get(m.index) or {}
            entry: dict[str, Any] = {}
            for key, (kind, value) in keys.items():
                if kind == "value":
                    entry[key] = value.clone() if torch.is_tensor(value) else value
                    continue
                local = self._inner.state[mine.values][key] if mine is not None else None
                whole = _gather(self._hvd, self._comm, local, _counts(m, length, self._size), _dtype(value),
                                root, f"{self._prefix}state.{m.index}.{key}")
                if whole is not None:
                    entry[key] = whole.view_as(m.param).to(m.param.device)
            if entry:
                state[m.index] = entry
        if full is None:
            return None
        full["state"] = state
        return full

    def load_state_dict(self, root: int = 0) -> None:
        """Collective: ``root``'s user optimizer holds a whole state (loaded from a checkpoint);
        every rank takes its ranges of it, and ``root``'s user optimizer keeps none."""
        source = self._optimizer.state_dict() if self._rank == root else None
        self._take_state(source, root=root)

    def _take_state(self, source: dict | None, root: int | None) -> None:
        """This rank's ranges of ``source`` (a user optimizer's ``state_dict``) into the
        inner optimizer, then the user's optimizer emptied. ``root=None``: every rank holds
        ``source`` (local); else collective, ``source`` on ``root`` only."""
        self._layout()
        if root is None:
            layout = {index: _describe(entry) for index, entry in source["state"].items()}
            groups = source["param_groups"]
        else:
            described = ({index: _describe(entry) for index, entry in source["state"].items()},
                         source["param_groups"]) if self._rank == root else None
            layout, groups = bcast_object_over(self._comm, self._hvd, described, root)
        for gi, group in enumerate(groups):  # hyper-parameters as saved, on every rank
            self._optimizer.param_groups[gi].update({k: v for k, v in group.items() if k != "params"})
            self._inner.param_groups[gi].update({k: v for k, v in group.items() if k != "params"})
        self._inner.state.clear()
        for m, length, mine in self._members():
            keys = layout.get(m.index) or {}
            entry: dict[str, Any] = {}
            for key, (kind, value) in keys.items():
                if kind == "value":
                    entry[key] = value.clone() if torch.is_tensor(value) else value
                    continue
                whole = None if source is None else source["state"][m.index][key]
                if root is None:
                    part = whole.reshape(-1)[mine.start:mine.stop].clone() if mine is not None else None
                else:
                    part = _scatter(self._hvd, self._comm, whole, _counts(m, length, self._size), _dtype(value),
                                    root, f"{self._prefix}load.{m.index}.{key}")
                if mine is not None:
                    entry[key] = part.to(device=m.param.device)
            if mine is not None and entry:
                self._inner.state[mine.values] = entry
        self._optimizer.state.clear()  # the whole state lives in the ranks' ranges now

    def _members(self) -> list[tuple[_Member, int, _Piece | None]]:
        """Every parameter in ``state_dict`` order, its bucket's length and this rank's piece."""
        mine = {id(p.member): p for p in self._pieces()}
        found = [(m, b.length, mine.get(id(m))) for b in self._buckets for m in b.members]
        return sorted(found, key=lambda item: item[0].index)

    def close(self) -> None:
        """Remove every hook (local); the ranges' optimizer state is dropped with this object."""
        for p, grad in self._hidden:
            p.grad = grad
        self._hidden = []
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._gradients is not None:
            self._gradients.close()


def _describe(entry: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """One parameter's optimizer state as ``key -> ("range", dtype name)`` for the entries
    held element by element (cut into ranges), ``("value", v)`` for the rest (kept whole)."""
    return {k: ("range", str(v.dtype)) if torch.is_tensor(v) and k not in _PER_TENSOR_KEYS else ("value", v)
            for k, v in entry.items()}


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.split(".")[-1])  # "torch.float64" -> torch.float64


def _counts(member: _Member, length: int, size: int) -> list[int]:
    """How many of ``member``'s elements each rank's range holds."""
    return [max(0, min(hi, member.offset + member.numel) - max(lo, member.offset))
            for lo, hi in shard_ranges(length, size)]


# -- transport of one state tensor (MPI when there is an MPI world, else Horovod) -------------------
def _gather(hvd: Any, comm: Any, local: torch.Tensor | None, counts: list[int], dtype: torch.dtype, root: int,
            name: str) -> torch.Tensor | None:
    """Collective: the ranks' parts (``counts[r]`` elements from rank r) concatenated on
    ``root`` (``None`` elsewhere)."""
    rank = hvd.rank()
    part = (local if local is not None else torch.zeros(0, dtype=dtype)).detach().to("cpu").contiguous()
    if comm is None:
        whole = hvd.allgather(part.view(torch.int16) if dtype == torch.bfloat16 else part, name=name)
        return whole.view(dtype) if rank == root else None
    whole = torch.empty(sum(counts), dtype=dtype) if rank == root else None
    send = part.view(torch.uint8).numpy()
    size = part.element_size()
    recv = [whole.view(torch.uint8).numpy(), [c * size for c in counts]] if rank == root else None
    comm.Gatherv(send, recv, root=root)
    return whole


def _scatter(hvd: Any, comm: Any, whole: torch.Tensor | None, counts: list[int], dtype: torch.dtype, root: int,
             name: str) -> torch.Tensor:
    """Collective: rank r receives its ``counts[r]`` elements of ``root``'s ``whole``."""
    rank = hvd.rank()
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    if comm is None:
        full = whole.detach().to("cpu").reshape(-1).contiguous() if rank == root else torch.empty(sum(counts),
                                                                                                  dtype=dtype)
        wire = full.view(torch.int16) if dtype == torch.bfloat16 else full
        full = hvd.broadcast(wire, root_rank=root, name=name).view(dtype)
        return full[offsets[rank]:offsets[rank + 1]].clone()
    part = torch.empty(counts[rank], dtype=dtype)
    size = part.element_size()
    send = None
    if rank == root:
        source = whole.detach().to("cpu", dtype).reshape(-1).contiguous()
        send = [source.view(torch.uint8).numpy(), [c * size for c in counts]]
    comm.Scatterv(send, part.view(torch.uint8).numpy(), root=root)
    return part
