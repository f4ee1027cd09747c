"""Gradient averaging for ``TorchAgent(Sync)``: our own hooks on Horovod's async all-reduce.

Why not ``horovod.torch.DistributedOptimizer``: it fixes the set of parameters when it is
built (a frozen parameter in the optimizer breaks its naming, a parameter unfrozen later is
never all-reduced, and the ranks' weights silently diverge), it builds a second instance of
the user's optimizer class, and it hands parameters that got no gradient a zero gradient
that momentum and weight decay then move.

Here the set of parameters is read again at every step: every parameter that is in one of
the optimizer's ``param_groups`` and has ``requires_grad``. A post-accumulate-grad hook on
each starts its all-reduce (``SUM``) as soon as backward has produced the gradient, so
communication overlaps the rest of backward as in Horovod. ``step`` then submits what has
not started yet (a parameter unfrozen since the last step, a gradient missing on this
rank: zeros), plus one small *presence* vector, and waits for all of them.

The presence vector (``SUM`` over ranks) carries, in this order: 1 (the rank is still
training: ranks that left through ``agent.close()`` contribute zeros there, as
Horovod's join does for every all-reduce), one flag per parameter (this rank had a
gradient), and a checksum of the parameter names and its square. From it every rank learns
the same three things: the number of ranks still training (gradients are divided by it, so
they are the mean over those ranks, counting a rank without a gradient for a parameter as
contributing zero, exactly as one process on the concatenated batch would), which
parameters no rank has a gradient for (their ``grad`` is set to ``None`` on every rank, so
the optimizer leaves them alone), and whether every rank trains the same parameters (if not,
:class:`~hvdagents.ModelMismatchError` on every rank instead of a hang).
"""

from __future__ import annotations

import zlib
from typing import Any, Callable

import torch

from ..errors import ModelMismatchError, UsageError

__all__ = ["GradientAllreducer", "wire_tensor"]

#: Name prefix of every gradient all-reduce (Horovod matches tensors across ranks by name).
_GRAD_PREFIX = "hvdagents.grad."
_PRESENCE_NAME = "hvdagents.grad_presence"
#: Checksums are kept below 2**26 so that sums of their squares over many ranks stay exact
#: in float64.
_CHECKSUM_MASK = (1 << 26) - 1


def names_checksum(names: list[str]) -> int:
    """A checksum of an ordered list of parameter names (equal lists, equal checksums)."""
    return zlib.crc32("\0".join(names).encode()) & _CHECKSUM_MASK


#: Dtypes Horovod 0.28 cannot reduce, and the dtype they travel in (exact widening).
_WIRE_DTYPES = {torch.bfloat16: torch.float32}


def wire_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or a float32 copy of a bfloat16 one (Horovod 0.28 cannot reduce
    bfloat16; float32 holds it exactly and sums it more precisely)."""
    wide = _WIRE_DTYPES.get(tensor.dtype)
    return tensor if wide is None else tensor.to(wide)


class GradientAllreducer:
    """Averages the gradients of an optimizer's trainable parameters over all ranks.

    Communication: every method that reduces is collective over the ranks still training
    (:meth:`synchronize` once per step on every rank, in the same order); hooks start
    non-blocking all-reduces during backward. ``hvd`` is ``horovod.torch``, initialised.
    """

    def __init__(self, hvd: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 compression: str | None, backward_passes_per_step: int) -> None:
        self._hvd = hvd
        self._optimizer = optimizer
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._compression = hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none
        self._passes_per_step = backward_passes_per_step
        self._hooked: set[int] = set()
        self._handles: dict[str, tuple[Any, Any, torch.Tensor]] = {}
        self._passes: dict[str, int] = {}
        self._tracked: dict[str, torch.nn.Parameter] = {}
        self._alone = hvd.size() == 1  # a world of one: nothing to average (as Horovod does)
        if not self._alone:
            self.refresh()

    # -- which parameters -------------------------------------------------------------------
    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The parameters reduced at the next step, by name, sorted: those in the optimizer's
        param groups that require a gradient (read again at every step)."""
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
        """Re-read the trainable set and hook the parameters that are new in it. Local."""
        self._tracked = self.trainable()
        for name, p in self._tracked.items():
            if id(p) not in self._hooked:
                p.register_post_accumulate_grad_hook(self._make_hook(name))
                self._hooked.add(id(p))

    def _make_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def on_gradient(p: torch.Tensor) -> None:
            if name not in self._tracked or name in self._handles:
                return
            self._passes[name] = self._passes.get(name, 0) + 1
            if self._passes[name] >= self._passes_per_step:
                self._start(name, p.grad)

        return on_gradient

    # -- reduction ---------------------------------------------------------------------------
    def _start(self, name: str, grad: torch.Tensor) -> None:
        compressed, ctx = self._compression.compress(wire_tensor(grad))
        handle = self._hvd.allreduce_async_(compressed, name=_GRAD_PREFIX + name, op=self._hvd.Sum)
        self._handles[name] = (handle, ctx, grad)

    def synchronize(self) -> None:
        """Collective: finish every gradient all-reduce of this step and leave in ``p.grad``
        the mean over the ranks still training (``None`` where no rank had a gradient)."""
        if self._alone:
            return
        for name, (_, _, grad) in self._handles.items():
            if self._tracked[name].grad is not grad:
                self._drain()  # the peers' matching all-reduces complete before anyone goes on
                raise UsageError(
                    "optimizer.zero_grad() was called after loss.backward() but before agent.step(): "
                    "the gradients being averaged were dropped. Call zero_grad() before backward(), "
                    "or after agent.step()."
                )
        self.refresh()
        names = list(self._tracked)
        present = []
        for name, p in self._tracked.items():
            present.append(1.0 if p.grad is not None else 0.0)
            if name in self._handles:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self._start(name, p.grad)
        checksum = float(names_checksum(names))
        presence = torch.tensor([1.0, *present, checksum, checksum * checksum], dtype=torch.float64)
        try:
            totals = self._hvd.synchronize(
                self._hvd.allreduce_async_(presence, name=_PRESENCE_NAME, op=self._hvd.Sum)
            )
        except Exception as err:  # noqa: BLE001 - Horovod reports a shape mismatch here
            raise self._mismatch(names) from err
        active = totals[0].item()
        if totals[-2].item() != active * checksum or totals[-1].item() != active * checksum * checksum:
            raise self._mismatch(names)
        for name, count in zip(names, totals[1:-2].tolist()):
            handle, ctx, grad = self._handles[name]
            reduced = self._compression.decompress(self._hvd.synchronize(handle), ctx)
            if count == 0:  # no rank had a gradient: the optimizer leaves the parameter alone
                self._tracked[name].grad = None
                continue
            reduced.div_(active)
            if reduced.data_ptr() != grad.data_ptr():
                grad.copy_(reduced)
        self._handles.clear()
        self._passes.clear()

    def _drain(self) -> None:
        """Wait for every all-reduce in flight and forget them (their results are dropped)."""
        for handle, _, _ in self._handles.values():
            self._hvd.synchronize(handle)
        self._handles.clear()
        self._passes.clear()

    def _mismatch(self, names: list[str]) -> ModelMismatchError:
        return ModelMismatchError(
            f"the ranks train different sets of parameters (this rank trains {len(names)}). Every "
            "rank must freeze and unfreeze the same parameters (requires_grad) and add the same "
            "param groups to its optimizer, at the same step."
        )

    def check_no_pending_step(self) -> None:
        """Raise :class:`UsageError` when gradients of an unfinished step are in flight. Local."""
        if self._handles:
            raise UsageError(
                "agent.close() was called between loss.backward() and agent.step(): finish the "
                "step (call agent.step()) before closing the agent."
            )
