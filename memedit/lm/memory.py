"""The product-key memory layer (Memory Layers at Scale, 2024; Lample et al. 2019).

Parameter names and shapes follow the reference implementation exactly, so its checkpoints map 1:1
(docs/reference.md §2):

    keys                              (2*H*N, K/2)   viewed as (H, 2, N, K/2)
    values.weight                     (N*N, V)       possibly shared by several memory layers
    query_proj.query_mlps.0.weight    (H*K, D)       per-head query layout [q1, q2]
    query_proj.query_mlps.0.bias      (H*K,)
    value_proj.weight / .bias         (D, V) / (D,)  when swilu or V != D
    swilu_projection.weight / .bias   (V, D) / (V,)  when swilu
    gating.weight / .bias             (1, D) / (1,)  when gated

There is exactly ONE lookup routine, :class:`ProductKeySearch`. The forward pass, tracing, auditing and
verification all observe (or, for ablations, rewrite) its output through ordinary torch forward hooks on
``layer.search``. The layer itself keeps no statistics and does no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MemoryConfig:
    layers: list[int]  # indices of the transformer blocks whose FFN is replaced by a memory
    n_keys: int = 128  # N: sub-keys per half; the memory has N*N slots
    heads: int = 4  # H: memory heads, each with its own query and sub-keys
    knn: int = 16  # k: slots selected per head (and stage-1 sub-keys per half)
    k_dim: int = 64  # K: full key dim; each half-query has K/2 dims
    v_dim: int = -1  # V: value dim (-1 means the model dim D)
    swilu_projection: bool = True  # Memory+: out = value_proj(m * silu(swilu_projection(x)))
    gated: bool = False  # out = sigmoid(gating(x)) * out
    share_values: bool = True  # one value table read by every memory layer
    peer_variant: bool = False  # PEER is not supported yet; kept so configs round-trip
    query_norm: bool = False  # LayerNorm on each half-query (the product-key-memory PyPI module), as ``query_norm``

    @property
    def n_slots(self) -> int:
        return self.n_keys * self.n_keys


@dataclass
class Lookup:
    """What one lookup selected, per token and head. All tensors are (n_tokens, H, k) unless noted."""

    indices: torch.Tensor  # slot ids, int64: i * N + j
    subkeys: torch.Tensor  # (n_tokens, H, k, 2) sub-key ids (i, j) of each selected slot
    scores: torch.Tensor  # raw scores s1[i] + s2[j], in the compute dtype
    weights: torch.Tensor  # softmax over each head's k scores, float32
    stage1: torch.Tensor  # (n_tokens, H, 2, k) the sub-keys each half put in its stage-1 top-k

    def replace(self, **changes: torch.Tensor) -> Lookup:
        fields = dict(self.__dict__)
        fields.update(changes)
        return Lookup(**fields)


class HookPoint(nn.Identity):
    """An identity module whose only purpose is a stable place to attach forward hooks."""


class ProductKeySearch(nn.Module):
    """The one lookup routine: queries (n, H, K) and sub-keys (H, 2, N, K/2) -> :class:`Lookup`.

    It has no parameters of its own (the sub-keys stay at ``feed_forward.keys`` as in the reference), so
    hooks can observe and rewrite lookups without changing state-dict names.
    """

    def __init__(self, n_keys: int, knn: int):
        super().__init__()
        self.n_keys = n_keys
        self.knn = knn

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> Lookup:
        n, H, K = query.shape
        N, k = self.n_keys, self.knn
        q = query.view(n, H, 2, K // 2)  # (n, H, 2, K/2): step 1, halves q1 = [..., 0, :], q2 = [..., 1, :]
        # step 2: sub-key scores for both halves at once; the einsum's output is a strided (n, H, 2, N) view of an
        # (H, 2, n, N) product, which the grouped top-k reads as it is (copying it to (n, H, 2, N) first cost ~20 %
        # of a lookup)
        sub = torch.einsum("nhpd,hpid->nhpi", q, keys)  # (n, H, 2, N)
        # step 3: stage-1 top-k per half, sorted descending
        top, top_ids = topk_by_groups(sub, k)  # (n, H, 2, k)
        a, b = top[:, :, 0], top[:, :, 1]  # (n, H, k)
        i1, i2 = top_ids[:, :, 0], top_ids[:, :, 1]  # (n, H, k)
        # step 4: the k*k candidates; the first half is the major index of the slot id. Both halves are sorted
        # descending, so candidate (r, c) (ranks from 0) is at most as large as the (r+1)(c+1) - 1 others with
        # ranks (<= r, <= c): those with (r+1)(c+1) > k can never be in the top k (up to equal scores, as
        # topk_by_groups). Only the k * H_k others are scored (50 of 256 at k 16, 119 of 1024 at k 32).
        r, c = _candidate_ranks(k, a.device)  # (C,), (C,)
        cand_scores = a.index_select(-1, r) + b.index_select(-1, c)  # (n, H, C)
        # step 5: final top-k among the candidates
        scores, best = cand_scores.topk(k, dim=-1)  # (n, H, k)
        i = i1.gather(-1, r[best])  # (n, H, k)
        j = i2.gather(-1, c[best])  # (n, H, k)
        indices = i * N + j
        # step 6: softmax over each head's k scores, in float32
        weights = F.softmax(scores.float(), dim=-1)
        return Lookup(
            indices=indices,
            subkeys=torch.stack([i, j], dim=-1),
            scores=scores,
            weights=weights,
            stage1=top_ids,
        )


_RANKS: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _candidate_ranks(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank pairs (r, c) with (r+1)(c+1) <= k, r-major (step 4 of the lookup): ((C,), (C,)) int64."""
    key = (k, str(device))
    if key not in _RANKS:
        pairs = [(r, c) for r in range(k) for c in range(k) if (r + 1) * (c + 1) <= k]
        _RANKS[key] = (torch.tensor([p[0] for p in pairs], device=device),
                       torch.tensor([p[1] for p in pairs], device=device))
    return _RANKS[key]


def topk_by_groups(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-k of the last dim, sorted descending, as ``x.topk(k)``: (values, ids), each (..., k).

    The top k entries lie in the k groups (of s consecutive entries) with the largest maxima: an entry outside
    them has k group maxima, k distinct entries, at least as large. So ``topk`` runs over N/s group maxima and then
    over the k*s entries of the chosen groups instead of over all N: 384 entries instead of 1024 for N = 1024,
    k = 32 (topk's cost grows with the width; benchmarks/bench_lookup.py). Ids may differ from ``x.topk`` only
    among equal values.
    """
    N = x.shape[-1]
    s = 1 << max(0, round(math.log2(max(N / k, 1)) / 2))  # about sqrt(N / k): N/s + k*s is smallest there
    if s < 2 or N % s or N // s < k or N // s + k * s > N // 2:  # too little to save: the extra steps cost more
        return x.topk(k, dim=-1)
    groups = x.unflatten(-1, (N // s, s))  # (..., N/s, s)
    best = groups.amax(-1).topk(k, dim=-1, sorted=False).indices  # (..., k) the groups holding the top k
    cand = groups.gather(-2, best.unsqueeze(-1).expand(*best.shape, s)).flatten(-2)  # (..., k*s)
    values, pos = cand.topk(k, dim=-1)  # (..., k)
    return values, best.gather(-1, pos // s) * s + pos % s


ROWS_BLOCK = 32  # positions whose selected rows are gathered and upcast at once: 16 MiB at H*k 128, V 1024


def _blocks_of_rows(idx: torch.Tensor, table: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields (first position, float32 rows (b, R, V)) of ``table[idx]`` for idx (n, R), ROWS_BLOCK positions at a
    time, in two buffers allocated once: a fresh 64 MiB temporary per block cost more in page faults (the
    allocator maps and unmaps it every time) than the gather and the upcast together (0.83 s against 0.16 s of CPU
    for 1,536 positions × 128 rows × 1024 at a million slots). The rows of a block are overwritten by the next."""
    n, R = idx.shape
    B = max(1, min(ROWS_BLOCK, n))
    low = table.new_empty(B * R, table.shape[1])  # (B*R, V) in the table's dtype
    rows = torch.empty(B, R, table.shape[1], device=table.device)  # (B, R, V) float32
    for s in range(0, n, B):
        b = min(B, n - s)
        got = torch.index_select(table, 0, idx[s : s + b].reshape(-1), out=low[: b * R])  # (b*R, V)
        rows[:b].copy_(got.view(b, R, -1))
        yield s, rows[:b]


class WeightedRows(torch.autograd.Function):
    """Step 7 for a low-precision table: m = sum_r w[:, r] * float32(table[idx[:, r]]), (n, V) float32.

    Computed ROWS_BLOCK positions at a time as one batched matrix-vector product per block (a little faster than
    multiplying and summing: 0.75 s against 0.88 s for 1,248 tokens × 128 rows × 1024 on this machine, loaded).
    The backward pass gathers the rows again rather than keeping them (0.73 s against 0.45 s): autograd would keep
    every position's (H*k, V) float32 rows, 650 MB per layer for 1,248 tokens at H*k 128, V 1024, which is what
    bounds ``keys adapt`` and ``edit`` at a million slots. Only ``w`` gets a gradient (the table is frozen).
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, idx: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, idx)
        ctx.table = table
        out = w.new_empty(idx.shape[0], table.shape[1])  # (n, V)
        for s, rows in _blocks_of_rows(idx, table):  # rows (b, H*k, V)
            torch.bmm(w[s : s + len(rows), None, :], rows, out=out[s : s + len(rows), None, :])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        w, idx = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad_w = torch.empty_like(w)  # (n, H*k): d m / d w[:, r] = the row r
        grad = grad.float()
        for s, rows in _blocks_of_rows(idx, ctx.table):  # rows (b, H*k, V)
            torch.bmm(rows, grad[s : s + len(rows), :, None], out=grad_w[s : s + len(rows), :, None])
        return grad_w, None, None


class QueryProjection(nn.Module):
    """Named as the reference: ``query_proj.query_mlps.0`` is the single linear query net."""

    def __init__(self, dim: int, heads: int, k_dim: int):
        super().__init__()
        self.query_mlps = nn.Sequential(nn.Linear(dim, heads * k_dim, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.query_mlps(x)


class MemoryLayer(nn.Module):
    """A product-key memory in place of a block's FFN. ``values`` may be an embedding shared with other layers."""

    def __init__(self, dim: int, cfg: MemoryConfig, values: nn.Embedding | None = None):
        super().__init__()
        if cfg.k_dim % 2:
            raise ValueError(f"k_dim must be even, got {cfg.k_dim}")
        if cfg.knn > cfg.n_keys:
            raise ValueError(f"knn ({cfg.knn}) must be <= n_keys ({cfg.n_keys}) for an exact lookup")
        self.cfg = cfg
        self.dim = dim
        self.v_dim = dim if cfg.v_dim in (-1, None) else cfg.v_dim
        H, N, K = cfg.heads, cfg.n_keys, cfg.k_dim
        self.keys = nn.Parameter(torch.empty(2 * H * N, K // 2))
        self.values = values if values is not None else nn.Embedding(N * N, self.v_dim)
        self.query_proj = QueryProjection(dim, H, K)
        self.query_norm = nn.LayerNorm(K // 2) if cfg.query_norm else None
        self.swilu_projection = nn.Linear(dim, self.v_dim) if cfg.swilu_projection else None
        self.value_proj = nn.Linear(self.v_dim, dim) if (cfg.swilu_projection or self.v_dim != dim) else None
        self.gating = nn.Linear(dim, 1) if cfg.gated else None
        self.search = ProductKeySearch(N, cfg.knn)
        self.hook_query = HookPoint()  # (n, H, K)
        self.hook_mem = HookPoint()  # (n, V): the weighted sum of value rows, before projection
        self.hook_gate = HookPoint()  # (n, V): silu(swilu_projection(x)) when swilu
        self.hook_gating = HookPoint()  # (n, 1): sigmoid(gating(x)) when gated

    @property
    def keys4d(self) -> torch.Tensor:
        """The sub-keys as (H, 2, N, K/2): row h*2N + half*N + i of ``keys``."""
        c = self.cfg
        return self.keys.view(c.heads, 2, c.n_keys, c.k_dim // 2)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Queries (n, H, K) for normalised inputs x (n, D)."""
        q = self.query_proj(x).view(x.shape[0], self.cfg.heads, self.cfg.k_dim)
        if self.query_norm is not None:  # one LayerNorm applied to each half-query of each head
            q = self.query_norm(q.unflatten(-1, (2, -1))).flatten(-2)  # (n, H, 2, K/2) -> (n, H, K)
        return q

    def lookup(self, x: torch.Tensor) -> Lookup:
        """Run the lookup for normalised inputs x (n, D) through the hooked search module."""
        q = self.hook_query(self.query(x))
        return self.search(q, self.keys4d.to(q.dtype))

    def read(self, lk: Lookup, dtype: torch.dtype) -> torch.Tensor:
        """Step 7: m = sum over heads and ranks of w * Values[idx], as one embedding bag. Returns (n, V) in ``dtype``.

        Numerics of the reference kernel (xformers_embedding_bag): the weights are taken in the compute dtype
        ``dtype``, every row is upcast to float32, the sum is float32, and m is rounded to the table's dtype.
        """
        n = lk.indices.shape[0]
        table = self.values.weight
        idx = lk.indices.reshape(n, -1)  # (n, H*k)
        w = lk.weights.reshape(n, -1).to(dtype).float()  # (n, H*k): in the compute dtype, then exact in float32
        if table.dtype == torch.float32:
            m = F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")
        elif table.requires_grad:  # dense training of the table itself (a baseline): plain autograd
            B = ROWS_BLOCK
            m = torch.cat([torch.bmm(w[s : s + B, None, :], F.embedding(idx[s : s + B], table).float()).squeeze(1)
                           for s in range(0, n, B)]) if n else w.new_zeros(0, table.shape[1])  # (n, V)
        else:  # gathered and upcast a block of positions at a time: a low-precision table is never upcast whole
            m = WeightedRows.apply(w, idx, table)  # (n, V) float32
        return m.to(table.dtype).to(dtype)

    def project(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Step 8: from the value mix m (n, V) and the inputs x (n, D) to the layer output (n, D)."""
        if self.swilu_projection is not None:
            m = m * self.hook_gate(F.silu(self.swilu_projection(x)))
        out = self.value_proj(m) if self.value_proj is not None else m
        if self.gating is not None:
            out = self.hook_gating(torch.sigmoid(self.gating(x))) * out
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (n, D)
        lk = self.lookup(flat)
        m = self.hook_mem(self.read(lk, flat.dtype))  # (n, V)
        return self.project(flat, m).view(*shape[:-1], -1)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise as the reference does: unit-variance-ish keys, small values, default linears."""
        c = self.cfg
        bound = 1.0 / (c.k_dim // 2) ** 0.5
        self.keys.uniform_(-bound, bound, generator=generator)
        nn.init.normal_(self.values.weight, mean=0.0, std=self.v_dim**-0.5, generator=generator)
