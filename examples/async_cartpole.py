"""Actor-learner agents on CartPole sharing one policy through the parameter store (A3C-style).

    mpirun -np 4 --oversubscribe python examples/async_cartpole.py --episodes 200

Every rank runs its own gymnasium CartPole (pure Python, nothing downloaded), learns from its
own episodes with REINFORCE (discounted, normalised returns), and shares its policy network
one-sidedly through MPI windows (Downpour by default: each update is pushed into the sharded
store and the centre pulled back). Rank 0 prints the moving-average return as it rises, and
the greedy return of the consensus policy after ``agent.close()``.
"""

from __future__ import annotations

import argparse
from collections import deque

import gymnasium as gym
import numpy as np
import torch

import hvdagents as hva

#: Episodes in the moving average that rank 0 reports.
WINDOW = 20
GAMMA = 0.99
EVAL_EPISODES = 5


def discounted_returns(rewards: list[float], gamma: float = GAMMA) -> torch.Tensor:
    out, running = [], 0.0
    for r in reversed(rewards):
        running = r + gamma * running
        out.append(running)
    returns = torch.tensor(out[::-1], dtype=torch.float32)
    return (returns - returns.mean()) / (returns.std() + 1e-8)


def run_episode(env: gym.Env, policy: torch.nn.Module, seed: int, greedy: bool = False):
    obs, _ = env.reset(seed=seed)
    log_probs, rewards, done = [], [], False
    while not done:
        logits = policy(torch.as_tensor(obs, dtype=torch.float32))
        dist = torch.distributions.Categorical(logits=logits)
        action = logits.argmax() if greedy else dist.sample()
        log_probs.append(dist.log_prob(action))
        obs, reward, terminated, truncated, _ = env.step(int(action))
        rewards.append(float(reward))
        done = terminated or truncated
    return log_probs, rewards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=200, help="per rank")
    p.add_argument("--strategy", choices=["downpour", "easgd", "gossip"], default="downpour")
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ctx = hva.init()
    torch.manual_seed(args.seed + ctx.rank)
    strategy = {"downpour": hva.Downpour(period=1), "easgd": hva.EASGD(alpha=0.5, period=1),
                "gossip": hva.Gossip(period=1)}[args.strategy]
    policy = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2))
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    agent = hva.TorchAgent(policy, optimizer, strategy=strategy)
    env = gym.make("CartPole-v1")
    recent: deque[float] = deque(maxlen=WINDOW)
    first_average = None
    for episode in range(args.episodes):
        log_probs, rewards = run_episode(env, policy, seed=args.seed * 100_000 + ctx.rank * 10_000 + episode)
        loss = -(torch.stack(log_probs) * discounted_returns(rewards)).sum()
        optimizer.zero_grad()
        loss.backward()
        agent.step()  # local Adam step, then the one-sided exchange
        recent.append(sum(rewards))
        if len(recent) == WINDOW and first_average is None:
            first_average = float(np.mean(recent))
        if ctx.is_root and (episode + 1) % WINDOW == 0:
            print(f"episode {episode + 1:4d}  moving-average return {np.mean(recent):6.1f}", flush=True)
    averages = ctx.comm.gather((first_average, float(np.mean(recent))), root=0)
    agent.close()  # every rank now holds the consensus policy
    with torch.no_grad():
        greedy = [sum(run_episode(env, policy, seed=10**6 + i, greedy=True)[1]) for i in range(EVAL_EPISODES)]
    if ctx.is_root:
        first = np.mean([a[0] for a in averages])
        last = np.mean([a[1] for a in averages])
        print(f"moving-average return over ranks: first {first:.1f} -> last {last:.1f}")
        print(f"consensus policy greedy return: {np.mean(greedy):.1f}")


if __name__ == "__main__":
    main()
