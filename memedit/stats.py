"""Streaming slot statistics and the usage metrics of XLM's memory evaluation (reference §5).

:class:`SlotStats` holds, per memory layer and head, how often each slot was selected and the softmax weight mass
it received, and per (layer, head, half) how often each sub-key entered a stage-1 top-k. Weight mass is kept as
an integer number of 2^-32 units, so statistics merge by exact integer addition: audits of corpus shards (or of
the ranks of a distributed run) sum to bit-identical results, whatever the order.

:class:`SlotCounter` fills a SlotStats from the one lookup routine through :func:`memedit.capture.on_lookup`,
with ``index_add_`` on the captured indices (no Python loop per token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import MemeditError
from .memory import Lookup
from .model import MemoryModel

WEIGHT_SCALE = 2.0**32  # weight mass is stored as round(w * 2^32) per access
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
    fingerprint: str = ""  # memedit.checkpoint.fingerprint of the model
    config: dict[str, Any] = field(default_factory=dict)  # the model config as a dict

    @classmethod
    def empty(cls, model: MemoryModel, corpus: str = "", fingerprint: str = "") -> SlotStats:
        """Zero statistics shaped for ``model``."""
        mem = model.config.memory
        if not mem.layers:
            raise MemeditError("this model has no memory layers: nothing to audit")
        nl, H, N = len(mem.layers), mem.heads, mem.n_keys
        z = lambda *shape: torch.zeros(shape, dtype=torch.int64)  # noqa: E731
        return cls(
            layers=list(mem.layers), tables={t.name: list(t.layers) for t in model.tables}, n_keys=N, heads=H,
            knn=mem.knn, counts=z(nl, H, N * N), weight_units=z(nl, H, N * N), subkey_counts=z(nl, H, 2, N),
            corpus=corpus, fingerprint=fingerprint, config=model.config.to_dict(),
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
        return self.counts[[self.layer_index(L) for L in self.tables[name]]].sum(0)

    def table_weights(self, name: str) -> torch.Tensor:
        """(H, S) float64 weight mass of a value table's rows, summed over its layers."""
        return self.weight_units[[self.layer_index(L) for L in self.tables[name]]].sum(0).double() / WEIGHT_SCALE

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
        )


class SlotCounter:
    """A lookup observer that adds every lookup into a :class:`SlotStats` (use with ``on_lookup``).

    Set ``mask`` ((n_tokens,) bool, the flattened batch) before each forward to leave out padding positions.
    """

    def __init__(self, stats: SlotStats):
        self.stats = stats
        self.mask: torch.Tensor | None = None
        H, N, S = stats.heads, stats.n_keys, stats.n_slots
        self._slot_offset = (torch.arange(H) * S).view(1, H, 1)  # (1, H, 1): head h's slots start at h*S
        self._subkey_offset = (torch.arange(H * 2) * N).view(1, H, 2, 1)  # (1, H, 2, 1)

    def __call__(self, layer: int, lk: Lookup) -> None:
        s, li = self.stats, self.stats.layer_index(layer)
        idx, w, stage1 = lk.indices, lk.weights, lk.stage1
        if self.mask is not None:
            m = self.mask.to(idx.device)
            idx, w, stage1 = idx[m], w[m], stage1[m]
        idx, w, stage1 = idx.cpu(), w.cpu(), stage1.cpu()
        flat = (idx + self._slot_offset).reshape(-1)  # (n*H*k,) into the (H*S) view of this layer
        s.counts[li].view(-1).index_add_(0, flat, torch.ones_like(flat))
        units = (w.double() * WEIGHT_SCALE).round_().long().reshape(-1)  # exact: w is float32
        s.weight_units[li].view(-1).index_add_(0, flat, units)
        sub = (stage1 + self._subkey_offset).reshape(-1)  # (n*H*2*k,) into the (H*2*N) view
        s.subkey_counts[li].view(-1).index_add_(0, sub, torch.ones_like(sub))


# ---- metrics (reference §5) -------------------------------------------------------------------------------
def usage_metrics(mass: torch.Tensor) -> dict[str, float]:
    """XLM's usage metrics of one distribution of use over slots (counts or weight mass, any shape, flattened).

    used (% of slots with p > 0), kl_uniform (log S + sum p log p), gini (1 - 2 mean of the ascending cumulative
    p), top50/top90/top99 (fewest most-used slots holding that % of the mass), top1pct_share (share of the top 1%
    of slots, at least one), dead (slots never used), entropy (-sum p log p, nats).
    """
    m = mass.detach().double().flatten().cpu()
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
    gini = 1.0 - 2.0 * float(p.sort().values.cumsum(0).mean())
    desc = m.sort(descending=True).values
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

    w = stats.weights
    for name in stats.tables:
        add("table", "count", stats.table_counts(name).sum(0), table=name)  # a slot's use over all heads
        add("table", "weight", stats.table_weights(name).sum(0), table=name)
    for li, L in enumerate(stats.layers):
        add("layer", "count", stats.counts[li].sum(0), layer=L)
        add("layer", "weight", w[li].sum(0), layer=L)
        for h in range(stats.heads):
            add("head", "count", stats.counts[li, h], layer=L, head=h)
            add("head", "weight", w[li, h], layer=L, head=h)
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
