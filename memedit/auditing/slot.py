"""What is this slot? Everything memedit knows about one value row, as plain data (`memedit slot ID`).

A slot of a value table is read by every memory layer that reads the table; slot id ``s = i * N + j`` is selected by
head h of layer L when the sum of its sub-key scores ``s1[i] + s2[j]`` is among the head's top k. So a slot has:
per (layer, head) its two sub-keys and their norms; one value row; what that row writes through each reading
layer (the position-independent readout of memedit/tracing/readout.py); how an audit saw it used (counts, weight mass,
rank, the heads that selected it, its top contexts with ``audit --contexts M``); whether it is frozen; and the
patches in the edit log that touched its value row or its sub-keys.

On a native model folder only the tensors needed are read (memory-mapped safetensors slices), so a 1M-slot model
answers in about a second; a loaded :class:`~memedit.lm.model.MemoryModel` works as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import MemeditError
from ..lm.model import MemoryModel, ModelConfig
from ..lm.tokenizer import token_text
from ..storage.checkpoint import is_native, load_native
from ..storage.state import edit_log, frozen_rows
from ..tracing.readout import Readout, slot_writes
from .hdf5 import read_slot_contexts, read_slot_usage


@dataclass
class _Weights:
    """The few tensors a slot view needs, from a loaded model or lazily from a native folder's safetensors."""

    config: ModelConfig
    tokenizer: Any
    source: str | None  # the model folder (for frozen rows and the edit log), None for an in-memory model
    tables: dict[str, list[int]]  # value table -> the layers that read it
    _model: MemoryModel | None = None
    _file: Any = None  # safetensors safe_open handle

    @classmethod
    def of(cls, model: MemoryModel | str | Path) -> _Weights:
        if isinstance(model, MemoryModel):
            return cls(model.config, model.tokenizer, model.source, {t.name: list(t.layers) for t in model.tables},
                       _model=model)

        path = Path(model).expanduser()
        if not (path.is_dir() and is_native(path)):
            raise MemeditError(f"{path} is not a native memedit folder")
        # the store maps the base (nothing is read until used) and applies the row log's records, so the view
        # shows the folder's current rows, edits included
        m = load_native(path)
        return cls(m.config, m.tokenizer, m.source, {t.name: list(t.layers) for t in m.tables}, _model=m)

    def tensor(self, name: str, rows: list[int] | None = None) -> torch.Tensor | None:
        """The named tensor (float32), or only ``rows`` of it; None if the model has no such tensor."""
        if self._model is not None:
            t = self._model.state_dict(keep_vars=True).get(name)
            if t is None:
                return None
            return (t[rows] if rows is not None else t).detach().float()
        if name not in self._file.keys():
            return None
        if rows is None:
            return self._file.get_tensor(name).float()
        sl = self._file.get_slice(name)
        return torch.stack([sl[r : r + 1][0] for r in rows]).float()

    def readout(self, layer: int) -> Readout | None:
        if self._model is not None:
            return Readout.of(self._model, layer) if self._model.output is not None else None
        out = self.tensor("output.weight")
        if out is None:
            return None
        tok = self.tokenizer
        return Readout(value_proj=self.tensor(f"layers.{layer}.feed_forward.value_proj.weight"),
                       norm_weight=self.tensor("norm.weight"), unembed=out,
                       decodable=min(out.shape[0], tok.vocab_size) if tok is not None else out.shape[0])


def _table(w: _Weights, slot: int, table: str | None) -> str:
    S = w.config.memory.n_slots
    if not 0 <= slot < S:
        raise MemeditError(f"slot {slot} is outside 0..{S - 1} (this memory has {S:,} slots)")
    if table is None:
        if len(w.tables) > 1:
            raise MemeditError(f"this model has one value table per layer ({', '.join(w.tables)}): say which with "
                               "--table")
        return next(iter(w.tables))
    for name, layers in w.tables.items():
        if table == name or (table.isdigit() and int(table) in layers):
            return name
    raise MemeditError(f"no value table {table!r} in this model (tables: {', '.join(w.tables)})")


def slot_info(model: MemoryModel | str | Path, slot: int, table: str | None = None, stats: str | Path | None = None,
              n: int = 5) -> dict[str, Any]:
    """Everything about one slot as plain data (the --json schema of `memedit slot`): sub-keys and their norms per
    (layer, head), value-row norm, what it writes per reading layer, frozen state, the edits that touched it, and
    with ``stats`` (an audit file) its usage and top contexts.

    The audit is checked against the model by shape (layers, N, heads), not by fingerprint: a fingerprint hashes
    every weight, which is what this function avoids reading; ``usage["fingerprint"]`` says which model it was.
    """
    w = _Weights.of(model)
    mem = w.config.memory
    name = _table(w, slot, table)
    layers = w.tables[name]
    N, H = mem.n_keys, mem.heads
    i, j = divmod(slot, N)
    row = w.tensor(f"layers.{layers[0]}.feed_forward.values.weight", [slot])  # (1, V)
    keys = []
    for L in layers:
        kname = f"layers.{L}.feed_forward.keys"  # (2*H*N, K/2): row h*2N + half*N + index
        sub = w.tensor(kname, [r for h in range(H) for r in (h * 2 * N + i, h * 2 * N + N + j)]).view(H, 2, -1)
        keys.append({"layer": L, "heads": [{"head": h, "i_norm": float(sub[h, 0].norm()),
                                            "j_norm": float(sub[h, 1].norm())} for h in range(H)]})
    writes = []
    for L in layers:
        ro = w.readout(L)
        if ro is not None:
            (wr,) = slot_writes(w._model if w._model is not None else _Tok(w.tokenizer), L, [slot], n=n, readout=ro,
                                rows=row)
            writes.append({"layer": L,
                           "promotes": [{"token": t, "token_id": i, "logit": x}
                                        for (t, x), i in zip(wr["promotes"], wr["promote_ids"], strict=True)],
                           "suppresses": [{"token": t, "token_id": i, "logit": x}
                                          for (t, x), i in zip(wr["suppresses"], wr["suppress_ids"], strict=True)]})
    out: dict[str, Any] = {
        "slot": slot, "table": name, "layers": layers, "i": i, "j": j, "n_keys": N, "sub_keys": keys,
        "value_norm": float(row[0].norm()), "writes": writes, "frozen": _frozen(w, name, slot),
        "edits": _edits(w, name, layers, slot, i, j), "usage": None, "contexts": None,
    }
    if stats is not None:
        out["usage"], out["contexts"] = _usage(w, stats, name, slot)
    return out


@dataclass
class _Tok:
    """Stands in for a model where slot_writes only needs the tokenizer (the tensors come as ``readout``)."""

    tokenizer: Any


def _frozen(w: _Weights, table: str, slot: int) -> bool:
    rows = frozen_rows(w._model) if w.source else {}
    return bool((rows.get(table, torch.empty(0, dtype=torch.long)) == slot).any())


def _edits(w: _Weights, table: str, layers: list[int], slot: int, i: int, j: int) -> list[dict[str, Any]]:
    """Log entries (value or key patches) that touched this slot's value row or one of its sub-keys."""
    N, H = w.config.memory.n_keys, w.config.memory.heads
    key_rows = {r for h in range(H) for r in (h * 2 * N + i, h * 2 * N + N + j)}
    out = []
    for e in edit_log(w) if w.source else []:
        rows = e.get("rows") or {}
        what = []
        if slot in set(rows.get(table, [])):
            what.append("value row")
        for L in layers:
            hit = key_rows & set(rows.get(f"layers.{L}.feed_forward.keys", []))
            if hit:
                what.append(f"sub-keys of layer {L}")
        if what:
            out.append({"id": e.get("id"), "op": e.get("op"), "kind": e.get("kind"), "time": e.get("time"),
                        "message": e.get("message"), "touched": what})
    return out


def _usage(w: _Weights, stats: str | Path, table: str, slot: int) -> tuple[dict[str, Any], list[dict] | None]:
    """The slot's usage from an audit file (reading only what it needs) and its top contexts (None if not kept)."""
    mem = w.config.memory
    u = read_slot_usage(stats, table, slot, (list(mem.layers), mem.n_keys, mem.heads))
    ctx = read_slot_contexts(stats, table, slot)
    if ctx is not None:
        tok = w.tokenizer
        for c in ctx:
            c["text"] = [token_text(tok, t) if t >= 0 else None for t in c["tokens"]]
    return u, ctx
