"""DOT, the Distillation-Oriented Trainer (Zhao et al., ICCV 2023), as a torch optimizer.

SGD with momentum, but the task and distillation gradients keep separate momentum buffers:

    v_task <- (mu - delta) * v_task + (g_task + wd * theta)
    v_kd   <- (mu + delta) * v_kd   +  g_kd
    theta  <- theta - lr * (v_task + v_kd)

Distillation gets the larger momentum because its gradient is the steadier of the two; weight decay is a
regulariser of the task objective, so it rides on the task branch only. With delta = 0 this is exactly
SGD with momentum mu on the summed loss.

Unlike the reference (two .backward() calls with optimizer hooks in between), step() takes both gradient
sets as arguments: a training loop gets them from one forward with torch.autograd.grad and can reduce each
set across processes first (compress.distributed), which is what makes DOT work data-parallel.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

TASK, KD = "task_buffer", "kd_buffer"


class DOT(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        delta: float = 0.075,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr: expected >= 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {weight_decay}")
        if not 0 <= momentum - delta <= momentum + delta < 1:
            raise ValueError(
                f"momentum +- delta must lie in [0, 1), got momentum {momentum}, delta {delta}"
            )
        defaults = {"lr": lr, "momentum": momentum, "delta": delta, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, task_grads: Sequence[Tensor | None], kd_grads: Sequence[Tensor | None]
    ) -> None:
        """One update from the two gradient sets, aligned with the parameters (group by group); None
        where a parameter gets no gradient from that loss."""
        count = len(self._params())
        if len(task_grads) != count or len(kd_grads) != count:
            raise ValueError(
                f"DOT.step: expected {count} gradients per set, got {len(task_grads)} and {len(kd_grads)}"
            )
        index = 0
        for group in self.param_groups:
            lr, mu, delta, wd = group["lr"], group["momentum"], group["delta"], group["weight_decay"]
            for param in group["params"]:
                g_task, g_kd = task_grads[index], kd_grads[index]
                index += 1
                if g_task is None and g_kd is None:
                    continue
                state = self.state[param]
                if g_task is not None and g_kd is not None:
                    v_task = _momentum(state, TASK, g_task.add(param, alpha=wd), mu - delta)
                    v_kd = _momentum(state, KD, g_kd, mu + delta)
                    param.sub_(torch.add(v_task, v_kd), alpha=lr)
                else:
                    # one gradient: nothing to balance, so a plain SGD parameter (momentum mu, and the
                    # weight decay too, or a parameter only distillation reaches would never decay)
                    key, grad = (TASK, g_task) if g_task is not None else (KD, g_kd)
                    param.sub_(_momentum(state, key, grad.add(param, alpha=wd), mu), alpha=lr)


def _momentum(state: dict, key: str, grad: Tensor, momentum: float) -> Tensor:
    buffer = state.get(key)
    if buffer is None:
        # SGD's first-step convention (dampening 0): the buffer starts as the gradient itself
        buffer = state[key] = grad.detach().clone()
    else:
        buffer.mul_(momentum).add_(grad)
    return buffer
