"""Rank 1 builds a wider hidden layer: the agent must refuse on every rank, naming it."""

import sys

import hvdagents as hva

ctx = hva.init()
framework = sys.argv[1]
width = 16 if ctx.rank == 0 else 24
try:
    if framework == "torch":
        import torch

        model = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))
        hva.TorchAgent(model, torch.optim.SGD(model.parameters(), lr=0.1), strategy=hva.Sync())
    else:
        import keras

        layers = [keras.Input((8,)), keras.layers.Dense(width, name="hidden"), keras.layers.Dense(2, name="out")]
        model = keras.Sequential(layers)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        hva.KerasAgent(model, strategy=hva.Sync())
except ValueError as err:
    print(f"rank {ctx.rank} refused: {err}", flush=True)
    raise
print(f"rank {ctx.rank} was not refused", flush=True)
