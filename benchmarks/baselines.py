"""Dense-editing baselines for the editing benchmarks: a ROME-style rank-one edit of a memory layer's value_proj.

ROME (Meng et al. 2022) edits one linear map W so that a key k* (the map's input for the edited subject) maps to a
new value v*: ``W <- W + (v* - W k*) (C^-1 k*)^T / (k*^T C^-1 k*)``, with C the uncentred covariance of the map's
inputs over general text. Here the map is a memory layer's ``value_proj`` (the nearest dense peer of a value-row
edit): its input at a position is ``m * gate`` (the value mix times the swilu gate), captured by a forward
pre-hook. v* = W k* + delta, where delta (added to the layer output at the last prompt position of every training
phrasing) is optimised to make the whole new target likely (teacher forcing), with an L2 penalty on delta.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memedit.editing.sparse_ft import EditRequest, _teacher_batch, fact_items
from memedit.lm.model import MemoryModel


def _inputs_at(model: MemoryModel, layer: int, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """value_proj inputs (n, V) of memory layer ``layer`` at flat positions ``rows`` of a forward over ``tokens``."""
    got = []
    proj = model.memory_layers[layer].value_proj
    h = proj.register_forward_pre_hook(lambda mod, args: got.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        h.remove()
    return got[0].reshape(-1, got[0].shape[-1])[rows].float()


def key_covariance(model: MemoryModel, layer: int, texts: Sequence[str], batch: int = 64, ridge: float = 1e-2
                   ) -> torch.Tensor:
    """C^-1 (V, V): the inverse uncentred covariance of value_proj's inputs over ``texts`` (plus a ridge)."""
    from memedit.lm.batching import pad_batch, pad_id

    V = model.memory_layers[layer].value_proj.in_features
    acc, n = torch.zeros(V, V, dtype=torch.float64), 0
    for s in range(0, len(texts), batch):
        seqs = [model.encode(t) for t in texts[s : s + batch]]
        tokens, lengths = pad_batch(seqs, pad_id(model))
        keep = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).flatten()
        k = _inputs_at(model, layer, tokens, keep.nonzero()[:, 0]).double()
        acc += k.T @ k
        n += k.shape[0]
    C = acc / max(n, 1)
    C += ridge * C.diagonal().mean() * torch.eye(V, dtype=torch.float64)
    return torch.linalg.inv(C).float()


def rome_edit(model: MemoryModel, request: EditRequest, layer: int, c_inv: torch.Tensor, steps: int = 40,
              lr: float = 0.5, l2: float = 1e-3) -> torch.Tensor:
    """Apply a rank-one edit of ``layer``'s value_proj in place for ``request``; returns the old weight (for undo)."""
    mem = model.memory_layers[layer]
    W = mem.value_proj.weight
    items = fact_items(model, [request])
    tokens, _, labels = _teacher_batch(model, items)
    T = tokens.shape[1]
    last = torch.tensor([len(it.prompt_ids) - 1 for it in items])
    rows = torch.arange(len(items)) * T + last  # the flat position of each phrasing's last prompt token
    k_star = _inputs_at(model, layer, tokens, rows).mean(0)  # (V,)
    delta = torch.zeros(W.shape[0], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)

    def add_delta(mod, inp, out):
        out = out.clone()
        out.view(-1, out.shape[-1])[rows] += delta.to(out.dtype)
        return out

    h = mem.register_forward_hook(add_delta)
    try:
        for _ in range(steps):
            logits = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
            loss = loss + l2 * delta.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        h.remove()
    old = W.detach().clone()
    u = c_inv @ k_star  # (V,)
    with torch.no_grad():
        W += torch.outer(delta.detach(), u) / (k_star @ u)
    return old
