"""The optimizer of sparse edits (no torch.optim: see :class:`SGD`)."""

from __future__ import annotations

import torch


class SGD:
    """torch.optim.SGD's update with momentum (no dampening, weight decay or Nesterov): buf = m * buf + grad,
    p -= lr * buf (buf = grad at the first step). Written out because constructing torch.optim.SGD first imports
    torch._dynamo (2.5 s of CPU, once per process: most of a single CLI edit on a small model)."""

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float = 0.0):
        self.params, self.lr, self.momentum = params, lr, momentum
        self.bufs: list[torch.Tensor | None] = [None] * len(params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            d = p.grad
            if self.momentum:
                buf = self.bufs[i]
                d = self.bufs[i] = d.clone() if buf is None else buf.mul_(self.momentum).add_(d)
            p.add_(d, alpha=-self.lr)
