"""``hva.keras``: Keras 3 (TensorFlow backend) pieces for users who call ``model.fit``
themselves: :class:`DistributedOptimizer` and :mod:`.callbacks`."""

from . import callbacks
from .optimizer import DistributedOptimizer

__all__ = ["DistributedOptimizer", "callbacks"]
