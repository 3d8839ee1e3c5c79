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


class Grace:
    """A GRACE-style codebook (Hartvigsen et al. 2023) at the input of memory layer ``layer``: the side-memory
    reference point of the continual-editing benchmark.

    Each entry holds a key (the layer's input at the last token of an edit's rewrite prompt), a value (a vector
    that replaces the layer's output at every position whose input lies within the entry's radius of the key) and
    a radius. An edit whose key lies farther than ``eps_init`` beyond every entry's radius adds an entry with radius
    ``eps_init`` (GRACE's initial epsilon, 1.0); near an entry with the same answer it widens that entry's radius
    to reach it; near an entry with another answer both radii shrink to half their distance (GRACE's conflict
    rule) and a new entry is added. The value starts at the layer's output there and is trained by teacher forcing
    on the whole new target (Adam, ``steps`` x lr ``lr``, as GRACE's defaults: 100 x 1.0). Nothing else changes.
    """

    def __init__(self, model: MemoryModel, layer: int, eps_init: float = 1.0, steps: int = 100, lr: float = 1.0):
        self.model, self.layer = model, layer
        self.eps_init, self.steps, self.lr = eps_init, steps, lr
        self.keys = torch.empty(0, model.config.dim)
        self.values: list[torch.Tensor] = []
        self.eps = torch.empty(0)
        self.answers: list[str] = []
        self.train_value: torch.Tensor | None = None  # the value being trained (used at the last prompt position)
        self.train_rows: torch.Tensor | None = None
        self.seen: list[torch.Tensor] | None = None  # the layer's inputs, while a key is being read
        self.handle = model.memory_layers[layer].register_forward_hook(self._hook)

    def remove(self) -> None:
        self.handle.remove()

    def _hook(self, mod, args, out):
        x = args[0].reshape(-1, args[0].shape[-1]).float()  # (n, D) the layer's input
        if self.seen is not None:
            self.seen.append(x.detach())
        flat = out.reshape(-1, out.shape[-1])
        if self.train_value is not None:  # training an entry's value: it replaces the output at the edit's rows
            flat = flat.clone()
            flat[self.train_rows] = self.train_value.to(flat.dtype)
            return flat.view_as(out)
        if not len(self.keys):
            return out
        d = torch.cdist(x, self.keys)  # (n, entries)
        dist, near = d.min(-1)
        hit = dist <= self.eps[near]
        if not bool(hit.any()):
            return out
        flat = flat.clone()
        flat[hit] = torch.stack(self.values)[near[hit]].to(flat.dtype)
        return flat.view_as(out)

    def edit(self, request: EditRequest) -> None:
        items = fact_items(self.model, [request])[:1]  # the rewrite prompt
        tokens, _, labels = _teacher_batch(self.model, items)
        row = torch.tensor([len(items[0].prompt_ids) - 1])  # its last prompt token (batch of one)
        self.seen = []
        with torch.no_grad():
            self.model(tokens)
        key = self.seen[-1][row[0]]
        self.seen = None
        eps = self.eps_init
        if len(self.keys):
            dist, near = torch.cdist(key[None], self.keys)[0].min(0)
            i, d = int(near), float(dist)
            if d <= float(self.eps[i]) + self.eps_init:
                if self.answers[i] == request.target_new:  # the same answer: widen that entry to cover this key
                    self.eps[i] = max(float(self.eps[i]), d)
                    return
                self.eps[i] = eps = d / 2  # a conflict: both radii shrink to half the distance
        v = self._layer_output(tokens, row).clone().requires_grad_(True)
        self.train_value, self.train_rows = v, row
        opt = torch.optim.Adam([v], lr=self.lr)
        try:
            for _ in range(self.steps):
                logits = self.model(tokens)
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                                         ignore_index=-100)
                if float(loss.detach()) < 0.05:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            self.train_value = None
        self.keys = torch.cat([self.keys, key[None]])
        self.values.append(v.detach().clone())
        self.eps = torch.cat([self.eps, torch.tensor([eps])])
        self.answers.append(request.target_new)

    @torch.no_grad()
    def _layer_output(self, tokens: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        got = []
        h = self.model.memory_layers[self.layer].register_forward_hook(
            lambda mod, args, out: got.append(out.reshape(-1, out.shape[-1])[row[0]].float().clone()))
        try:
            self.model(tokens)
        finally:
            h.remove()
        return got[0]
