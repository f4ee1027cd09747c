"""A plain one-process script (no hvdagents, no MPI) resumes from the checkpoint 4 ranks wrote
under ZeRO: model and Adam loaded with PyTorch's own calls, 3 steps on the full batches,
compared with 2 ranks' straight run. ``torch_zero_plain.py DIR``; prints one RESULT line."""

import json
import os
import sys

import numpy as np
import torch

DIRECTORY = sys.argv[1]
BATCH = 16
rng = np.random.default_rng(0)
X = torch.from_numpy(rng.normal(size=(12 * BATCH, 5)))
Y = torch.from_numpy(rng.normal(size=(12 * BATCH, 3)))

model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
opt = torch.optim.Adam([{"params": model[0].parameters()},
                        {"params": model[2].parameters(), "lr": 0.03, "weight_decay": 0.02}], lr=0.02)
saved = torch.load(os.path.join(DIRECTORY, "four.pt"), weights_only=True)
model.load_state_dict(saved["framework_state"]["model"])
opt.load_state_dict(saved["framework_state"]["optimizer"])
flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()  # noqa: E731
loaded = flat()
for s in range(6, 9):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(X[s * BATCH:(s + 1) * BATCH]), Y[s * BATCH:(s + 1) * BATCH]).backward()
    opt.step()
print("RESULT " + json.dumps({
    "check": "plain", "hvdagents_imported": "hvdagents" in sys.modules, "epoch": saved["extra"]["epoch"],
    "loaded_bitwise": bool(np.array_equal(loaded, np.load(os.path.join(DIRECTORY, "four_params.npy")))),
    "steps": [int(st["step"]) for st in opt.state_dict()["state"].values()],
    "max_abs": float(np.abs(flat() - np.load(os.path.join(DIRECTORY, "expected9.npy"))).max()),
}))
