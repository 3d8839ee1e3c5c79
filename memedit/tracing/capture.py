"""Observe the one lookup routine through the hook registry (memedit/lm/hooks.py).

Every tool that needs lookups (trace, audit, background statistics, verification, core sets) goes through
here, so nothing re-implements the lookup: it only watches ``layers.{L}.feed_forward.search``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from ..lm.hooks import hooks, memory_path
from ..lm.memory import Lookup
from ..lm.model import MemoryModel


@contextlib.contextmanager
def on_lookup(model: MemoryModel, fn: Callable[[int, Lookup], Lookup | None]) -> Iterator[None]:
    """Within the block, call ``fn(layer, lookup)`` for every lookup; a returned Lookup replaces the original."""
    with hooks(model, [(f"{memory_path(L)}.search", lambda lk, name, L=L: fn(L, lk)) for L in model.memory_layers]):
        yield


class RowCounter:
    """A lookup observer (use with :func:`on_lookup`) that counts, per value table, how often each row is read.

    ``reads[table]`` (rows,) int64: one per (position, head, selected slot) at the kept positions, over every layer
    that reads the table. With ``groups`` given to :meth:`batch`, ``df[table]`` (rows,) int64 counts the groups
    (e.g. background batches) that read each row at least once, whichever layer, head or position read it.
    Per-(layer, head) statistics with weight mass and sub-keys are the audit's (memedit/auditing/stats.py).
    """

    def __init__(self, model: MemoryModel):
        self.table_of = {L: t for t in model.tables for L in t.layers}
        self.reads = {t.name: torch.zeros(t.n_rows, dtype=torch.long) for t in model.tables}
        self.df = {t.name: torch.zeros(t.n_rows, dtype=torch.long) for t in model.tables}
        self.keep: torch.Tensor | None = None
        self.groups: torch.Tensor | None = None
        self._pairs: dict[str, list[torch.Tensor]] = {}

    def batch(self, keep: torch.Tensor | None = None, groups: torch.Tensor | None = None) -> None:
        """Before a forward: count only positions with ``keep`` ((B*T,) bool, the flattened batch), each in group
        ``groups`` ((n_kept,) int64), for document frequency. Call :meth:`close_batch` after the forward."""
        self.keep, self.groups = keep, groups
        self._pairs = {name: [] for name in self.reads}

    def __call__(self, layer: int, lk: Lookup) -> None:
        t = self.table_of[layer]
        idx = lk.indices.reshape(lk.indices.shape[0], -1)  # (n_tokens, H*k)
        if self.keep is not None:
            idx = idx[self.keep.to(idx.device)]
        idx = idx.cpu()
        self.reads[t.name] += torch.bincount(idx.flatten(), minlength=t.n_rows)
        if self.groups is not None:
            self._pairs[t.name].append((self.groups[:, None] * t.n_rows + idx).flatten())

    def close_batch(self) -> None:
        """After a forward: a row counts once per group in ``df``."""
        for name, pairs in self._pairs.items():
            if pairs:
                n = self.df[name].numel()
                self.df[name] += torch.bincount(torch.unique(torch.cat(pairs)) % n, minlength=n)
        self._pairs = {}


@contextlib.contextmanager
def capture_lookups(model: MemoryModel) -> Iterator[dict[int, list[Lookup]]]:
    """Record every lookup made in the block: {layer: [Lookup per forward call]} (tensors detached)."""
    rec: dict[int, list[Lookup]] = {L: [] for L in model.memory_layers}

    def keep(L: int, lk: Lookup) -> None:
        rec[L].append(Lookup(**{k: v.detach() for k, v in lk.__dict__.items()}))

    with on_lookup(model, keep):
        yield rec


@contextlib.contextmanager
def trainable_rows(model: MemoryModel, rows: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """Leaf tensors {table: (m, V)} that stand in for the given rows (sorted, unique ids) of each value table.

    Inside the block every lookup that selects one of those rows reads it from the leaf instead of the table:
    a hook on ``layer.search`` keeps the lookup, and a hook on ``layer.hook_mem`` (the value mix, before the
    projection) adds sum over the selected trainable rows of w * (leaf row - stored row). The forward pass is the
    one the model would compute with the leaves written into the table, and gradients reach only the leaves:
    no gradient or optimizer state the size of the table (sparse memory finetuning, Lin et al. 2025). The table
    is left unchanged; write the trained leaves back with ``table.weight[ids] = leaf``.
    """
    from torch.nn import functional as F

    tables = {t.name: t for t in model.tables}
    leaves, base = {}, {}
    for name, ids in rows.items():
        w = tables[name].weight
        if ids.numel() and not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("trainable_rows needs sorted, unique row ids")
        base[name] = w.detach()[ids].float()  # (m, V)
        leaves[name] = w.detach()[ids].clone().requires_grad_(True)  # (m, V) in the table's dtype
    lookups: dict[int, Lookup] = {}
    fwd_hooks = []
    for name, t in tables.items():
        if name not in rows:
            continue
        ids = rows[name]
        for L in t.layers:

            def keep(out, path, L=L):
                lookups[L] = out

            def substitute(m, path, L=L, ids=ids, name=name):
                lk = lookups.pop(L)
                n = m.shape[0]
                idx = lk.indices.reshape(n, -1)  # (n, H*k)
                pos = torch.searchsorted(ids, idx).clamp(max=max(ids.numel() - 1, 0))  # (n, H*k) row in the leaf
                hit = ids[pos] == idx if ids.numel() else torch.zeros_like(idx, dtype=torch.bool)
                w = lk.weights.reshape(n, -1).float() * hit  # (n, H*k) weights of the trainable rows only
                delta = F.embedding_bag(pos, leaves[name].float() - base[name], per_sample_weights=w, mode="sum")
                return m + delta.to(m.dtype)  # (n, V)

            fwd_hooks += [(f"{memory_path(L)}.search", keep), (f"{memory_path(L)}.hook_mem", substitute)]
    with hooks(model, fwd_hooks):
        yield leaves


@torch.no_grad()
def answer_lookups(model: MemoryModel, prompts: Sequence[str]) -> dict[int, Lookup]:
    """The lookups at the last position of each prompt: {layer: Lookup with n_tokens = len(prompts)}."""
    from ..lm.batching import pad_batch, pad_id

    seqs = [model.encode(p) for p in prompts]
    pad = pad_id(model)
    tokens, lengths = pad_batch(seqs, pad)
    B, T = tokens.shape
    with capture_lookups(model) as rec:
        model(tokens)
    rows = torch.arange(B) * T + (lengths - 1)  # flat (B*T) index of each prompt's last token
    out = {}
    for L, (lk,) in rec.items():
        out[L] = Lookup(**{k: v[rows] for k, v in lk.__dict__.items()})
    return out


def core_set(model: MemoryModel, prompts: Sequence[str]) -> dict[str, list[int]]:
    """Slots selected at the answer position by EVERY prompt, per value table (union over its layers and heads).

    This is the "core set" of sparse memory finetuning (reference §6) for a fact's phrasings.
    """
    lookups = answer_lookups(model, prompts)
    out: dict[str, list[int]] = {}
    for t in model.tables:
        common: set[int] | None = None
        for b in range(len(prompts)):
            slots = set(torch.cat([lookups[L].indices[b].flatten() for L in t.layers]).tolist())
            common = slots if common is None else common & slots
        out[t.name] = sorted(common or [])
    return out
