"""Gradient averaging for ``TorchAgent(Sync)``: DDP's contract on Horovod's async all-reduce.

**The contract** (PyTorch ``DistributedDataParallel``'s): when ``loss.backward()`` returns,
every trainable parameter's ``.grad`` holds the mean of the ranks' gradients, identical on
every rank. Whatever runs between backward and the optimizer's step (clipping by norm or by
value, ``GradScaler.unscale_`` and its inf check, gradient logging) sees the mean, and
anyone may step the optimizer (``optimizer.step()``, ``scaler.step(optimizer)``, a
framework's loop, ``agent.step()``).

**How.** A post-accumulate-grad hook on each trainable parameter starts its all-reduce
(``SUM``) as soon as backward has produced the gradient, so communication overlaps the rest
of backward, with Horovod's tensor fusion. The first hook of a backward pass queues a
callback on autograd's engine that runs once the pass has accumulated every gradient (the
mechanism DDP's reducer uses); it submits what has not started (a parameter unfrozen since
the last step, a gradient missing on this rank: zeros), plus one small *presence* vector,
waits for all of them and leaves the mean in ``.grad``.

The presence vector (``SUM`` over ranks) carries, in this order: 1 (the rank is still
training: ranks that left through ``agent.close()`` contribute zeros there, as Horovod's
join does for every all-reduce), one flag per parameter (this rank had a gradient), and a
checksum of the parameter names and its square. From it every rank learns the number of
ranks still training (gradients are divided by it: a parameter without a gradient on a rank
counts as zero there, as in one process on the concatenated batch), which parameters no rank
has a gradient for (their ``grad`` becomes ``None`` on every rank, so the optimizer leaves
them alone), and whether every rank trains the same parameters (if not,
:class:`~hvdagents.ModelMismatchError` on every rank instead of a hang).

**Which parameters**: those in the optimizer's param groups with ``requires_grad``, read
again at every averaging (freeze, unfreeze, ``add_param_group`` the same way on every rank).

**Several backward passes before one step.** With ``backward_passes_per_step=1`` (the
default) every backward pass averages, as DDP does: two losses with a backward each, or a
GAN's generator pass that reaches the discriminator, give the sum of the averaged gradients,
which is what one process has (re-averaging a mean that is already the same on every rank
changes nothing). With ``k > 1`` the first ``k - 1`` passes after a step only accumulate
locally and the k-th averages the sum; a (k+1)-th before the step raises. DDP's
``no_sync()`` is the flexible form: passes inside it only accumulate, the next pass outside
it averages everything accumulated.

**Sparse and strided gradients.** Sparse gradients (``nn.Embedding(sparse=True)``) travel as
Horovod all-gathers of their indices and values and come back as one sparse gradient of the
summed rows divided by the ranks still training, so sparse optimizers keep working.
Non-contiguous gradients (``channels_last``) and bfloat16 ones (Horovod 0.28 cannot reduce
bfloat16) travel through a contiguous (float32) copy, written back when the pass ends.
``compression="fp16"`` scales by 1/size before the cast and the sum, so a sum over many
ranks does not overflow float16.
"""

from __future__ import annotations

import itertools
import weakref
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..errors import ModelMismatchError, NonFiniteError, UsageError

__all__ = ["GradientAllreducer", "wire_tensor"]

#: Name prefix of every gradient all-reduce (Horovod matches tensors across ranks by name);
#: each reducer adds its own number, so several agents' gradients may be in flight at once.
_GRAD_PREFIX = "hvdagents.grad"
#: Checksums are kept below 2**20 so that sums of their squares stay below 2**53, exact in
#: float64 whatever order a reduction adds them in, up to 8192 ranks.
_CHECKSUM_MASK = (1 << 20) - 1
#: Reducers made in this process, in order: the same number on every rank, because agents are
#: made collectively in the same order.
_reducer_numbers = itertools.count()
#: Which open reducer averages a parameter: id(parameter) -> (weak reference to it, reducer).
_OWNERS: dict[int, tuple[weakref.ref, Any]] = {}


def names_checksum(names: list[str]) -> int:
    """A checksum of an ordered list of parameter names (equal lists, equal checksums)."""
    return zlib.crc32("\0".join(names).encode()) & _CHECKSUM_MASK


#: Dtypes Horovod 0.28 cannot reduce, and the dtype they travel in (exact widening).
_WIRE_DTYPES = {torch.bfloat16: torch.float32}


def wire_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when Horovod can reduce it in place; else a contiguous copy, in
    float32 for bfloat16 (Horovod 0.28 cannot reduce bfloat16; float32 holds it exactly)."""
    wide = _WIRE_DTYPES.get(tensor.dtype)
    if wide is None and tensor.is_contiguous():
        return tensor
    return tensor.to(dtype=wide or tensor.dtype, memory_format=torch.contiguous_format)


@dataclass
class _InFlight:
    """One gradient's all-reduce (dense) or pair of all-gathers (sparse) of this pass."""

    grad: torch.Tensor
    handles: tuple[Any, ...]
    wire: torch.Tensor | None = None  # dense: the tensor Horovod reduces (may be ``grad``)


class GradientAllreducer:
    """Averages the gradients of an optimizer's trainable parameters over all ranks at the
    end of every (k-th) backward pass; checks every step of the optimizer.

    Communication: the end of each averaging backward pass is collective over the ranks
    still training (every rank must run the same averaging passes, in the same order);
    hooks start non-blocking all-reduces during backward. ``hvd`` is ``horovod.torch``,
    initialised. :meth:`close` removes every hook this object added (parameters and
    optimizer), so a later agent on the same model starts clean.
    """

    def __init__(self, hvd: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 compression: str | None, backward_passes_per_step: int, nonfinite: str = "pass",
                 step_number: Callable[[], int] = lambda: 0) -> None:
        self._hvd = hvd
        self._optimizer = optimizer
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._prefix = f"{_GRAD_PREFIX}.{next(_reducer_numbers)}."
        self._fp16 = compression == "fp16"
        self._size = hvd.size()
        self._passes_per_step = backward_passes_per_step
        self._check_finite = nonfinite == "raise"
        self._step_number = step_number  # the optimizer step about to be taken (1-based)
        self.active = float(self._size)  # ranks still training, as the last averaging counted them
        self._sparse = {  # parameters whose gradients are sparse (known before the first one)
            id(m.weight) for m in model.modules()
            if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse
        }
        self._tracked: dict[str, torch.nn.Parameter] = {}
        self._hooked: set[int] = set()
        self._handles: list[Any] = []  # removable hook handles
        self._in_flight: dict[str, _InFlight] = {}
        # Where this step stands: passes counted since the last step (outside no_sync), whether
        # the gradients hold the mean, passes under no_sync() not averaged yet.
        self._passes = 0
        self._averaged = False
        self._unaveraged_local = False
        self._in_pass = False
        self._averaging_pass = False
        self._syncing = True
        self._grads_seen: dict[str, weakref.ref] = {}
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))
        self._handles.append(optimizer.register_step_post_hook(self._after_step))
        try:
            self.refresh()
        except BaseException:
            self.close()  # a refused start leaves no hook behind
            raise

    # -- which parameters -------------------------------------------------------------------
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The parameters averaged at the next averaging, by name, sorted: those in the
        optimizer's param groups that require a gradient (read again at every averaging)."""
        found: dict[str, torch.nn.Parameter] = {}
        for group in self._optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                name = self._names.get(id(p))
                if name is None:
                    raise UsageError(
                        "the optimizer holds a parameter that is not in the agent's model "
                        f"(shape {tuple(p.shape)}); build the optimizer from model.parameters() "
                        "or add only the model's parameters to it."
                    )
                found[name] = p
        return dict(sorted(found.items()))

    def refresh(self) -> None:
        """Re-read the trainable set and hook the parameters that are new in it. Local.
        A parameter another open agent averages (two optimizers sharing an encoder) is
        refused: both would divide its gradient."""
        self._tracked = self.trainable()
        for name, p in self._tracked.items():
            held, owner = _OWNERS.get(id(p), (None, None))
            if held is not None and held() is p and owner is not self:
                raise UsageError(
                    f"parameter '{name}' is averaged by another open TorchAgent(Sync) too (optimizers "
                    "that share parameters): its gradient would be averaged twice. Give the shared "
                    "parameters to one optimizer, or close the other agent first."
                )
            _OWNERS[id(p)] = (weakref.ref(p), self)
            if id(p) not in self._hooked:
                self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(name)))
                self._hooked.add(id(p))

    # -- DDP's no_sync --------------------------------------------------------------------
    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate gradients locally (no communication); the
        first backward pass after the block averages everything accumulated. Local."""
        previous, self._syncing = self._syncing, False
        try:
            yield
        finally:
            self._syncing = previous

    # -- hooks ----------------------------------------------------------------------------
    def _make_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def on_gradient(p: torch.Tensor) -> None:
            if not self._in_pass:
                self._begin_pass()
            if (self._averaging_pass and self._size > 1 and name in self._tracked
                    and name not in self._in_flight):
                self._start(name, p.grad)

        return on_gradient

    def _begin_pass(self) -> None:
        """First gradient of a backward pass: count it and queue the end-of-pass callback."""
        if not self._syncing:
            self._unaveraged_local = True
            return  # no callback: nothing to finish (the flag is reset by the next averaging)
        k = self._passes_per_step
        if k > 1 and self._passes and self._gradients_were_reset():
            self._passes, self._averaged = 0, False  # zero_grad() since: a new accumulation
        if k > 1 and self._passes >= k:
            raise UsageError(
                f"backward pass {self._passes + 1} since the last optimizer step, but "
                f"hva.Sync(backward_passes_per_step={k}) averages after exactly {k}: the extra "
                "gradient would never be averaged. Step the optimizer after every "
                f"{k} backward passes, raise backward_passes_per_step, or accumulate the "
                "micro-batches inside `with agent.no_sync():` (the first backward outside it averages)."
            )
        self._passes += 1
        self._averaging_pass = self._passes >= k
        self._in_pass = True
        torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)

    def _end_pass(self) -> None:
        """Queued by :meth:`_begin_pass`: runs once backward has accumulated every gradient."""
        self._in_pass = False
        if self._averaging_pass:
            self._averaging_pass = False
            self.synchronize()
            self._averaged, self._unaveraged_local = True, False
        if self._passes_per_step > 1:
            self._grads_seen = {n: weakref.ref(p.grad) for n, p in self._tracked.items() if p.grad is not None}

    def _gradients_were_reset(self) -> bool:
        """Whether the gradients this reducer saw at the end of the last pass were replaced
        since (``zero_grad()`` sets them to ``None``): the passes start counting again."""
        return any(self._tracked[n].grad is not ref() for n, ref in self._grads_seen.items()
                   if n in self._tracked)

    @staticmethod
    def _has_closure(args: tuple, kwargs: dict) -> bool:
        # A step hook's ``args`` start with the optimizer itself: step(closure) -> (opt, closure).
        return len(args) > 1 and args[1] is not None or kwargs.get("closure") is not None

    def _before_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        """Optimizer step pre-hook: refuse a step whose gradients were not averaged."""
        if self._has_closure(args, kwargs):
            return  # step(closure): the closure's backward passes average; checked after
        self._check_averaged("optimizer.step()")
        self._refuse_nonfinite(self._step_number(), "the optimizer step was not taken, on any rank")

    def _after_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        if self._has_closure(args, kwargs):
            self._check_averaged("optimizer.step(closure): the closure")
            # the agent's own post-hook (registered first) has counted this step already
            self._refuse_nonfinite(self._step_number() - 1,
                                   "optimizer.step(closure) had already applied it, on every rank")
        self._passes, self._averaged, self._unaveraged_local = 0, False, False
        self._grads_seen = {}

    def _refuse_nonfinite(self, step: int, outcome: str) -> None:
        """``Sync(nonfinite="raise")``: raise :class:`NonFiniteError` when an averaged gradient
        holds a NaN or an infinity. Local, but the averaged gradients are the same on every
        rank, so every rank raises alike (the parameters are checked in sorted name order)."""
        if not self._check_finite:
            return
        grads = {name: p.grad.coalesce().values() if p.grad.is_sparse else p.grad
                 for name, p in self._tracked.items() if p.grad is not None}
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads.values()]).all()):
            return
        name, grad = next((n, g) for n, g in grads.items() if not bool(torch.isfinite(g).all()))
        value = float(grad[~torch.isfinite(grad)].reshape(-1)[0])
        raise NonFiniteError("Sync", name, value, "the averaged gradient", step, outcome)

    def _check_averaged(self, who: str) -> None:
        if self._averaged and not self._unaveraged_local:
            return
        k = self._passes_per_step
        if self._unaveraged_local:
            detail = ("its gradients were only accumulated inside `with agent.no_sync():`; run the "
                      "last micro-batch's backward outside the block, which averages them")
        elif self._passes:
            detail = (f"it ran {self._passes} backward pass(es) since the last step, and "
                      f"hva.Sync(backward_passes_per_step={k}) averages after {k}")
        else:
            detail = ("no backward pass ran since the last step (the optimizer stepped twice "
                      "without a backward, or before the first one)")
        raise UsageError(
            f"{who} would step with gradients that were not averaged over the ranks: {detail}. "
            "Call loss.backward() (the averaging ends with it) before every optimizer step."
        )

    # -- reduction ---------------------------------------------------------------------------
    def _start(self, name: str, grad: torch.Tensor) -> None:
        param = self._tracked[name]
        if grad.is_sparse or id(param) in self._sparse:
            self._sparse.add(id(param))
            self._in_flight[name] = self._start_sparse(name, grad)
            return
        wire = wire_tensor(grad)
        if self._fp16 and wire.is_floating_point():
            wire = torch.mul(wire, 1.0 / self._size).to(torch.float16)  # scaled before the sum
        handle = self._hvd.allreduce_async_(wire, name=self._prefix + name, op=self._hvd.Sum)
        self._in_flight[name] = _InFlight(grad, (handle,), wire)

    def _start_sparse(self, name: str, grad: torch.Tensor) -> _InFlight:
        if not grad.is_sparse:
            raise UsageError(
                f"parameter '{name}' had sparse gradients and now has a dense one: the ranks must "
                "agree on a gradient's layout at every averaging (one nn.Embedding(sparse=...) setting)"
            )
        grad = grad.coalesce()
        indices = self._hvd.allgather_async(grad.indices().t().contiguous(), name=self._prefix + name + ".indices")
        values = self._hvd.allgather_async(grad.values().contiguous(), name=self._prefix + name + ".values")
        return _InFlight(grad, (indices, values))

    def synchronize(self) -> None:
        """Collective: finish every gradient all-reduce of this pass and leave in ``p.grad``
        the mean over the ranks still training (``None`` where no rank had a gradient)."""
        self.refresh()
        if self._size == 1:  # a world of one: the mean is the gradient (as Horovod does)
            self._in_flight.clear()
            return
        names = list(self._tracked)
        present = []
        for name, p in self._tracked.items():
            present.append(1.0 if p.grad is not None else 0.0)
            if name in self._in_flight:
                continue
            if p.grad is None:
                p.grad = (self._empty_sparse(p) if id(p) in self._sparse else torch.zeros_like(p))
            self._start(name, p.grad)
        checksum = float(names_checksum(names))
        presence = torch.tensor([1.0, *present, checksum, checksum * checksum], dtype=torch.float64)
        try:
            totals = self._hvd.synchronize(
                self._hvd.allreduce_async_(presence, name=self._prefix + "presence", op=self._hvd.Sum)
            )
        except Exception as err:  # noqa: BLE001 - Horovod reports a shape mismatch here
            self._in_flight.clear()  # some have no peer: waiting for them would hang
            if "Mismatched" not in str(err):  # a peer lost (Horovod shut down): hva.elastic.run recovers from it
                raise
            raise self._mismatch(names) from err
        active = self.active = totals[0].item()
        if totals[-2].item() != active * checksum or totals[-1].item() != active * checksum * checksum:
            self._in_flight.clear()
            raise self._mismatch(names)
        self._finish_all(names, totals, active)

    # -- a rank that left serving the others (ZeRO, see torch_sharded.ShardedOptimizer.serve) ---
    def serve(self) -> str:
        """Collective, on a rank that closed while others still train: the next presence
        all-reduce of the ranks still training, this rank contributing zeros there (as
        Horovod's join would). Returns ``"closed"`` when no rank trains any more, ``"step"``
        for an :meth:`announce`, or ``"pass"`` for an averaging pass: this rank then takes
        part in its all-reduces with zero gradients and, like the others, leaves the mean in
        ``.grad`` (``None`` where no rank had a gradient)."""
        self.refresh()
        names = list(self._tracked)
        presence = torch.zeros(len(names) + 3, dtype=torch.float64)
        totals = self._hvd.allreduce(presence, name=self._prefix + "presence", op=self._hvd.Sum)
        active = totals[0].item()
        if active == 0:
            return "closed"
        self.active = active
        if totals[-2].item() < 0:
            return "step"
        for name, p in self._tracked.items():
            p.grad = self._empty_sparse(p) if id(p) in self._sparse else torch.zeros_like(p)
            self._start(name, p.grad)
        self._finish_all(names, totals, active)
        return "pass"

    def _finish_all(self, names: list[str], totals: torch.Tensor, active: float) -> None:
        """Wait for every gradient all-reduce in flight and leave each mean in ``.grad``;
        ``totals[1:-2]`` counts, per parameter, the ranks that had a gradient."""
        try:
            for name, count in zip(names, totals[1:-2].tolist()):
                flight = self._in_flight.pop(name)
                if len(flight.handles) == 2:
                    self._finish_sparse(name, flight, active)
                else:
                    self._finish_dense(flight, active)
                if count == 0:  # no rank had a gradient: the optimizer leaves the parameter alone
                    self._tracked[name].grad = None
        finally:
            self._drain()  # what is left (a parameter dropped from the set, or after an error)

    def announce(self) -> None:
        """Collective over every rank, on the ranks still training once one has left (ZeRO):
        tells the ranks in :meth:`serve` that a step follows, through the presence all-reduce
        (same name and length; a negative checksum marks it). Every rank still training must
        announce alike, else :class:`~hvdagents.ModelMismatchError`."""
        names = list(self._tracked)
        presence = torch.zeros(len(names) + 3, dtype=torch.float64)
        presence[0], presence[-2] = 1.0, -1.0
        totals = self._hvd.allreduce(presence, name=self._prefix + "presence", op=self._hvd.Sum)
        if totals[-2].item() != -totals[0].item():
            raise self._mismatch(names)

    def _finish_dense(self, flight: _InFlight, active: float) -> None:
        reduced = self._hvd.synchronize(flight.handles[0])
        grad = flight.grad
        if self._fp16 and reduced.dtype == torch.float16:
            reduced = reduced.to(grad.dtype)
            if active != self._size:
                reduced.mul_(self._size / active)
        else:
            reduced.div_(active)
        if reduced.data_ptr() != grad.data_ptr():
            grad.copy_(reduced)

    def _finish_sparse(self, name: str, flight: _InFlight, active: float) -> None:
        indices = self._hvd.synchronize(flight.handles[0])
        values = self._hvd.synchronize(flight.handles[1])
        grad = flight.grad
        mean = torch.sparse_coo_tensor(indices.t(), values / active, grad.shape,
                                       check_invariants=False).coalesce()  # indices from the ranks' own
        self._tracked[name].grad = mean

    @staticmethod
    def _empty_sparse(p: torch.Tensor) -> torch.Tensor:
        return torch.sparse_coo_tensor(torch.zeros((1, 0), dtype=torch.int64, device=p.device),
                                       torch.zeros((0, *p.shape[1:]), dtype=p.dtype, device=p.device),
                                       p.shape, check_invariants=False)

    def _drain(self) -> None:
        """Wait for every all-reduce still in flight and forget them (results dropped), so the
        peers' matching operations complete before anyone raises."""
        for flight in self._in_flight.values():
            for handle in flight.handles:
                self._hvd.synchronize(handle)
        self._in_flight.clear()

    def _mismatch(self, names: list[str]) -> ModelMismatchError:
        return ModelMismatchError(
            f"the ranks train different sets of parameters (this rank trains {len(names)}). Every "
            "rank must freeze and unfreeze the same parameters (requires_grad) and add the same "
            "param groups to its optimizer, at the same step."
        )

    def rebind(self) -> None:
        """Local: Horovod was restarted under this reducer (an elastic reset, see
        :mod:`hvdagents.elastic`): forget the all-reduces in flight and where the step stood, and
        take the new world's size. The names stay: a worker that joined made its reducer fresh,
        and Horovod matches all-reduces by name (a new reducer here would wait forever)."""
        self._in_flight.clear()
        self._size = self._hvd.size()
        self.active = float(self._size)
        self._passes, self._averaged, self._unaveraged_local = 0, False, False
        self._in_pass = self._averaging_pass = False
        self._grads_seen = {}

    def close(self) -> None:
        """Remove every hook this reducer added (parameters and optimizer). Local."""
        self._in_flight.clear()
        for key in [key for key, (_, owner) in _OWNERS.items() if owner is self]:
            del _OWNERS[key]
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()
