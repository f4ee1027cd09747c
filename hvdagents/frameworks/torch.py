"""PyTorch adapter: ``hva.TorchAgent``.

Sync training uses Horovod's own PyTorch machinery, ``horovod.torch.DistributedOptimizer``:
per-parameter hooks start each gradient's all-reduce as soon as backward produces it
(overlapping communication with the rest of backward), with tensor fusion, fp16 compression
and ``backward_passes_per_step``. The user's optimizer keeps its state and does the update;
Horovod's wrapper is used only for its hooks and ``synchronize()``.
"""

from __future__ import annotations

import io
from typing import IO, Any, Callable

import numpy as np
import torch

from ..agent import ROOT_RANK, Agent, ParameterSignature, check_same_model
from ..errors import UsageError
from ..strategies.config import Strategy, Sync

__all__ = ["TorchAgent"]


class TorchAgent(Agent):
    """Make ``model`` + ``optimizer`` a distributed agent. Collective constructor.

    Every rank must construct it at the same point with the same model architecture (checked:
    a mismatch raises :class:`~hvdagents.ModelMismatchError` on every rank, before any
    collective on the parameters). Rank 0's parameters, buffers and optimizer state are then
    broadcast, so every rank starts from the same point whatever its seed.

    The user's loop stays theirs; ``agent.step()`` replaces ``optimizer.step()``::

        optimizer.zero_grad(); loss_fn(model(x), y).backward(); agent.step()

    With :class:`~hvdagents.Sync`, gradients are averaged over all ranks before the update
    (``backward_passes_per_step=k``: call ``step()`` after every k backward passes; the k
    gradients are summed locally, scale the loss by 1/k for a mean). Other strategies run
    after the local update (see :mod:`hvdagents.strategies`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        strategy: Strategy | None = None,
    ) -> None:
        super().__init__(strategy, "torch")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer
        self._named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._params = [p for _, p in self._named]
        dtypes = {p.dtype for p in self._params}
        if len(dtypes) != 1:
            raise ValueError(f"TorchAgent needs all trainable parameters in one dtype; got {sorted(map(str, dtypes))}")
        self._dtype = np.dtype(str(next(iter(dtypes))).replace("torch.", ""))
        check_same_model(self._allgather_object(self._signature(), name="hvdagents.signature"))
        self._broadcast_state()
        self._hvd_optimizer = None
        if isinstance(self.strategy, Sync):
            compressions = {None: self._hvd.Compression.none, "fp16": self._hvd.Compression.fp16}
            compression = compressions[self.strategy.compression]
            self._hvd_optimizer = self._hvd.DistributedOptimizer(
                optimizer,
                named_parameters=self._named,
                compression=compression,
                backward_passes_per_step=self.strategy.backward_passes_per_step,
            )
        self._start_strategy()

    # -- the user's loop -------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Replace ``optimizer.step()``. With ``Sync``: waits for the gradient all-reduce
        (collective: every rank must call it the same number of times), then steps the user's
        optimizer. Other strategies: a local step, then the strategy's exchange (one-sided
        for the asynchronous ones: no other rank needs to take part)."""
        self._check_open()
        if self._hvd_optimizer is not None:
            try:
                self._hvd_optimizer.synchronize()
            except AttributeError as err:  # Horovod writes the averages into p.grad, now None
                raise UsageError(
                    "optimizer.zero_grad() was called after loss.backward() but before agent.step(): "
                    "the gradients being averaged were dropped. Call zero_grad() before backward(), "
                    "or after agent.step()."
                ) from err
        result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self._after_local_step()
        return result

    # -- ParameterAccess ------------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self._params)

    def get_flat(self) -> np.ndarray:
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in self._params])
        return flat.cpu().numpy().copy()

    def set_flat(self, values: np.ndarray) -> None:
        values = np.asarray(values)
        if values.shape != (self.num_parameters,):
            raise ValueError(f"expected {self.num_parameters} values; got shape {values.shape}")
        source = torch.from_numpy(np.ascontiguousarray(values, dtype=self._dtype))
        offset = 0
        with torch.no_grad():
            for p in self._params:
                n = p.numel()
                p.copy_(source[offset:offset + n].view_as(p))
                offset += n

    def average_parameters(self) -> None:
        """Collective: grouped all-reduce (average) of all parameters, on their device."""
        with torch.no_grad():
            self._hvd.grouped_allreduce_([p.data for p in self._params], op=self._hvd.Average, name="hvdagents.params")

    # -- state: broadcast, checkpoint, resume -------------------------------------------------
    def _signature(self) -> list[ParameterSignature]:
        return [(n, tuple(p.shape), str(p.dtype).replace("torch.", "")) for n, p in self._named]

    def _broadcast_state(self) -> None:
        """Collective: rank 0's parameters, buffers and optimizer state to every rank."""
        if self._hvd is not None:  # in place, tensor by tensor, on the device
            self._hvd.broadcast_parameters(self.model.state_dict(), root_rank=ROOT_RANK)
        else:
            model_state = self.model.state_dict() if self.context.is_root else None
            self.model.load_state_dict(self._broadcast_object(model_state, name="hvdagents.model"))
        state = self.optimizer.state_dict() if self.context.is_root else None
        self.optimizer.load_state_dict(self._broadcast_object(state, name="hvdagents.optimizer"))

    def _framework_state(self) -> Any:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def _restore_framework_state(self, state: Any) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def _write_payload(self, payload: dict, handle: IO[bytes]) -> None:
        torch.save(payload, handle)

    def _read_payload(self, handle: IO[bytes]) -> dict:
        return torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=False)
