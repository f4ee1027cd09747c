"""The compute layer: one adapter per framework (PyTorch, Keras 3 on TensorFlow).

Import the adapter you need (``hvdagents.frameworks.torch``, ``hvdagents.frameworks.keras``),
or use ``hva.TorchAgent`` / ``hva.KerasAgent``; nothing here imports a framework by itself.
"""

__all__: list[str] = []
