"""PyTorch adapter: ``hva.TorchAgent``.

Sync training averages gradients with :class:`~.torch_grads.GradientAllreducer`: a hook on
each trainable parameter starts its Horovod all-reduce as soon as backward produces the
gradient (overlapping communication with the rest of backward, with Horovod's tensor
fusion), and the mean is in ``.grad`` when ``backward()`` returns, as with DDP. The set of
trainable parameters is read again at every averaging, so frozen, unfrozen and added
parameters are all handled. The user's optimizer is used as it is, stepped by anyone: the
strategies act in the optimizer's step hooks.

Parameters may be of any floating dtype, mixed (bfloat16 included). The asynchronous
strategies exchange a host copy in float64 when any parameter is float64, else float32.
"""

from __future__ import annotations

import io
import pickle
import re
import weakref
from contextlib import contextmanager, nullcontext
from typing import IO, Any, Callable, ContextManager, Iterator

import numpy as np
import torch
from torch.utils.serialization import config as serialization_config

from ..agent import ROOT_RANK, Agent, ParameterSignature, check_same_model
from ..checkpoint import CheckpointError, check_archive, check_header, framework_of, header, wrong_framework
from ..collectives import Problem, bcast_array, bcast_tree
from ..errors import ModelMismatchError, UsageError
from ..strategies.config import Strategy, Sync, ZeRO
from ..strategies.sharded import checkpoint_strategy
from .torch_grads import GradientAllreducer, names_checksum, wire_tensor
from .torch_sharded import ShardedOptimizer
from .torch_staging import PinnedStaging, needs_staging

__all__ = ["TorchAgent"]

#: Optimizers that belong to an open agent (one agent per optimizer at a time).
_OPEN_AGENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def host_dtype(dtypes: Any) -> np.dtype:
    """The NumPy dtype that holds every one of the torch ``dtypes`` exactly: float64 when
    one is float64, else float32 (bfloat16 and float16 widen exactly to float32)."""
    dtypes = set(dtypes)
    for dtype in dtypes:
        if not dtype.is_floating_point:
            raise ValueError(f"TorchAgent trains floating-point parameters; got a {dtype} parameter")
    return np.dtype(np.float64 if torch.float64 in dtypes else np.float32)


def _bytes_view(tensor: torch.Tensor) -> np.ndarray:
    """The memory of a contiguous host tensor as a flat uint8 NumPy array (shared, any dtype)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def host_array(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy copy of ``tensor`` on the host; floating dtypes NumPy lacks (bfloat16) widen to
    float32, which holds them exactly."""
    t = tensor.detach().to("cpu")
    if t.dtype == torch.bfloat16:
        t = t.to(torch.float32)
    return t.numpy().copy()


def _argument_problem(model: Any, optimizer: Any) -> Problem:
    """What is wrong with TorchAgent's arguments on this rank (``None``: nothing). Local."""
    if not isinstance(model, torch.nn.Module):
        return TypeError, f"model must be a torch.nn.Module; got {type(model).__name__}"
    if not isinstance(optimizer, torch.optim.Optimizer):
        return TypeError, f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}"
    if optimizer in _OPEN_AGENTS:
        return UsageError, ("this optimizer already belongs to an open TorchAgent: close() that agent first, "
                            "or give each agent its own optimizer")
    return None


class TorchAgent(Agent):
    """Make ``model`` + ``optimizer`` a distributed agent. Collective constructor.

    Every rank must construct it at the same point with the same model architecture (checked:
    a mismatch raises :class:`~hvdagents.ModelMismatchError` on every rank, before any
    collective on the parameters). Rank 0's parameters, buffers and optimizer state are then
    broadcast, so every rank starts from the same point whatever its seed.

    The user's loop stays theirs, written as for one process::

        optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()

    With :class:`~hvdagents.Sync` the contract is DDP's: when ``backward()`` returns, every
    trainable ``.grad`` holds the mean over the ranks, identical everywhere, so clipping,
    ``GradScaler.unscale_`` or logging between backward and the step see the mean; whoever
    steps the optimizer (``optimizer.step()``, ``scaler.step(optimizer)``, a framework's loop,
    :meth:`step`) steps on averaged gradients, and a step that cannot be honoured (no
    backward since the last step) raises :class:`~hvdagents.UsageError` at that step.
    Accumulation: ``with agent.no_sync():`` for the micro-batches that only accumulate, or
    ``Sync(backward_passes_per_step=k)`` (see :mod:`.torch_grads`). Other strategies run
    after every local step of the optimizer, whoever calls it.

    Which parameters: ``Sync`` and ``LocalSGD`` average those in the optimizer's param
    groups with ``requires_grad``, read again at every averaging (freeze, unfreeze and
    ``add_param_group`` at will, the same way on every rank). The asynchronous strategies
    share every floating-point parameter of the model and write back only those that
    require a gradient, so frozen parameters stay as they are and unfrozen ones join.
    A parameter no rank produced a gradient for keeps ``grad=None``.

    Uneven data: a rank that runs out of batches calls :meth:`close` (or leaves a
    ``with agent:`` block); with ``Sync`` it then takes part in the other ranks' remaining
    all-reduces without contributing, and each of those steps averages over the ranks still
    training. ``close`` returns on every rank once all have closed, and removes every hook
    the agent added to the model and the optimizer.

    :class:`~hvdagents.ZeRO` (sharded ``Sync``, see :mod:`.torch_sharded`): the optimizer's
    state lives in ranges, 1/N per rank, in an optimizer of the user's class that the
    agent steps inside every step of the user's (which keeps no state itself). Stage 1
    keeps ``Sync``'s contract above; stage 2 leaves ``.grad`` ``None`` after backward (the
    mean of this rank's range is kept apart): clip with :meth:`clip_grad_norm_`. Uneven
    data as under ``Sync``: a rank that closes early serves the others' remaining steps
    (zero gradients, its own range stepped), and :meth:`save_checkpoint` is collective.
    """

    #: The ZeRO optimizer's ranges and hooks (made by ZeRO's runner at start).
    _sharded: ShardedOptimizer | None = None
    #: True while close() adopts the longest rank's state under ZeRO (the ranges stay as served).
    _keep_ranges = False

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        strategy: Strategy | None = None,
    ) -> None:
        super().__init__(strategy, "torch", _argument_problem(model, optimizer))  # raised on every rank
        self.model = model
        self.optimizer = optimizer
        self._params = [p for p in model.parameters() if p.is_floating_point()]
        self._dtype = host_dtype(p.dtype for p in self._params)
        self._staging: PinnedStaging | None = None  # made when parameters are on a GPU
        if not self._elastic:  # elastic: at the state's sync, where a joining worker meets the others
            check_same_model(self._allgather_object(self._signature(), name="hvdagents.signature"))
            self._broadcast_state()
        self._gradients: GradientAllreducer | None = None  # made by Sync's runner at start
        # The strategy acts after every local step, whoever steps the optimizer.
        self._step_hook = optimizer.register_step_post_hook(lambda *_: self._after_local_step())
        _OPEN_AGENTS[optimizer] = True
        try:
            self._start_strategy()
        except BaseException:
            if self._gradients is not None:  # the strategy's reducer, if it was made
                self._gradients.close()
            self._remove_hooks()
            raise

    # -- the user's loop -------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """``optimizer.step(closure)``, kept for loops written against earlier versions: the
        agent's work happens in hooks, so calling the optimizer's own ``step`` is the same.
        With ``Sync`` the step is collective in effect (the backward passes before it
        averaged); with the asynchronous strategies the exchange after it is one-sided."""
        self._check_open()
        return self.optimizer.step(closure) if closure is not None else self.optimizer.step()

    def no_sync(self) -> ContextManager[None]:
        """DDP's gradient accumulation: backward passes inside only accumulate locally; the
        first backward after the block averages everything accumulated (``Sync``). Other
        strategies average parameters, not gradients: there it changes nothing. Local."""
        self._check_open()
        if self._sharded is not None and self._gradients is None:  # ZeRO stage 2
            return self._sharded.no_sync()
        return self._gradients.no_sync() if self._gradients is not None else nullcontext()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` of the mean gradient of the optimizer's
        parameters, between ``backward()`` and the step; returns the total norm. Under
        ``ZeRO(stage=2)``, where no rank holds the whole gradient, collective: one all-reduce
        of one number (every rank must call it). Otherwise local, on ``.grad``."""
        self._check_open()
        if self._sharded is not None:
            return self._sharded.clip_grad_norm_(max_norm, norm_type)
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)

    def optimizer_state_bytes(self) -> int:
        """Bytes of the optimizer state's tensors this rank holds (under ``ZeRO``, its ranges').
        Local."""
        held = self.optimizer.state.values()
        total = sum(t.numel() * t.element_size() for st in held for t in st.values() if torch.is_tensor(t))
        return total + (self._sharded.state_bytes() if self._sharded is not None else 0)

    # -- ParameterAccess ------------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self._params)

    def _staged(self) -> PinnedStaging | None:
        """The pinned staging buffer when any parameter is on a CUDA device, else ``None``."""
        if not needs_staging(self._params):
            return None
        if self._staging is None:
            self._staging = PinnedStaging(getattr(torch, self._dtype.name))
        return self._staging

    def get_flat(self) -> np.ndarray:
        """A host copy of every floating-point parameter of the model, in :attr:`dtype`
        (bfloat16 and float16 widened exactly); CUDA parameters travel through a pinned
        staging buffer."""
        if not self._params:
            return np.zeros(0, self._dtype)
        staging = self._staged()
        if staging is not None:
            return staging.gather(self._params)
        wide = getattr(torch, self._dtype.name)
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).to(device="cpu", dtype=wide) for p in self._params])
        return flat.numpy()  # cat made new memory: no second copy

    def parameter_sizes(self) -> list[tuple[str, int]]:
        return [(name, p.numel()) for name, p in self.model.named_parameters() if p.is_floating_point()]

    def set_flat(self, values: np.ndarray) -> None:
        """Write ``values`` (in :meth:`get_flat` order) into the parameters that require a
        gradient now; frozen parameters keep their values exactly."""
        values = np.asarray(values)
        if values.shape != (self.num_parameters,):
            raise ValueError(f"expected {self.num_parameters} values; got shape {values.shape}")
        write = [p.requires_grad for p in self._params]
        staging = self._staged()
        if staging is not None:
            staging.scatter(values, self._params, write)  # cast into the buffer's dtype there
            return
        source = torch.from_numpy(np.ascontiguousarray(values, dtype=self._dtype))
        offset = 0
        with torch.no_grad():
            for p, wanted in zip(self._params, write):
                n = p.numel()
                if wanted:
                    p.copy_(source[offset:offset + n].view_as(p))  # copy_ casts and moves to p's device
                offset += n

    def _trainable(self) -> list[torch.Tensor]:
        """The parameters in the optimizer's param groups that require a gradient now, in the
        model's order (read again at every averaging)."""
        grouped = {id(p) for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad}
        return [p for p in self._params if id(p) in grouped]

    def average_parameters(self) -> None:
        """Collective over the ranks still training: every trainable parameter (read again
        now) becomes its mean over them (grouped all-reduce per dtype, on the parameters'
        device). Ranks that left through :meth:`close` are not counted (they contribute
        zeros, see ``close``). Ranks that train different parameter sets get a
        :class:`~hvdagents.ModelMismatchError`, before the parameters are reduced."""
        trainable = self._trainable()
        wanted = {id(t) for t in trainable}
        names = [name for name, p in self.model.named_parameters() if id(p) in wanted]
        checksum = float(names_checksum(names))
        totals = self._hvd.allreduce(torch.tensor([1.0, checksum, checksum * checksum], dtype=torch.float64),
                                     op=self._hvd.Sum, name="hvdagents.active")
        active = totals[0].item()
        if totals[1].item() != active * checksum or totals[2].item() != active * checksum * checksum:
            raise ModelMismatchError(
                f"the ranks average different sets of parameters (this rank trains {len(names)}). Every "
                "rank must freeze and unfreeze the same parameters (requires_grad) and add the same "
                "param groups to its optimizer, at the same step."
            )
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in trainable:
            by_dtype.setdefault(p.dtype, []).append(p.data)
        with torch.no_grad():
            for dtype, tensors in sorted(by_dtype.items(), key=lambda item: str(item[0])):
                wire = [wire_tensor(t) for t in tensors]
                self._hvd.grouped_allreduce_(wire, op=self._hvd.Sum, name=f"hvdagents.params.{dtype}")
                for t, reduced in zip(tensors, wire):
                    reduced.div_(active)
                    if reduced.data_ptr() != t.data_ptr():
                        t.copy_(reduced)

    def trainable_mask(self) -> np.ndarray:
        """DiLoCo: True for the elements (in :meth:`get_flat` order) of the parameters trained
        now, as :meth:`average_parameters` reads them. Local."""
        wanted = {id(t) for t in self._trainable()}
        return np.concatenate([np.full(p.numel(), id(p) in wanted) for p in self._params] or [np.zeros(0, bool)])

    def start_sum(self, values: np.ndarray, wire: str, name: str) -> Callable[[], np.ndarray]:
        """DiLoCo: collective, non-blocking. Starts Horovod's all-reduce (sum) of the host
        vector ``values`` as a CPU tensor of dtype ``wire`` (every rank the same length and
        ``name``, in the same order); returns the function that waits for it (Horovod's
        ``synchronize``) and returns the sum in float64. Ranks that left through
        :meth:`close` contribute zeros."""
        tensor = torch.from_numpy(np.array(values, dtype=np.dtype(wire)))  # a copy Horovod may keep
        handle = self._hvd.allreduce_async(tensor, op=self._hvd.Sum, name=name)
        return lambda: self._hvd.synchronize(handle).numpy().astype(np.float64)

    def average_gradients(self, strategy: Sync) -> GradientAllreducer:
        """Hooks that leave the mean gradient in ``.grad`` when every backward pass ends and
        check every optimizer step (see :mod:`.torch_grads`); closed by the runner."""
        self._gradients = GradientAllreducer(
            self._hvd, self.model, self.optimizer,
            compression=strategy.compression, backward_passes_per_step=strategy.backward_passes_per_step,
            nonfinite=strategy.nonfinite, step_number=lambda: self._runner.state.step + 1,
        )
        return self._gradients

    def shard_optimizer(self, strategy: ZeRO) -> ShardedOptimizer:
        """Collective from then on: ZeRO's ranges of the optimizer and the hooks that reduce,
        step and gather (see :mod:`.torch_sharded`); stage 1 averages the gradients as ``Sync``
        does first. Refuses, on every rank alike, an optimizer that cannot be cut into ranges.
        Closed by the runner."""
        if strategy.stage == 1:
            self.average_gradients(Sync())
        comm = self.context.comm if self.context.mpi_world else None
        self._sharded = ShardedOptimizer(self._hvd, self.model, self.optimizer, stage=strategy.stage, comm=comm,
                                         gradients=self._gradients)
        return self._sharded

    def _wait_for_every_rank_to_close(self) -> None:
        """Collective over all ranks (see :meth:`Agent.close`): under ``Sync`` and
        ``LocalSGD``, wait in Horovod's join until every rank has closed; under ZeRO, serve
        the others' steps until then (:meth:`.ShardedOptimizer.serve`: this rank's range is
        stepped to the end)."""
        if self._sharded is not None and isinstance(self.strategy, ZeRO):
            self._sharded.serve()
            return
        if self._hvd is not None and self.context.size > 1:
            device = next((p.device.index for p in self._params if p.is_cuda), -1)
            self._hvd.join(device)

    def _adopt_state_of_rank_with_most_steps(self) -> None:
        """See :meth:`Agent._adopt_state_of_rank_with_most_steps`. Under ZeRO the ranks that
        closed early served the others' steps, so the parameters and every range of the
        optimizer state are already where the longest rank's steps left them: its buffers and
        step count are taken, the ranges stay."""
        self._keep_ranges = self._sharded is not None
        try:
            super()._adopt_state_of_rank_with_most_steps()
        finally:
            self._keep_ranges = False

    def close(self) -> None:
        """Collective: see :meth:`Agent.close`; then every hook this agent added to the model
        and the optimizer is removed (a later agent on the same model starts clean)."""
        if self._closed:
            return
        super().close()
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        self._step_hook.remove()  # the gradient hooks went with the runner's finish
        _OPEN_AGENTS.pop(self.optimizer, None)

    # -- state beside the trainable parameters (buffers, frozen parameters) -------------------------
    def _state_tensors(self) -> list[torch.Tensor]:
        """Parameters the strategy does not share, then buffers. ``Sync``/``LocalSGD``: the
        parameters outside the trainable set now; asynchronous strategies share every
        floating-point parameter."""
        shared = {id(p) for p in (self._trainable() if self._hvd is not None else self._params)}
        rest = [p for p in self.model.parameters() if id(p) not in shared]
        return rest + [b for _, b in self.model.named_buffers()]

    def _state_arrays(self) -> list[np.ndarray]:
        return [host_array(t) for t in self._state_tensors()]

    def _set_state_arrays(self, arrays: list[np.ndarray]) -> None:
        with torch.no_grad():
            for t, value in zip(self._state_tensors(), arrays):
                t.copy_(torch.from_numpy(np.ascontiguousarray(value)).view_as(t))

    # -- state: broadcast, checkpoint, resume -------------------------------------------------
    def _signature(self) -> list[ParameterSignature]:
        named = [*self.model.named_parameters(), *self.model.named_buffers()]
        return [(n, tuple(t.shape), str(t.dtype).replace("torch.", "")) for n, t in named]

    def _broadcast_state(self, root: int = ROOT_RANK) -> None:
        """Collective: ``root``'s (by default rank 0's) parameters, buffers and optimizer state
        on every rank.

        Tensor by tensor, in place into the model's own tensors where they are on the host
        (no pickle, no size limit: a model of billions of parameters goes through); the
        optimizer state travels as a tree of tensors (see :mod:`hvdagents.collectives`)."""
        if not self.context.mpi_world:  # horovodrun --gloo: Horovod's own broadcasts
            self._hvd.broadcast_parameters(self.model.state_dict(), root_rank=root)
            if self._sharded is not None:
                if not self._keep_ranges:
                    self._sharded.load_state_dict(root)
                return
            state = self.optimizer.state_dict() if self.context.rank == root else None
            self.optimizer.load_state_dict(self._broadcast_object(state, name="hvdagents.optimizer", root=root))
            return
        if self.context.size == 1:
            if self._sharded is not None and not self._keep_ranges:
                self._sharded.load_state_dict(root)
            return
        comm = self.context.comm
        with torch.no_grad():
            for t in self.model.state_dict().values():
                if t.device.type == "cpu" and t.is_contiguous():
                    bcast_array(comm, _bytes_view(t), root=root)
                else:
                    host = t.detach().to("cpu").contiguous()
                    bcast_array(comm, _bytes_view(host), root=root)
                    t.copy_(host)
        if self._sharded is not None:  # ZeRO: the optimizer's state goes out in ranges instead
            if not self._keep_ranges:
                self._sharded.load_state_dict(root)
            return
        state = bcast_tree(
            comm, self.optimizer.state_dict() if self.context.rank == root else None,
            is_leaf=torch.is_tensor,
            to_array=lambda t: _bytes_view(t.detach().to("cpu").contiguous()),
            new_leaf=lambda shape, dtype: torch.empty(shape, dtype=getattr(torch, dtype)),
            leaf_dtype=lambda t: str(t.dtype).replace("torch.", ""),
            root=root,
        )
        if self.context.rank != root:
            self.optimizer.load_state_dict(state)

    def _gather_framework_state(self) -> Any:
        if self._sharded is None:
            return super()._gather_framework_state()
        optimizer = self._sharded.state_dict(ROOT_RANK)  # collective: every rank sends its ranges
        return {"model": self.model.state_dict(), "optimizer": optimizer} if self.context.is_root else None

    def _framework_state(self) -> Any:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def _restore_framework_state(self, state: Any) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def _checkpoint_header(self) -> dict:
        groups = [len(group["params"]) for group in self.optimizer.param_groups]
        return header("torch", self._signature(), {"class": type(self.optimizer).__name__, "groups": groups},
                      checkpoint_strategy(self.strategy))

    def _write_payload(self, payload: dict, handle: IO[bytes]) -> None:
        """``torch.save`` of plain types and tensors only (the centre as a tensor), so that
        :meth:`_read_payload` loads it with ``weights_only=True``; an ``extra`` value or
        optimizer state that would not load so is refused first, by name."""
        for key, value in payload["extra"].items():
            _check_weights_only(value, f"save_checkpoint: extra value {key!r}")
        payload = dict(payload)
        state = payload["framework_state"]
        _check_weights_only(state["optimizer"], f"save_checkpoint: the state of {type(self.optimizer).__name__}")
        if payload["strategy_shared"] is not None:
            payload["strategy_shared"] = torch.from_numpy(np.ascontiguousarray(payload["strategy_shared"]))
        with _crc32_on():
            torch.save(payload, handle)

    def _read_payload(self, path: str) -> dict:
        # Every member's CRC-32 first (torch.load checks none), then weights_only: plain types
        # and tensors only, nothing that can run code. Memory-mapped: the tensors are read from
        # the file as they are copied into the model, so resuming does not hold a second copy.
        with check_archive(path) as archive:
            found = framework_of(archive)
        if found != "torch":
            raise wrong_framework(path, found, "torch")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"{path!r} is not a safe checkpoint: unpickling it would call {_unsafe_global(err)}, which is "
                "neither a tensor nor a plain type and could run any code; it was not loaded (nothing in it ran)"
            ) from err
        check_header(path, payload, self._checkpoint_header())
        if payload.get("strategy_shared") is not None:
            payload["strategy_shared"] = payload["strategy_shared"].numpy()
        return payload


def _zeroed_tensors(value: Any) -> Any:
    """``value`` with every tensor replaced by an empty one of its dtype (a cheap stand-in for
    checking what pickling it needs)."""
    if torch.is_tensor(value):
        return torch.empty(0, dtype=value.dtype)
    if type(value) in (list, tuple):
        return type(value)(_zeroed_tensors(v) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _zeroed_tensors(v)) for k, v in value.items())
    return value


def _check_weights_only(value: Any, what: str) -> None:
    """Raise :class:`CheckpointError` unless ``value`` loads with ``torch.load(...,
    weights_only=True)`` (plain types, tensors, classes registered with
    ``torch.serialization.add_safe_globals``)."""
    buffer = io.BytesIO()
    try:
        torch.save(_zeroed_tensors(value), buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means: would not load safely
        reason = (f"it pickles as a call to {_unsafe_global(err)}" if isinstance(err, pickle.UnpicklingError)
                  else f"{type(err).__name__}: {err}")
        raise CheckpointError(
            f"{what} cannot be stored in a checkpoint that loads without running code ({reason}); store "
            "None, bool, int, float, str, lists, tuples, dicts and tensors, or register the class with "
            "torch.serialization.add_safe_globals. Nothing was written."
        ) from err


def _unsafe_global(err: Exception) -> str:
    """The global that ``torch.load(..., weights_only=True)`` refused, from its message."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    return found.group(1) if found else (str(err).splitlines() or ["an unsupported global"])[0]


@contextmanager
def _crc32_on() -> Iterator[None]:
    """``torch.save`` with a CRC-32 per member (PyTorch's default), which loading checks."""
    config = serialization_config.save
    before = config.compute_crc32
    config.compute_crc32 = True
    try:
        yield
    finally:
        config.compute_crc32 = before
