"""Small models and training steps shared by the consistency and fence tests."""

from __future__ import annotations

import torch
from torch import nn


def seed_mlp() -> nn.Sequential:
    """The seed's training example: Linear(100,50) ReLU Linear(50,20) ReLU Linear(20,5) ReLU."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 20), nn.ReLU(), nn.Linear(20, 5), nn.ReLU()
    )


def bn_mlp() -> nn.Sequential:
    """A model whose forward mutates buffers (BatchNorm running statistics)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(100, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 5))


def batch(step: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(size, 100, generator=gen), torch.randint(0, 5, (size,), generator=gen)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    """forward, CrossEntropyLoss, backward, optimizer step."""
    x, y = batch(step)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
