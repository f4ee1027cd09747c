"""GPU pinning: one GPU per process, chosen by local rank, before any framework touches CUDA.

``hva.init()`` pins: when this process sees several GPUs it narrows ``CUDA_VISIBLE_DEVICES``
to the one of its local rank, so PyTorch and TensorFlow, whenever they start CUDA later, see
that GPU alone (as device 0). A framework that already started CUDA in this process can no
longer be pinned; that is an error that names the fix (call ``hva.init()`` first), never a
warning: ranks landing on GPU 0 together train slowly or run out of memory.

The choices are pure functions (:func:`gpu_for_local_rank`, :func:`pinned_visible_devices`,
:func:`check_pin_possible`), tested without a GPU; :func:`pin_process` applies them.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from typing import Mapping, MutableMapping

from .errors import UsageError

__all__ = [
    "gpu_for_local_rank",
    "pinned_visible_devices",
    "check_pin_possible",
    "count_gpus",
    "pin_process",
    "pin_torch_gpu",
    "pin_tensorflow_gpu",
]


def gpu_for_local_rank(local_rank: int, local_size: int, visible: int) -> int | None:
    """Index (among the visible devices) of the GPU this process should use.

    - no visible GPU -> ``None`` (run on the CPU);
    - one visible GPU -> ``0``: the launcher bound one GPU to this task
      (``--gpus-per-task=1``, ``CUDA_VISIBLE_DEVICES`` set per rank), use it;
    - several -> ``local_rank``, wrapping with a warning when there are more ranks on the
      node than GPUs (ranks then share devices).
    """
    if visible <= 0:
        return None
    if visible == 1:
        return 0
    if local_rank >= visible:
        warnings.warn(
            f"{local_size} ranks on this node but only {visible} visible GPUs: "
            f"local rank {local_rank} shares GPU {local_rank % visible}",
            RuntimeWarning,
            stacklevel=2,
        )
    return local_rank % visible


def pinned_visible_devices(local_rank: int, local_size: int, env: Mapping[str, str],
                           gpus_on_node: int) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` value that leaves this process its own GPU, or ``None``
    when nothing needs to change (no GPU, or one visible already). Pure.

    The visible devices are ``env["CUDA_VISIBLE_DEVICES"]`` when set (ids or UUIDs), else
    ``0 .. gpus_on_node - 1``."""
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        devices = [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    else:
        devices = [str(i) for i in range(gpus_on_node)]
    index = gpu_for_local_rank(local_rank, local_size, len(devices))
    if index is None or len(devices) == 1:
        return None
    return devices[index]


def check_pin_possible(torch_cuda_started: bool) -> None:
    """Raise :class:`UsageError` when PyTorch already started CUDA in this process, so
    narrowing the visible GPUs can no longer take effect. Pure. (TensorFlow is checked by
    :func:`pin_tensorflow_gpu`, which can still pin it until it initialises its devices.)"""
    if torch_cuda_started:
        raise UsageError(
            "PyTorch started CUDA before hva.init(), so this rank can no longer be pinned to the "
            "GPU of its local rank (every rank would use GPU 0). Call hva.init() first, before "
            "model.cuda() or any torch.cuda call; or bind one GPU per task in the launcher "
            "(srun --gpus-per-task=1)."
        )


def count_gpus() -> int:
    """GPUs on this node, from NVIDIA's management library (no framework, no CUDA context);
    0 when the library is absent."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return 0
    count = ctypes.c_uint(0)
    if nvml.nvmlInit_v2() != 0:
        return 0
    try:
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return 0
    finally:
        nvml.nvmlShutdown()
    return int(count.value)


def _torch_cuda_started() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def pin_process(local_rank: int, local_size: int, env: MutableMapping[str, str] | None = None) -> str | None:
    """Narrow ``CUDA_VISIBLE_DEVICES`` to this local rank's GPU (see the module). Local.

    Returns the device now visible, or ``None`` when nothing changed."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        gpus = 0
    else:
        gpus = count_gpus()
    device = pinned_visible_devices(local_rank, local_size, env, gpus)
    if device is None:
        return None
    check_pin_possible(_torch_cuda_started())
    env["CUDA_VISIBLE_DEVICES"] = device
    if "tensorflow" in sys.modules:  # imported already: it may have read the old value
        pin_tensorflow_gpu(local_rank, local_size)
    return device


def pin_torch_gpu(local_rank: int, local_size: int) -> int | None:
    """Make this process's default CUDA device the one for ``local_rank``; return its index."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = gpu_for_local_rank(local_rank, local_size, torch.cuda.device_count())
    if index is not None:
        torch.cuda.set_device(index)
    return index


def pin_tensorflow_gpu(local_rank: int, local_size: int) -> int | None:
    """Restrict TensorFlow to the GPU for ``local_rank`` (with memory growth); return its index.

    After :func:`pin_process` TensorFlow sees one GPU and this only turns memory growth on.
    A pin that can no longer take effect raises :class:`UsageError` with the fix."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    index = gpu_for_local_rank(local_rank, local_size, len(gpus))
    if index is None:
        return None
    try:
        tf.config.set_visible_devices(gpus[index], "GPU")
        tf.config.experimental.set_memory_growth(gpus[index], True)
    except RuntimeError as err:  # TF already initialised its devices
        if len(gpus) > 1:
            raise UsageError(
                f"TensorFlow initialised its GPUs before this rank could be pinned to GPU {index} "
                "(every rank would use GPU 0): call hva.init() before building a model."
            ) from err
    return index
