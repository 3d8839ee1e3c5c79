"""Observe the one lookup routine through the hook registry (memedit/lm/hooks.py).

Every tool that needs lookups (trace, audit, background statistics, verification, core sets) goes through
here, so nothing re-implements the lookup: it only watches ``layers.{L}.feed_forward.search``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.nn import functional as F

from ..lm.batching import pad_batch, pad_id
from ..lm.hooks import hooks, memory_path
from ..lm.memory import Lookup
from ..lm.model import MemoryModel


@contextlib.contextmanager
def on_lookup(model: MemoryModel, fn: Callable[[int, Lookup], Lookup | None]) -> Iterator[None]:
    """Within the block, call ``fn(layer, lookup)`` for every lookup; a returned Lookup replaces the original."""
    with hooks(model, [(f"{memory_path(L)}.search", lambda lk, name, L=L: fn(L, lk)) for L in model.memory_layers]):
        yield


WEIGHT_SCALE = 2.0**32  # weight mass is counted as round(w * 2^32) per selection: integer sums merge exactly


def per_table(x: torch.Tensor, layers: list[int], table_layers: list[int]) -> torch.Tensor:
    """``x`` (n_layers, ...) per memory layer (in the order of ``layers``) summed over ``table_layers``: (...)."""
    return x[[layers.index(L) for L in table_layers]].sum(0)


class SlotCounter:
    """A lookup observer (use with :func:`on_lookup`): the one slot counter behind the audit, background
    statistics, edit ranking and routing.

    At the kept positions, with ``by_head`` per memory layer, head and slot, else per value table and slot:
    ``counts`` (n_layers, H, S) or (n_tables, 1, S) int64 selections; with ``weights``, ``weight_units`` of the
    same shape, int64 softmax mass in units of 2^-32 (exact for float32 weights, so counts of corpus shards or
    ranks sum to bit-identical results in any order); with ``subkeys``, ``subkey_counts`` (n_layers, H, 2, N)
    int64 entries of each sub-key into a stage-1 top-k. Per value table: :meth:`table_reads` (rows,) and, with
    ``groups`` given to :meth:`batch`, ``df[table]`` (rows,) int64 the number of groups (e.g. background batches)
    that read each row at least once, whichever layer, head or position. Counting is ``index_add_`` on the
    selected indices, no Python loop per token. Without ``by_head`` nothing is as large as (H, S) per layer, so an
    edit's counting stays far below the size of the value table.
    """

    def __init__(self, model: MemoryModel, by_head: bool = False, weights: bool = False, subkeys: bool = False):
        mem = model.config.memory
        self.layers = list(mem.layers)
        self.tables = {t.name: list(t.layers) for t in model.tables}
        self.heads, self.n_keys, self.knn = mem.heads, mem.n_keys, mem.knn
        H, N, S, nl = mem.heads, mem.n_keys, mem.n_keys * mem.n_keys, len(mem.layers)
        z = lambda *shape: torch.zeros(shape, dtype=torch.int64)  # noqa: E731
        shape = (nl, H, S) if by_head else (len(self.tables), 1, S)
        self.counts = z(*shape)
        self.weight_units = z(*shape) if weights else None
        self.subkey_counts = z(nl, H, 2, N) if subkeys else None
        self.df = {name: z(S) for name in self.tables}
        self.keep: torch.Tensor | None = None
        self.groups: torch.Tensor | None = None
        self._pairs: dict[str, list[torch.Tensor]] = {}
        self._table_of = {L: name for name, ls in self.tables.items() for L in ls}
        # the row of ``counts`` each layer adds into, and where each head's slots start in that row's (H*S) view
        names = list(self.tables)
        self._row = {L: li if by_head else names.index(self._table_of[L]) for li, L in enumerate(self.layers)}
        self._slot_offset = (torch.arange(H) * S if by_head else torch.zeros(H, dtype=torch.int64)).view(1, H, 1)
        self._subkey_offset = (torch.arange(H * 2) * N).view(1, H, 2, 1)  # (1, H, 2, 1)

    def batch(self, keep: torch.Tensor | None = None, groups: torch.Tensor | None = None) -> None:
        """Before a forward: count only positions with ``keep`` ((B*T,) bool, the flattened batch), each in group
        ``groups`` ((n_kept,) int64) for document frequency; with groups, call :meth:`close_batch` after it (or after
        the last of several forwards of the same groups)."""
        self.keep, self.groups = keep, groups
        if not self._pairs:  # a group's reads may span several forwards until close_batch
            self._pairs = {name: [] for name in self.tables}

    def __call__(self, layer: int, lk: Lookup) -> None:
        idx = lk.indices
        w = lk.weights if self.weight_units is not None else None
        stage1 = lk.stage1 if self.subkey_counts is not None else None
        if self.keep is not None:
            m = self.keep.to(idx.device)
            idx, w, stage1 = idx[m], w[m] if w is not None else None, stage1[m] if stage1 is not None else None
        self.count(layer, idx.cpu(), w.cpu() if w is not None else None,
                   stage1.cpu() if stage1 is not None else None)

    def count(self, layer: int, idx: torch.Tensor, w: torch.Tensor | None, stage1: torch.Tensor | None) -> None:
        """Add the kept selections of one lookup of ``layer``: indices (n, H, k), weights (n, H, k) (None unless
        counting weight mass), stage-1 sub-keys (n, H, 2, k) (None unless counting sub-keys); on the CPU."""
        r = self._row[layer]
        flat = (idx + self._slot_offset).reshape(-1)  # (n*H*k,) into the flat view of this layer's row
        self.counts[r].view(-1).index_add_(0, flat, torch.ones_like(flat))
        if self.weight_units is not None:
            units = (w.double() * WEIGHT_SCALE).round_().long().reshape(-1)  # exact: w is float32
            self.weight_units[r].view(-1).index_add_(0, flat, units)
        if self.subkey_counts is not None:
            sub = (stage1 + self._subkey_offset).reshape(-1)  # (n*H*2*k,) into the (H*2*N) view
            self.subkey_counts[self.layers.index(layer)].view(-1).index_add_(0, sub, torch.ones_like(sub))
        if self.groups is not None:
            S = self.n_keys * self.n_keys
            self._pairs[self._table_of[layer]].append((self.groups[:, None] * S + idx.reshape(len(idx), -1)).flatten())

    def close_batch(self) -> None:
        """After a forward with groups: a row counts once per group in ``df``."""
        for name, pairs in self._pairs.items():
            if pairs:
                n = self.df[name].numel()
                self.df[name] += torch.bincount(torch.unique(torch.cat(pairs)) % n, minlength=n)
        self._pairs = {}

    def table_reads(self, name: str) -> torch.Tensor:
        """(rows,) int64 reads of a value table's rows: the sum over the layers that read it and their heads."""
        return self.counts[sorted({self._row[L] for L in self.tables[name]})].sum((0, 1))


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


def prefix_of(model: MemoryModel, tokens: torch.Tensor) -> tuple[int, torch.Tensor, Lookup]:
    """(L, h, lookup): the first memory layer L, :meth:`MemoryModel.mid_block`'s residual h (B, T, D) for tokens
    (B, T) and layer L's lookup of it (B*T positions) -- everything of the forward pass that no value row changes
    (:func:`run_from`)."""
    L = min(model.memory_layers)
    layer = model.memory_layers[L]
    with torch.no_grad():
        h = model.mid_block(tokens, L)  # (B, T, D)
        with capture_lookups(model) as rec:
            layer.lookup(model.layers[L].ffn_norm(h).reshape(-1, h.shape[-1]))  # as the block's forward runs it
    return L, h, rec[L][0]


def run_from(model: MemoryModel, L: int, h: torch.Tensor, lookup: Lookup) -> torch.Tensor:
    """Logits of the forward pass from :func:`prefix_of`'s (L, h, lookup): layer L's search returns ``lookup``
    instead of searching (hooks on the search module still see it), every later memory layer searches as usual.
    Exact while only value rows changed since the prefix was computed (sub-keys and dense weights did not)."""
    search = model.memory_layers[L].search
    outer = search.__dict__.get("forward")  # a caller's own substitution (fixed_prefix), restored after
    compute = outer if outer is not None else type(search).forward.__get__(search)
    inside = [True]  # only layer L's first search of this pass is the cached one

    def forward(query: torch.Tensor, keys: torch.Tensor) -> Lookup:
        if inside[0]:
            inside[0] = False
            return lookup
        return compute(query, keys)

    search.forward = forward  # an instance attribute: hooks on the module still run on its output
    try:
        return model.from_mid_block(h, L)
    finally:
        if outer is not None:
            search.forward = outer
        else:
            del search.forward


@contextlib.contextmanager
def fixed_prefix(model: MemoryModel, tokens: torch.Tensor) -> Iterator[Callable[[], torch.Tensor]]:
    """A function that returns the logits of ``tokens`` (B, T), computing only what value rows can change.

    Exact while only value rows change (sparse finetuning): nothing before the first memory layer's value read
    depends on a value row, so that layer's block input, attention and lookup (its queries, slots and weights) are
    computed once here (:func:`prefix_of`) and every call runs from its value read on (:func:`run_from`), with the
    lookup reused. At a million slots with memory layers 1 and 3 that skips the dense block 0 as well; on a small
    model, the first lookup's top-k's, most of a training step. Later memory layers read the trained rows through
    the residual stream and are searched as usual. Hooks on the first lookup still see (and may replace) it.
    """
    if not model.memory_layers:
        yield lambda: model(tokens)
        return
    L, h, cached = prefix_of(model, tokens)
    yield lambda: run_from(model, L, h, cached)


@torch.no_grad()
def answer_lookups(model: MemoryModel, prompts: Sequence[str]) -> dict[int, Lookup]:
    """The lookups at the last position of each prompt: {layer: Lookup with n_tokens = len(prompts)}."""
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
