"""The compute layer: one adapter per framework (PyTorch, Keras 3 on TensorFlow)."""
