"""Streaming slot statistics and the usage metrics of XLM's memory evaluation (reference §5).

:class:`SlotStats` holds, per memory layer and head, how often each slot was selected and the softmax weight mass
it received, and per (layer, head, half) how often each sub-key entered a stage-1 top-k. Weight mass is kept as
an integer number of 2^-32 units, so statistics merge by exact integer addition: audits of corpus shards (or of
the ranks of a distributed run) sum to bit-identical results, whatever the order.

:class:`AuditCounter` is the one slot counter (:class:`memedit.tracing.capture.SlotCounter`, also behind
background statistics, edit ranking and routing) with weight mass and sub-keys, which also keeps the top contexts
of every slot (:class:`TopContexts`); :meth:`SlotStats.counted` turns it into statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import limits
from ..errors import MemeditError
from ..lm.model import MemoryModel
from ..tracing.capture import WEIGHT_SCALE, SlotCounter, per_table

METRICS = ("used", "kl_uniform", "gini", "top50", "top90", "top99", "top1pct_share", "dead", "entropy")


@dataclass
class SlotStats:
    """Access counts and weight mass per (memory layer, head, slot); stage-1 sub-key counts. Merge with ``+``."""

    layers: list[int]  # block indices of the memory layers, in model order
    tables: dict[str, list[int]]  # value table name -> the layers that read it
    n_keys: int  # N: sub-keys per half (N*N slots)
    heads: int  # H
    knn: int  # k
    counts: torch.Tensor  # (n_layers, H, S) int64 times each slot was selected
    weight_units: torch.Tensor  # (n_layers, H, S) int64 softmax mass in units of 2^-32
    subkey_counts: torch.Tensor  # (n_layers, H, 2, N) int64 times each sub-key entered a stage-1 top-k
    tokens: int = 0  # token positions audited (padding excluded)
    corpus: str = ""  # a description of what was audited
    fingerprint: str = ""  # memedit.storage.checkpoint.fingerprint of the model
    config: dict[str, Any] = field(default_factory=dict)  # the model config as a dict
    contexts: TopContexts | None = None  # the top contexts of every slot (audit --contexts M), else None

    @classmethod
    def counted(cls, counter: AuditCounter, tokens: int, corpus: str = "", fingerprint: str = "",
                config: dict[str, Any] | None = None) -> SlotStats:
        """The statistics an :class:`AuditCounter` has counted over ``tokens`` positions (its tensors, not copies)."""
        return cls(
            layers=list(counter.layers), tables=dict(counter.tables), n_keys=counter.n_keys, heads=counter.heads,
            knn=counter.knn, counts=counter.counts, weight_units=counter.weight_units,
            subkey_counts=counter.subkey_counts, tokens=tokens, corpus=corpus, fingerprint=fingerprint,
            config=config or {}, contexts=counter.contexts,
        )

    @property
    def n_slots(self) -> int:
        return self.n_keys * self.n_keys

    @property
    def weights(self) -> torch.Tensor:
        """Softmax weight mass (n_layers, H, S) as float64."""
        return self.weight_units.double() / WEIGHT_SCALE

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise MemeditError(f"layer {layer} is not a memory layer (memory layers: {self.layers})")
        return self.layers.index(layer)

    def table_counts(self, name: str) -> torch.Tensor:
        """(H, S) accesses of a value table's rows: the sum over the layers that read it."""
        return per_table(self.counts, self.layers, self.tables[name])

    def table_weights(self, name: str) -> torch.Tensor:
        """(H, S) float64 weight mass of a value table's rows, summed over its layers."""
        return per_table(self.weight_units, self.layers, self.tables[name]).double() / WEIGHT_SCALE

    def same_shape(self, other: SlotStats) -> bool:
        return (self.layers, self.n_keys, self.heads, self.tables) == (other.layers, other.n_keys, other.heads,
                                                                      other.tables)

    def __add__(self, other: SlotStats) -> SlotStats:
        if not self.same_shape(other):
            raise MemeditError("cannot merge statistics of differently shaped memories (layers, N, heads, tables)")
        if self.fingerprint and other.fingerprint and self.fingerprint != other.fingerprint:
            raise MemeditError(f"cannot merge statistics of two different models "
                               f"({self.fingerprint} and {other.fingerprint})")
        corpus = self.corpus if self.corpus == other.corpus else f"{self.corpus} + {other.corpus}"
        return SlotStats(
            layers=list(self.layers), tables=dict(self.tables), n_keys=self.n_keys, heads=self.heads, knn=self.knn,
            counts=self.counts + other.counts, weight_units=self.weight_units + other.weight_units,
            subkey_counts=self.subkey_counts + other.subkey_counts, tokens=self.tokens + other.tokens,
            corpus=corpus, fingerprint=self.fingerprint or other.fingerprint, config=self.config or other.config,
            contexts=merge_contexts(self.contexts, other.contexts),
        )


class AuditCounter(SlotCounter):
    """The slot counter with weight mass and sub-keys (use with ``on_lookup``) that, with ``contexts`` M > 0, also
    keeps the top-M contexts of every slot; call :meth:`documents` before each forward."""

    def __init__(self, model: MemoryModel, contexts: int = 0):
        if not model.config.memory.layers:
            raise MemeditError("this model has no memory layers: nothing to audit")
        super().__init__(model, by_head=True, weights=True, subkeys=True)
        self.df = {}  # an audit counts no document frequency (S int64 per table: 134 MB at 16.8M slots)
        self.contexts = TopContexts.empty(self.layers, self.tables, self.n_keys**2, contexts) if contexts else None
        self._where: tuple[torch.Tensor, torch.Tensor] | None = None  # (n,) context keys, (n, WINDOW) tokens

    def documents(self, tokens: torch.Tensor, lengths: torch.Tensor, documents: torch.Tensor, starts: torch.Tensor
                  ) -> None:
        """Prepare for a forward over ``tokens`` (B, T) padded, of ``lengths`` (B,): sequence b is document
        ``documents[b]`` from token ``starts[b]`` on (a document longer than the model's context is split)."""
        B, T = tokens.shape
        keep = (torch.arange(T) < lengths[:, None]).reshape(-1)  # (B*T,) not padding
        self.batch(keep)
        if self.contexts is None:
            return
        pos = starts[:, None] + torch.arange(T)  # (B, T) position in the document
        keys = context_key(documents[:, None].expand(B, T), pos)  # (B, T)
        valid = torch.where(keep.view(B, T), tokens.long(), torch.full_like(tokens, -1, dtype=torch.long))
        padded = torch.nn.functional.pad(valid, (BEFORE, AFTER), value=-1)  # (B, BEFORE + T + AFTER)
        windows = padded.unfold(1, WINDOW, 1)  # (B, T, WINDOW): tokens t-BEFORE .. t+AFTER
        self._where = (keys.reshape(-1)[keep], windows.reshape(B * T, WINDOW)[keep].int())

    def count(self, layer: int, idx: torch.Tensor, w: torch.Tensor | None, stage1: torch.Tensor | None) -> None:
        """Count as the slot counter does; with top contexts, also offer every selection as a context."""
        super().count(layer, idx, w, stage1)
        if self.contexts is not None:
            if self._where is None:
                raise RuntimeError("AuditCounter.documents() must be called before each forward to keep top contexts")
            keys, windows = self._where
            self.contexts.add(layer, idx, w.float(), keys, windows)


# ---- top contexts ---------------------------------------------------------------------------------------
BEFORE, AFTER = 8, 2  # a context is the tokens from 8 before to 2 after the position that selected the slot
WINDOW = BEFORE + 1 + AFTER
CONTEXT_BYTES = 4 + 8 + 2 + 4 * WINDOW  # per slot and context: weight, key, where, tokens (58 bytes)
POSITION_BITS = 24  # a context key is document << 24 | position: one int64 that sorts as (document, position)
EMPTY_KEY = torch.iinfo(torch.int64).max


def context_key(documents: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 keys ``document << 24 | position`` (positions < 2^24 per document, documents < 2^39)."""
    if bool((positions >= 1 << POSITION_BITS).any()):
        raise MemeditError(f"a document is longer than {1 << POSITION_BITS:,} tokens: split it into several lines")
    return (documents.long() << POSITION_BITS) | positions.long()


def _order(slot: torch.Tensor, weight: torch.Tensor, key: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """The permutation sorting entries by (slot asc, weight desc, key asc, where asc): successive stable sorts."""
    o = torch.argsort(where, stable=True)
    o = o[torch.argsort(key[o], stable=True)]
    o = o[torch.argsort(-weight[o], stable=True)]
    return o[torch.argsort(slot[o], stable=True)]


@dataclass
class TopContexts:
    """Per slot of each value table, the M selections with the largest softmax weight, over all layers and heads
    that read the table. Ties go to the smaller (document, position, layer, head), so top-M sets of corpus shards
    or distributed ranks merge to exactly the single-process result.

    Memory: per entry a float32 weight, an int64 key, an int16 (layer index, head) and WINDOW int32 tokens, 58
    bytes: at 1,048,576 slots and M 8, 58 * 8 * 1,048,576 = 486.5 MB (plus one batch's candidates while adding).
    """

    layers: list[int]  # memory layers in model order; ``where`` holds an index into this list
    tables: dict[str, list[int]]  # value table -> the layers that read it
    m: int  # M: contexts kept per slot
    weight: dict[str, torch.Tensor]  # per table (S, M) float32, best first; -1 where there is no entry yet
    key: dict[str, torch.Tensor]  # (S, M) int64 document << 24 | position; EMPTY_KEY where empty
    where: dict[str, torch.Tensor]  # (S, M) int16 layer index << 8 | head; -1 where empty
    tokens: dict[str, torch.Tensor]  # (S, M, WINDOW) int32 tokens from 8 before to 2 after; -1 outside the text

    @classmethod
    def empty(cls, layers: list[int], tables: dict[str, list[int]], n_slots: int, m: int) -> TopContexts:
        if m < 1:
            raise MemeditError(f"--contexts must be at least 1, got {m}")
        if len(layers) > 127 or m > 1024:
            raise MemeditError("top contexts support up to 127 memory layers and 1,024 contexts per slot")
        need = CONTEXT_BYTES * n_slots * m * len(tables)
        if need > limits.MAX_CONTEXT_BYTES:
            most = max(limits.MAX_CONTEXT_BYTES // (CONTEXT_BYTES * n_slots * max(len(tables), 1)), 0)
            raise MemeditError(f"--contexts {m} keeps {need / 2**30:.1f} GiB of contexts for {n_slots:,} slots (at most "
                               f"{limits.MAX_CONTEXT_BYTES / 2**30:g} GiB): give --contexts {most} or fewer")
        S = n_slots
        return cls(
            layers=list(layers), tables={k: list(v) for k, v in tables.items()}, m=m,
            weight={t: torch.full((S, m), -1.0) for t in tables},
            key={t: torch.full((S, m), EMPTY_KEY, dtype=torch.int64) for t in tables},
            where={t: torch.full((S, m), -1, dtype=torch.int16) for t in tables},
            tokens={t: torch.full((S, m, WINDOW), -1, dtype=torch.int32) for t in tables},
        )

    def table_of(self, layer: int) -> str:
        return next(t for t, ls in self.tables.items() if layer in ls)

    def add(self, layer: int, indices: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor,
            windows: torch.Tensor) -> None:
        """Add one lookup of ``layer``: indices and weights (n, H, k), each position's key (n,) and window (n, W)."""
        n, H, k = indices.shape
        t = self.table_of(layer)
        li = self.layers.index(layer)
        slot = indices.reshape(-1)
        w = weights.reshape(-1)
        row = torch.arange(n).repeat_interleave(H * k)  # (n*H*k,) the position of each candidate
        where = ((li << 8) + torch.arange(H, dtype=torch.int16).repeat_interleave(k)).repeat(n)
        # a candidate below its slot's current M-th weight cannot enter (equal weights can: the key decides)
        keep = w >= self.weight[t][slot, -1]
        if not bool(keep.any()):
            return
        slot, w, row, where = slot[keep], w[keep], row[keep], where[keep]
        self._merge(t, slot, w, keys[row], where, windows[row])

    def _merge(self, t: str, slot: torch.Tensor, w: torch.Tensor, key: torch.Tensor, where: torch.Tensor,
               tokens: torch.Tensor) -> None:
        """Merge candidate entries into table ``t``'s top-M of their slots."""
        M = self.m
        U = torch.unique(slot)  # (U,) sorted
        cur_slot = U.repeat_interleave(M)
        all_slot = torch.cat([cur_slot, slot])
        all_w = torch.cat([self.weight[t][U].reshape(-1), w])
        all_key = torch.cat([self.key[t][U].reshape(-1), key])
        all_where = torch.cat([self.where[t][U].reshape(-1), where])
        all_tok = torch.cat([self.tokens[t][U].reshape(-1, WINDOW), tokens])
        o = _order(all_slot, all_w, all_key, all_where)
        sorted_slot = all_slot[o]
        _, counts = torch.unique_consecutive(sorted_slot, return_counts=True)  # every slot has >= M entries
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        top = o[(torch.arange(len(o)) - first) < M]  # (U*M,) best M of every slot, in order
        self.weight[t][U] = all_w[top].view(-1, M)
        self.key[t][U] = all_key[top].view(-1, M)
        self.where[t][U] = all_where[top].view(-1, M)
        self.tokens[t][U] = all_tok[top].view(-1, M, WINDOW)

    def merged(self, other: TopContexts) -> TopContexts:
        """The top-M contexts of both (a new object); exact whatever the order of merging."""
        if (self.layers, self.tables, self.m) != (other.layers, other.tables, other.m):
            raise MemeditError(f"cannot merge top contexts of different shapes (M {self.m} and {other.m}, or other "
                               "layers and tables)")
        out = TopContexts(self.layers, dict(self.tables), self.m, {t: v.clone() for t, v in self.weight.items()},
                          {t: v.clone() for t, v in self.key.items()}, {t: v.clone() for t, v in self.where.items()},
                          {t: v.clone() for t, v in self.tokens.items()})
        for t in self.tables:
            live = other.weight[t].reshape(-1) >= 0
            S = other.weight[t].shape[0]
            slot = torch.arange(S).repeat_interleave(self.m)[live]
            if len(slot):
                out._merge(t, slot, other.weight[t].reshape(-1)[live], other.key[t].reshape(-1)[live],
                           other.where[t].reshape(-1)[live], other.tokens[t].reshape(-1, WINDOW)[live])
        return out

    def entries(self, table: str, slot: int) -> list[dict[str, Any]]:
        """The recorded contexts of one slot, best first: {document, position, weight, layer, head, tokens}."""
        out = []
        for r in range(self.m):
            w = float(self.weight[table][slot, r])
            if w < 0:
                break
            key, where = int(self.key[table][slot, r]), int(self.where[table][slot, r])
            out.append({"document": key >> POSITION_BITS, "position": key & ((1 << POSITION_BITS) - 1), "weight": w,
                        "layer": self.layers[where >> 8], "head": where & 0xFF,
                        "tokens": self.tokens[table][slot, r].tolist()})
        return out


def merge_contexts(a: TopContexts | None, b: TopContexts | None) -> TopContexts | None:
    """Top contexts of two audits merged; None unless both kept them (a merge must not pretend to know more)."""
    if a is None or b is None:
        return None
    return a.merged(b)


# ---- metrics (reference §5) -------------------------------------------------------------------------------
def _ascending(m: torch.Tensor) -> torch.Tensor:
    """``m.sort().values`` for a flat tensor, sorting only its nonzero entries: an audit of a few thousand tokens
    uses a small share of a million slots, and the zeros all sort to the same place."""
    neg, pos = m[m < 0], m[m > 0]
    zeros = m.numel() - neg.numel() - pos.numel()
    if zeros != int((m == 0).sum()):  # NaN: leave it to sort
        return m.sort().values
    return torch.cat([neg.sort().values, m.new_zeros(zeros), pos.sort().values])


def usage_metrics(mass: torch.Tensor) -> dict[str, float]:
    """XLM's usage metrics of one distribution of use over slots (counts or weight mass, any shape, flattened).

    used (% of slots with p > 0), kl_uniform (log S + sum p log p), gini (1 - 2 mean of the ascending cumulative
    p), top50/top90/top99 (fewest most-used slots holding that % of the mass), top1pct_share (share of the top 1%
    of slots, at least one), dead (slots never used), entropy (-sum p log p, nats).
    """
    flat = mass.detach().flatten().cpu()
    if not bool((flat < 0).any()) and not (flat.is_floating_point() and bool(flat.isnan().any())):
        return _usage_of_nonzero(flat)  # the same figures from the used slots only (a few of 16.8M)
    m = flat.double()
    S = m.numel()
    total = m.sum()
    alive = int((m > 0).sum())
    if S == 0 or total <= 0:
        nan = float("nan")
        return {"used": 0.0, "kl_uniform": nan, "gini": nan, "top50": 0, "top90": 0, "top99": 0,
                "top1pct_share": nan, "dead": S, "entropy": nan}
    p = m / total
    nz = p[p > 0]
    plogp = float((nz * nz.log()).sum())
    asc = _ascending(m)  # one sort for both: dividing by the total keeps the order, flipping gives descending
    gini = 1.0 - 2.0 * float((asc / total).cumsum(0).mean())
    return _metrics(asc, total, S, alive, plogp, gini)


def _metrics(asc: torch.Tensor, total: torch.Tensor, S: int, alive: int, plogp: float, gini: float
             ) -> dict[str, float]:
    """The usage_metrics dict from the ascending used (or all) masses ``asc`` of ``S`` slots."""
    desc = asc.flip(0)
    cum = desc.cumsum(0)  # exact for integer counts
    tops = {}
    for q in (50, 90, 99):
        need = total * (q / 100)
        tops[f"top{q}"] = min(int(torch.searchsorted(cum, need.reshape(1) * (1 - 1e-12)).item()) + 1, S)
    hub = max(1, math.ceil(S / 100))
    return {
        "used": 100.0 * alive / S,
        "kl_uniform": math.log(S) + plogp,
        "gini": gini,
        **tops,
        "top1pct_share": float(desc[:hub].sum() / total),
        "dead": S - alive,
        "entropy": -plogp,
    }


def _usage_of_nonzero(flat: torch.Tensor) -> dict[str, float]:
    """usage_metrics of a distribution with no negative entries, computed from its nonzero entries only: unused
    slots add nothing to any sum, sort first in ascending order and last in descending order, so 16.8M slots of
    which a few hundred thousand were used cost memory for those, not for every slot."""
    S = flat.numel()
    nz = flat[flat > 0].double()
    total = nz.sum()
    alive = nz.numel()
    if S == 0 or total <= 0:
        nan = float("nan")
        return {"used": 0.0, "kl_uniform": nan, "gini": nan, "top50": 0, "top90": 0, "top99": 0,
                "top1pct_share": nan, "dead": S, "entropy": nan}
    p = nz / total
    plogp = float((p * p.log()).sum())
    asc = nz.sort().values
    gini = 1.0 - 2.0 * float((asc / total).cumsum(0).sum() / S)  # the leading zeros' cumulative sums are 0
    return _metrics(asc, total, S, alive, plogp, gini)


def head_sum(x: torch.Tensor, layers: list[int], table_layers: list[int] | None = None) -> torch.Tensor:
    """(S,) ``x`` (n_layers, H, S) summed over heads and over ``table_layers`` (all layers when None), a row at a
    time (no (H, S) temporary: 0.5 GB of int64 at 16.8M slots)."""
    rows = range(x.shape[0]) if table_layers is None else [layers.index(L) for L in table_layers]
    out = torch.zeros(x.shape[-1], dtype=x.dtype)
    for li in rows:
        for h in range(x.shape[1]):
            out += x[li, h]
    return out


def report(stats: SlotStats) -> list[dict[str, Any]]:
    """Usage metrics for every table, layer and (layer, head), count- and weight-based, and for every
    (layer, head, half) of sub-keys (count-based): a list of rows {scope, table, layer, head, half, basis, ...}.

    A table's or a layer's distribution is over its S slots, summed over heads (and over the table's layers).
    """
    rows: list[dict[str, Any]] = []

    def add(scope: str, basis: str, mass: torch.Tensor, **where: Any) -> None:
        row = {"scope": scope, "table": None, "layer": None, "head": None, "half": None, "basis": basis}
        row.update(where)
        row.update(usage_metrics(mass))
        rows.append(row)

    # every sum is taken a (layer, head) row at a time and weights are made float a row at a time, so a 16.8M-slot
    # audit needs a few S-sized rows beside its counters, not copies of them
    units = stats.weight_units
    for name in stats.tables:
        layers = stats.tables[name]
        add("table", "count", head_sum(stats.counts, stats.layers, layers), table=name)  # over all heads
        add("table", "weight", head_sum(units, stats.layers, layers).double() / WEIGHT_SCALE, table=name)
    for li, L in enumerate(stats.layers):
        add("layer", "count", head_sum(stats.counts[li: li + 1], [0]), layer=L)
        add("layer", "weight", head_sum(units[li: li + 1], [0]).double() / WEIGHT_SCALE, layer=L)
        for h in range(stats.heads):
            add("head", "count", stats.counts[li, h], layer=L, head=h)
            add("head", "weight", units[li, h].double() / WEIGHT_SCALE, layer=L, head=h)
    for li, L in enumerate(stats.layers):
        for h in range(stats.heads):
            for half in (0, 1):
                add("subkey", "count", stats.subkey_counts[li, h, half], layer=L, head=h, half=half)
    return rows


def scope_label(row: dict[str, Any], short: bool = False) -> str:
    """A name for a report row's scope: 'table shared', 'layer 1', 'layer 1 head 2', 'sub-keys layer 1 head 2
    half 0' (short: 'layer 1 h2', 'keys 1 h2 half 0')."""
    if row["scope"] == "table":
        return f"table {row['table']}"
    if row["scope"] == "layer":
        return f"layer {row['layer']}"
    if row["scope"] == "head":
        return f"layer {row['layer']} {'h' if short else 'head '}{row['head']}"
    if short:
        return f"keys {row['layer']} h{row['head']} half {row['half']}"
    return f"sub-keys layer {row['layer']} head {row['head']} half {row['half']}"


# ---- comparing two audits ------------------------------------------------------------------------------
def compare(a: SlotStats, b: SlotStats, top: int = 10) -> dict[str, Any]:
    """How use changed from audit ``a`` to audit ``b``: per table, the slots that gained or lost the most use
    (accesses per 1,000 tokens, summed over heads), slots that died or came alive, and every metric's change."""
    if not a.same_shape(b):
        raise MemeditError("the two audits are of differently shaped memories (layers, N, heads or tables differ); "
                           "compare audits of the same model before and after a change")
    if a.tokens == 0 or b.tokens == 0:
        raise MemeditError("one of the audits covers no tokens")
    out: dict[str, Any] = {"tokens": [a.tokens, b.tokens], "same_model": a.fingerprint == b.fingerprint,
                           "fingerprints": [a.fingerprint, b.fingerprint], "tables": {}}
    for name in a.tables:
        ca, cb = a.table_counts(name).sum(0), b.table_counts(name).sum(0)  # (S,)
        ra, rb = ca.double() * 1000 / a.tokens, cb.double() * 1000 / b.tokens
        delta = rb - ra
        k = min(top, delta.numel())
        gain = delta.topk(k)
        loss = (-delta).topk(k)

        def slots(vals: torch.Tensor, ids: torch.Tensor, sign: float, ra=ra, rb=rb) -> list[dict[str, Any]]:
            return [{"slot": int(i), "before": float(ra[i]), "after": float(rb[i]), "change": sign * float(v)}
                    for v, i in zip(vals, ids, strict=True) if float(v) > 0]

        out["tables"][name] = {
            "gained": slots(gain.values, gain.indices, 1.0),
            "lost": slots(loss.values, loss.indices, -1.0),
            "died": int(((ca > 0) & (cb == 0)).sum()),
            "came_alive": int(((ca == 0) & (cb > 0)).sum()),
            "changed_slots": int((ca * b.tokens != cb * a.tokens).sum()),
        }
    ma, mb = report(a), report(b)
    out["metrics"] = [
        {"scope": scope_label(x), "basis": x["basis"],
         **{m: {"before": x[m], "after": y[m], "change": y[m] - x[m]} for m in METRICS}}
        for x, y in zip(ma, mb, strict=True) if x["scope"] in ("table", "layer")
    ]
    return out
