"""Run by tests/test_distributed.py, once alone and once under torchrun: train small models, save them.

Every process saves its own models (OUT/rank{R}.pt) so the test can also check that ranks agree.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from compress import distributed
from compress.passes.distill_dot import DistillDotConfig, distill
from compress.train import fit


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.Tanh(), nn.Linear(16, 5))


def with_batchnorm(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))


def main(out: Path) -> None:
    distributed.init_from_env("cpu")
    generator = torch.Generator().manual_seed(0)
    # 75 samples in batches of 32: 32, 32, 11; the last splits 6 + 5, so uneven shares are covered
    dataset = TensorDataset(torch.randn(75, 1, 6, 6, generator=generator), torch.randint(0, 5, (75,), generator=generator))
    teacher = mlp(1).eval().requires_grad_(False)
    keep = torch.rand(16, 36, generator=generator) > 0.5
    models = {}
    for trainer in ("dot", "kd"):
        student = mlp(2)
        with torch.no_grad():
            student[1].weight.mul_(keep)
        cfg = DistillDotConfig(epochs=2, lr=0.1, trainer=trainer, shift=1)  # 2 epochs x 3 steps
        distill(student, teacher, dataset, cfg, batch_size=32, seed=3, masks={"1.weight": keep})
        models[trainer] = student
    models["fit"] = mlp(4)
    fit(models["fit"], dataset, epochs=2, lr=0.1, batch_size=32, shift=1, seed=3)
    # BatchNorm: per-rank batch statistics, so no equality with one process; ranks must still agree
    models["bn"] = with_batchnorm(5)
    distill(models["bn"], None, dataset, DistillDotConfig(epochs=2, trainer="ce"), batch_size=32, seed=3)
    state = {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    record = {"world_size": distributed.world_size(), "models": state, "keep": keep}
    torch.save(record, out / f"rank{distributed.rank()}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
