"""GPU pinning: one GPU per process, chosen by local rank.

The choice is pure arithmetic (:func:`gpu_for_local_rank`), tested without a GPU; the
framework calls that apply it live in :func:`pin_torch_gpu` and :func:`pin_tensorflow_gpu`.
"""

from __future__ import annotations

import warnings

__all__ = ["gpu_for_local_rank", "pin_torch_gpu", "pin_tensorflow_gpu"]


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

    Must run before TensorFlow initialises its GPUs; a later call leaves TF as it is and warns.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    index = gpu_for_local_rank(local_rank, local_size, len(gpus))
    if index is None:
        return None
    try:
        tf.config.set_visible_devices(gpus[index], "GPU")
        tf.config.experimental.set_memory_growth(gpus[index], True)
    except RuntimeError as err:  # TF already initialised its devices
        warnings.warn(f"could not pin TensorFlow to GPU {index}: {err}", RuntimeWarning, stacklevel=2)
    return index
