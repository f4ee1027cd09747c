"""Host staging of CUDA parameters for the asynchronous strategies: one page-locked buffer.

The asynchronous strategies exchange a flat host copy of the parameters (MPI windows live in
host memory). From pageable memory, each device-to-host or host-to-device copy goes through
the CUDA driver's own bounce buffer and blocks; from page-locked (pinned) memory it is a DMA
transfer that can be queued for every tensor at once (``non_blocking=True``) and waited for
once per device. The buffer is allocated on first use and reused while the size holds.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["PinnedStaging", "needs_staging"]


def needs_staging(params: Sequence[torch.Tensor]) -> bool:
    """Whether any of ``params`` lives on a CUDA device (local; no communication)."""
    return any(p.is_cuda for p in params)


def _wait(params: Sequence[torch.Tensor]) -> None:
    for device in {p.device for p in params if p.is_cuda}:
        torch.cuda.synchronize(device)


class PinnedStaging:
    """A reusable pinned host vector of ``dtype`` through which ``params`` travel."""

    def __init__(self, dtype: torch.dtype) -> None:
        self._dtype = dtype
        self._host: torch.Tensor | None = None

    def _buffer(self, n: int) -> torch.Tensor:
        if self._host is None or self._host.numel() != n:
            self._host = torch.empty(n, dtype=self._dtype, pin_memory=True)
        return self._host

    def gather(self, params: Sequence[torch.Tensor]) -> np.ndarray:
        """A fresh host array holding every parameter, flattened in order, in ``dtype``:
        all copies queued into the pinned buffer, one wait per device, then one host copy
        (callers may keep and change the array)."""
        host = self._buffer(sum(p.numel() for p in params))
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                host[offset:offset + n].copy_(p.detach().reshape(-1), non_blocking=True)
                offset += n
        _wait(params)
        return host.numpy().copy()

    def scatter(self, values: np.ndarray, params: Sequence[torch.Tensor],
                write: Sequence[bool] | None = None) -> None:
        """Write ``values`` (flat, in order) into ``params`` through the pinned buffer (only
        those whose ``write`` flag is true, when given); returns once every copy has landed
        (the buffer is reused by the next call)."""
        host = self._buffer(values.size)
        host.numpy()[:] = values
        offset = 0
        with torch.no_grad():
            for i, p in enumerate(params):
                n = p.numel()
                if write is None or write[i]:
                    p.copy_(host[offset:offset + n].view_as(p), non_blocking=True)  # casts to p's dtype
                offset += n
        _wait(params)
