"""Models from a library the project does not write (Hugging Face transformers, small
configurations built here, nothing downloaded) under every strategy, mpirun -np 2: GPT-2 with
its tied embedding (lm_head shares the token embedding) and a BatchNorm ResNet. Rank 0 prints
one RESULT line per (model, strategy); Sync is also compared with one process on the full
batch (float64; GPT-2 without dropout, so the reference is deterministic)."""

import numpy as np
import torch
from _report import emit
from transformers import GPT2Config, GPT2LMHeadModel, ResNetConfig, ResNetForImageClassification
from transformers.utils import logging

import hvdagents as hva

logging.set_verbosity_error()
ctx = hva.init()
STEPS, BATCH = 4, 8
rng = np.random.default_rng(0)
TOKENS = torch.from_numpy(rng.integers(0, 64, size=(STEPS * BATCH, 12)))
IMAGES = torch.from_numpy(rng.normal(size=(STEPS * BATCH, 3, 16, 16)))
LABELS = torch.from_numpy(rng.integers(0, 3, size=(STEPS * BATCH,)))
STRATEGIES = {"sync": hva.Sync(), "localsgd": hva.LocalSGD(period=2), "downpour": hva.Downpour(period=2),
              "easgd": hva.EASGD(alpha=0.5, period=2), "gossip": hva.Gossip(period=1)}


def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).double()


def resnet():
    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    return ResNetForImageClassification(config).double()


def loss_of(name, model, index):
    if name == "gpt2":
        return model(input_ids=TOKENS[index], labels=TOKENS[index]).loss
    return model(pixel_values=IMAGES[index], labels=LABELS[index]).loss


def rows(step, rank=None):
    index = np.arange(step * BATCH, (step + 1) * BATCH)
    return index if rank is None else index[np.asarray(hva.shard(np.arange(BATCH), rank=rank, size=ctx.size))]


def state_bytes(model):
    return b"".join(t.detach().double().numpy().tobytes() for t in model.state_dict().values())


def train(name, make, strategy, distributed=True):
    model = make()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    agent = hva.TorchAgent(model, optimizer, strategy=strategy) if distributed else None
    model.train()
    for s in range(STEPS):
        optimizer.zero_grad()
        loss_of(name, model, rows(s, ctx.rank if distributed else None)).backward()
        optimizer.step()
    if agent is not None:
        agent.close()
    return model


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


for name, make in (("gpt2", gpt2), ("resnet", resnet)):
    initial = flat(make())
    for label, strategy in STRATEGIES.items():
        model = train(name, make, strategy)
        mine = state_bytes(model)
        result = {"model": name, "strategy": label,
                  "identical": all(g == mine for g in ctx.comm.allgather(mine)),
                  "moved": float(np.max(np.abs(flat(model) - initial)))}
        if name == "gpt2":
            head, embedding = model.lm_head.weight, model.transformer.wte.weight
            result["tied"] = head is embedding and head.data_ptr() == embedding.data_ptr()
        if name == "resnet":  # BatchNorm statistics moved and were made identical
            result["buffers"] = sum(1 for _ in model.buffers())
        if label == "sync" and name == "gpt2":
            reference = flat(train(name, make, strategy, distributed=False))
            result["max_rel"] = float(np.max(np.abs(flat(model) - reference)) / np.max(np.abs(reference)))
        if ctx.is_root:
            emit(result)
