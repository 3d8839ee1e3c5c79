"""Slot statistics and memory contents as one HDF5 file, readable without memedit (schema: docs/hdf5-schema.md).

Every array lives at the root with dimension scales (``layer``, ``head``, ``slot``, ``table``, ``half``,
``subkey``, ``rank``, ``token``), so ``xarray.open_dataset(path, engine="h5netcdf")`` opens the whole file as one
Dataset. gzip level 4 + shuffle, chunks of 64K slots, metadata as attributes, and an atomic write (temporary file
in the same folder, fsync, rename): a reader never sees half a file. This is the only module that imports h5py.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .. import limits
from ..errors import MemeditError
from ..lm.tokenizer import token_text
from ..storage.checkpoint import atomic_path, fingerprint
from ..storage.state import edit_log, frozen_mask
from ..tracing.readout import top_written_tokens as promoted_tokens  # the one readout (memedit/tracing/readout.py)
from ..version import __version__
from .stats import AFTER, BEFORE, POSITION_BITS, WEIGHT_SCALE, SlotStats, TopContexts

FORMAT = "memedit-slot-stats"
FORMAT_VERSION = 1
CHUNK = 65536  # slots per chunk (reference §9)
CONTEXT_CHUNK = 4096  # slots per chunk of the top contexts: `memedit slot` decompresses one chunk per dataset
FILTERS = {"compression": "gzip", "compression_opts": 4, "shuffle": True}


def _chunks(shape: tuple[int, ...], slot_axis: int, chunk: int = CHUNK) -> tuple[int, ...]:
    """One chunk = up to 64K slots of one (layer, head) row; whole extent along axes after the slot axis."""
    return tuple(min(n, chunk) if a == slot_axis else (n if a > slot_axis else 1) for a, n in enumerate(shape))


class _Writer:
    """Creates scales and datasets with the export's filters, attaching dimension scales by name."""

    def __init__(self, f: h5py.File):
        self.f = f

    def scale(self, name: str, values: np.ndarray, group: h5py.Group | None = None) -> None:
        g = group if group is not None else self.f
        opts = dict(FILTERS, chunks=(min(len(values), CHUNK),)) if len(values) > CHUNK else {}  # the slot scale
        d = g.create_dataset(name, data=values, **opts)
        d.make_scale(name)

    def array(self, name: str, data: np.ndarray, dims: tuple[str, ...], attrs: dict[str, Any] | None = None,
              slot_axis: int | None = None, group: h5py.Group | None = None, chunk: int = CHUNK) -> None:
        g = group if group is not None else self.f
        opts: dict[str, Any] = {}
        if data.size and slot_axis is not None:
            opts = dict(FILTERS, chunks=_chunks(data.shape, slot_axis, chunk))
        d = g.create_dataset(name, data=data, **opts)
        for i, dim in enumerate(dims):
            d.dims[i].attach_scale(g[dim])
        for k, v in (attrs or {}).items():
            d.attrs[k] = v

    def rows(self, name: str, shape: tuple[int, int, int], dtype, row, dims: tuple[str, ...],
             attrs: dict[str, Any] | None = None) -> None:
        """A (A, B, slots) dataset written a row at a time: ``row(a, b)`` gives the (slots,) row [a, b]; the same
        file as :meth:`array` of the whole array (chunks, filters, scales, attributes)."""
        opts = dict(FILTERS, chunks=_chunks(shape, 2)) if shape[0] * shape[1] * shape[2] else {}
        d = self.f.create_dataset(name, shape=shape, dtype=dtype, **opts)
        for a in range(shape[0]):
            for b in range(shape[1]):
                d[a, b] = row(a, b)
        for i, dim in enumerate(dims):
            d.dims[i].attach_scale(self.f[dim])
        for k, v in (attrs or {}).items():
            d.attrs[k] = v


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def write_stats(w: _Writer, stats: SlotStats, metrics: list[dict] | None) -> None:
    """The audit part: per-layer and per-table counts and weight mass, sub-key counts, metrics."""
    f = w.f
    f.attrs["corpus"] = stats.corpus
    f.attrs["tokens"] = np.int64(stats.tokens)
    f.attrs["fingerprint"] = stats.fingerprint
    if metrics is not None:
        f.attrs["metrics"] = json.dumps(metrics)
    # written a (layer or table, head) row at a time: at 16.8M slots a whole array is 0.5 GB, a row 134 MB
    L, H, S = stats.counts.shape
    w.rows("counts", (L, H, S), np.int64, lambda li, h: _np(stats.counts[li, h]), ("layer", "head", "slot"),
           attrs={"long_name": "times each slot was selected (in the final top-k) by each head"})
    w.rows("weights", (L, H, S), np.float64, lambda li, h: _np(stats.weight_units[li, h].double() / WEIGHT_SCALE),
           ("layer", "head", "slot"),
           attrs={"long_name": "sum of each slot's softmax weights", "resolution": 1 / WEIGHT_SCALE})
    w.array("subkey_counts", _np(stats.subkey_counts), ("layer", "head", "half", "subkey"), slot_axis=3,
            attrs={"long_name": "times each sub-key entered its half's stage-1 top-k"})
    names = list(stats.tables)
    rows = [[stats.layers.index(layer) for layer in stats.tables[n]] for n in names]
    w.rows("table_counts", (len(names), H, S), np.int64,
           lambda t, h: _np(sum(stats.counts[li, h] for li in rows[t])), ("table", "head", "slot"),
           attrs={"long_name": "accesses of each value row, summed over the layers reading the table"})
    w.rows("table_weights", (len(names), H, S), np.float64,
           lambda t, h: _np(sum(stats.weight_units[li, h] for li in rows[t]).double() / WEIGHT_SCALE),
           ("table", "head", "slot"),
           attrs={"long_name": "weight mass of each value row, summed over the layers reading it"})
    if stats.contexts is not None:
        _write_contexts(w, stats.contexts, names)


def _write_contexts(w: _Writer, c: TopContexts, names: list[str]) -> None:
    """Group `contexts`: per table and slot the top-M selections (docs/hdf5-schema.md)."""
    g = w.f.create_group("contexts")
    g.attrs["long_name"] = ("per slot of each value table, the M selections with the largest softmax weight over "
                            "all layers and heads reading it; ties to the smaller (document, position, layer, head)")
    g.attrs["before"], g.attrs["after"] = np.int64(BEFORE), np.int64(AFTER)
    S, M = next(iter(c.weight.values())).shape
    w.scale("table", np.asarray(names, dtype=h5py.string_dtype()), group=g)
    w.scale("slot", np.arange(S, dtype=np.int64), group=g)
    w.scale("context", np.arange(M, dtype=np.int64), group=g)
    w.scale("offset", np.arange(-BEFORE, AFTER + 1, dtype=np.int64), group=g)
    stack = lambda d: np.stack([_np(d[n]) for n in names])  # noqa: E731
    key, where = stack(c.key), stack(c.where).astype(np.int64)
    empty = stack(c.weight) < 0
    layers = np.asarray(c.layers, dtype=np.int64)
    dims = ("table", "slot", "context")
    put = lambda name, data, dims, long_name: w.array(  # noqa: E731
        name, data, dims, slot_axis=1, group=g, chunk=CONTEXT_CHUNK, attrs={"long_name": long_name})
    put("weight", np.where(empty, np.nan, stack(c.weight)).astype(np.float32), dims,
        "softmax weight of the selection (NaN: fewer than M selections)")
    put("document", np.where(empty, -1, key >> POSITION_BITS), dims,
        "global document id: the corpus's non-empty documents counted from 0 (-1: none)")
    put("position", np.where(empty, -1, key & ((1 << POSITION_BITS) - 1)), dims,
        "token position in the document, BOS at 0 (-1: none)")
    put("layer", np.where(empty, -1, layers[np.clip(where >> 8, 0, None)]), dims,
        "memory layer (block index) that selected the slot (-1: none)")
    put("head", np.where(empty, -1, where & 0xFF), dims, "head that selected the slot (-1: none)")
    put("tokens", stack(c.tokens), (*dims, "offset"),
        "token ids from 8 before to 2 after the position, within the sequence the model read (-1: outside it)")


def _read_contexts(f: h5py.File, stats_layers: list[int], tables: dict[str, list[int]]) -> TopContexts | None:
    if "contexts" not in f:
        return None
    g = f["contexts"]
    names = [x.decode() if isinstance(x, bytes) else str(x) for x in g["table"][()]]
    wt, doc, pos = g["weight"][()], g["document"][()], g["position"][()]
    layer, head, tok = g["layer"][()], g["head"][()], g["tokens"][()]
    empty = np.isnan(wt)
    li = np.searchsorted(np.asarray(stats_layers), np.clip(layer, 0, None))
    key = np.where(empty, np.iinfo(np.int64).max, (doc << POSITION_BITS) | np.clip(pos, 0, None))
    where = np.where(empty, -1, (li << 8) | head).astype(np.int16)
    t = lambda a, n: torch.from_numpy(np.ascontiguousarray(a[names.index(n)]))  # noqa: E731
    return TopContexts(
        layers=list(stats_layers), tables=tables, m=wt.shape[2],
        weight={n: t(np.where(empty, -1.0, wt).astype(np.float32), n) for n in tables},
        key={n: t(key, n) for n in tables}, where={n: t(where, n) for n in tables},
        tokens={n: t(tok.astype(np.int32), n) for n in tables})


def read_slot_usage(path: str | Path, table: str, slot: int, shape: tuple[list[int], int, int]) -> dict[str, Any]:
    """One slot's usage in an audit file: count and weight mass (all heads), its rank by count among the table's
    slots (1 = most used; ties share a rank), and per (layer, head) that selected it, count and weight. ``shape`` =
    (memory layers, N, heads) of the model, checked against the file. Reads the table's counts and the slot's
    column only."""
    with _open(path) as f:
        if "counts" not in f:
            raise MemeditError(f"{path} holds no slot statistics; give a file written by `memedit audit --out`")
        tables = json.loads(f.attrs["tables"])
        layers = [int(x) for x in f["layer"][()]]
        if (layers, int(f.attrs["n_keys"]), int(f.attrs["heads"])) != (list(shape[0]), shape[1], shape[2]):
            raise MemeditError(f"the audit {path} is of a differently shaped memory (layers {layers}, N "
                               f"{int(f.attrs['n_keys'])}, heads {int(f.attrs['heads'])}); audit this model")
        if table not in tables:
            raise MemeditError(f"the audit {path} has no value table {table!r}")
        t = list(tables).index(table)
        per_slot = f["table_counts"][t].sum(0)  # (S,) over heads
        count = int(per_slot[slot])
        heads = []
        for L in tables[table]:
            li = layers.index(L)
            c, wt = f["counts"][li, :, slot], f["weights"][li, :, slot]
            heads += [{"layer": L, "head": h, "count": int(c[h]), "weight": float(wt[h])}
                      for h in range(len(c)) if c[h] > 0]
        return {"audit": str(path), "corpus": str(f.attrs.get("corpus", "")), "tokens": int(f.attrs["tokens"]),
                "fingerprint": str(f.attrs.get("fingerprint", "")), "count": count,
                "weight": float(f["table_weights"][t, :, slot].sum()),
                "rank": int((per_slot > count).sum()) + 1 if count else None, "of": int(len(per_slot)),
                "used_slots": int((per_slot > 0).sum()), "heads": heads}


def read_slot_contexts(path: str | Path, table: str, slot: int) -> list[dict[str, Any]] | None:
    """One slot's top contexts from an audit file, reading only that slot's chunk; None if the audit kept none."""
    with _open(path) as f:
        if "contexts" not in f:
            return None
        g = f["contexts"]
        names = [x.decode() if isinstance(x, bytes) else str(x) for x in g["table"][()]]
        if table not in names:
            raise MemeditError(f"the audit {path} has no value table {table!r} (tables: {', '.join(names)})")
        t = names.index(table)
        wt = g["weight"][t, slot]
        cols = {k: g[k][t, slot] for k in ("document", "position", "layer", "head", "tokens")}
        return [{"document": int(cols["document"][r]), "position": int(cols["position"][r]), "weight": float(wt[r]),
                 "layer": int(cols["layer"][r]), "head": int(cols["head"][r]), "tokens": cols["tokens"][r].tolist()}
                for r in range(len(wt)) if not np.isnan(wt[r])]


def _layout(w: _Writer, stats: SlotStats | None, model: Any | None, top_k: int) -> None:
    """Root attributes and the dimension scales every array refers to (shapes from the model, else the stats)."""
    f = w.f
    if model is not None:
        mem, cfg = model.config.memory, model.config.to_dict()
        layers, tables = list(mem.layers), {t.name: list(t.layers) for t in model.tables}
        N, H, knn = mem.n_keys, mem.heads, mem.knn
    else:
        assert stats is not None
        cfg, layers, tables = stats.config, stats.layers, stats.tables
        N, H, knn = stats.n_keys, stats.heads, stats.knn
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["memedit_version"] = __version__
    f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    f.attrs["model_config"] = json.dumps(cfg)
    f.attrs["tables"] = json.dumps(tables)
    f.attrs["n_keys"], f.attrs["heads"], f.attrs["knn"] = np.int64(N), np.int64(H), np.int64(knn)
    w.scale("layer", np.asarray(layers, dtype=np.int64))
    w.scale("head", np.arange(H, dtype=np.int64))
    w.scale("slot", np.arange(N * N, dtype=np.int64))
    w.scale("half", np.arange(2, dtype=np.int64))
    w.scale("subkey", np.arange(N, dtype=np.int64))
    w.scale("table", np.asarray(list(tables), dtype=h5py.string_dtype()))
    reads = np.array([[L in tables[t] for L in layers] for t in tables], dtype=np.uint8)
    w.array("table_reads_layer", reads, ("table", "layer"), attrs={"long_name": "1 where the layer reads the table"})
    if model is not None and top_k > 0:
        w.scale("rank", np.arange(top_k, dtype=np.int64))


def write_audit(path: str | Path, stats: SlotStats, metrics: list[dict] | None = None) -> Path:
    """Write an audit's statistics to ``path`` (atomically); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        w = _Writer(f)
        _layout(w, stats, None, 0)
        f.attrs["contents"] = "audit"
        write_stats(w, stats, metrics)
    return path


def _row_norms(rows: torch.Tensor, block: int = 1 << 14) -> np.ndarray:
    """(n,) float32: the L2 norm of each row of a (mapped) table, upcast a block of rows at a time (64 MiB of
    float32 at V 1024) so a 1M-row bfloat16 table never becomes a 4 GiB float32 copy."""
    out = np.empty(rows.shape[0], dtype=np.float32)
    up = torch.empty(min(block, rows.shape[0]), rows.shape[1], device=rows.device)  # one buffer: see top_written_tokens
    for start in range(0, rows.shape[0], block):
        b = min(block, rows.shape[0] - start)
        up[:b].copy_(rows[start : start + b].detach())
        out[start : start + b] = _np(up[:b].norm(dim=1))
    return out


NO_TOP_TOKENS = ("top tokens skipped: a standalone memory module has no host language model, so a slot's value row "
                 "has no vocabulary to be read out in (convert the host LM with its memory to export them)")


def top_tokens_skipped(model: Any, top_k: int) -> bool:
    """True when ``export(..., top_k)`` leaves out the top promoted tokens: asked for, but the model is a standalone
    memory module (XLM PKM, product-key-memory) with no unembedding to read a value row out through."""
    return top_k > 0 and getattr(model, "output", None) is None


def export(path: str | Path, model: Any, stats: SlotStats | None = None, metrics: list[dict] | None = None,
           top_k: int = 10, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the memory's contents (value-row norms, sub-key norms, top promoted tokens per slot, frozen rows,
    the edit log) and, if given, an audit's statistics, to one HDF5 file; returns the path.

    A standalone memory module exports everything that needs no vocabulary; its file's ``note`` attribute says why
    the top tokens are missing (:data:`NO_TOP_TOKENS`). Everything sized by the slots is computed and written a
    block of rows at a time (memory stays bounded at a million slots); ``progress(rows done, rows total)`` is called
    after each block."""
    skipped = top_tokens_skipped(model, top_k)
    if skipped:
        top_k = 0
    path = Path(path)
    limits.count(top_k, "--top-tokens", 0, limits.MAX_TOP_TOKENS)
    vocab = getattr(model.config, "vocab_size", 0)
    if top_k > 0 and vocab and top_k > vocab:
        raise MemeditError(f"--top-tokens {top_k:,} is more than the vocabulary's {vocab:,} tokens")
    fp = fingerprint(model)
    if stats is not None:
        check_same_model(stats, model, fp)
    tables = model.tables
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        w = _Writer(f)
        _layout(w, stats, model, top_k)
        f.attrs["contents"] = "export"
        f.attrs["fingerprint"] = fp
        f.attrs["source"] = str(model.source or "")
        if skipped:
            f.attrs["note"] = NO_TOP_TOKENS
        if stats is not None:
            write_stats(w, stats, metrics)
        else:
            f.attrs["corpus"], f.attrs["tokens"] = "", np.int64(0)
        n_slots = model.config.memory.n_slots
        total, done = n_slots * (len(tables) + (len(model.memory_layers) if top_k > 0 else 0)), 0
        say = progress or (lambda done, total: None)
        norms = []
        for t in tables:
            norms.append(_row_norms(t.weight))
            done += n_slots
            say(done, total)
        w.array("value_norms", np.stack(norms),
                ("table", "slot"), slot_axis=1, attrs={"long_name": "L2 norm of each value row"})
        w.array("frozen", np.stack([_np(frozen_mask(model, t.name)).astype(np.uint8) for t in tables]),
                ("table", "slot"), slot_axis=1, attrs={"long_name": "1 where the value row is frozen"})
        layers = model.memory_layers
        w.array("key_norms", np.stack([_np(layers[L].keys4d.detach().float().norm(dim=-1)) for L in layers]),
                ("layer", "head", "half", "subkey"), slot_axis=3, attrs={"long_name": "L2 norm of each sub-key"})
        if top_k > 0:
            ids = f.create_dataset("top_tokens", shape=(len(layers), model.config.memory.n_slots, top_k),
                                   dtype=np.int32, **FILTERS,
                                   chunks=_chunks((len(layers), model.config.memory.n_slots, top_k), 1))
            logit = f.create_dataset("top_token_logits", shape=ids.shape, dtype=np.float32, **FILTERS,
                                     chunks=ids.chunks)
            # the readout's blocks are sized by the vocabulary; buffer whole HDF5 chunks so no chunk is
            # compressed, read back and recompressed for a partial write
            buf_ids = np.empty((ids.chunks[1], top_k), dtype=np.int32)
            buf_val = np.empty((ids.chunks[1], top_k), dtype=np.float32)
            for li, L in enumerate(layers):
                first = 0  # the first slot held in the buffers
                for start, top_ids, top_vals in promoted_tokens(model, L, top_k):
                    at, n = 0, len(top_ids)
                    while at < n:
                        off = start + at - first
                        take = min(n - at, len(buf_ids) - off)
                        buf_ids[off : off + take] = _np(top_ids[at : at + take])
                        buf_val[off : off + take] = _np(top_vals[at : at + take])
                        at += take
                        if off + take == len(buf_ids) or start + at == n_slots:
                            ids[li, first : first + off + take] = buf_ids[: off + take]
                            logit[li, first : first + off + take] = buf_val[: off + take]
                            first += off + take
                    done += n
                    say(done, total)
            for d in (ids, logit):
                for i, dim in enumerate(("layer", "slot", "rank")):
                    d.dims[i].attach_scale(f[dim])
            ids.attrs["long_name"] = ("tokens each slot's value row promotes most: the position-independent readout "
                                      "of memedit/tracing/readout.py (gate 1, final-norm weight, unembedding)")
            if model.tokenizer is not None:
                V = model.config.vocab_size
                w.scale("token", np.arange(V, dtype=np.int64))

                vocab = np.asarray([token_text(model.tokenizer, i) for i in range(V)], dtype=h5py.string_dtype())
                w.array("vocab", vocab, ("token",), attrs={"long_name": "the text each token id decodes to"})
        _write_edit_log(w, edit_log(model))
    return path


def _write_edit_log(w: _Writer, entries: list[dict]) -> None:
    """Writes the edit log as patch.log_edit writes it (value and key patches): an `edit` per entry, a `touched`
    per row."""
    g = w.f.create_group("edit_log")
    g.attrs["long_name"] = "the model's edit history (memedit/edits.jsonl), oldest first"
    string = h5py.string_dtype()
    try:
        ids = [str(e["id"]) for e in entries]
        actions = [str(e["op"]) for e in entries]
        touched = [(n, str(t), int(r)) for n, e in enumerate(entries) for t, rows in e["rows"].items() for r in rows]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MemeditError(f"the edit log memedit/edits.jsonl has an entry without a valid id, op or rows ({e}); "
                           "it was not written by memedit: restore it from a backup") from None
    w.scale("edit", np.arange(len(entries), dtype=np.int64), group=g)
    w.array("patch_id", np.asarray(ids, dtype=string), ("edit",), group=g)
    w.array("action", np.asarray(actions, dtype=string), ("edit",), group=g, attrs={"long_name": "apply or revert"})
    w.array("kind", np.asarray([str(e.get("kind", "")) for e in entries], dtype=string), ("edit",), group=g,
            attrs={"long_name": "what made the patch: set, add, ..., edit, keys (a sub-key patch)"})
    w.array("entry", np.asarray([json.dumps(e) for e in entries], dtype=string), ("edit",), group=g,
            attrs={"long_name": "the full log entry as JSON"})
    w.scale("touched", np.arange(len(touched), dtype=np.int64), group=g)
    w.array("touched_edit", np.asarray([x[0] for x in touched], dtype=np.int64), ("touched",), group=g,
            attrs={"long_name": "index into `edit` of the edit that touched the row"})
    w.array("touched_table", np.asarray([x[1] for x in touched], dtype=string), ("touched",), group=g)
    w.array("touched_row", np.asarray([x[2] for x in touched], dtype=np.int64), ("touched",), group=g)


# ---- reading back ------------------------------------------------------------------------------------------
def _open(path: str | Path) -> h5py.File:
    """An audit or export file opened for reading (one-line errors for a missing, foreign or newer file)."""
    path = Path(path)
    if not path.is_file():
        raise MemeditError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise MemeditError(f"{path} is not an HDF5 file; give a file written by `memedit audit --out`") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise MemeditError(f"{path} is not a memedit audit (no format={FORMAT!r} attribute); "
                           "make one with `memedit audit --out FILE.h5`")
    if int(f.attrs.get("format_version", 0)) > FORMAT_VERSION:
        f.close()
        raise MemeditError(f"{path} was written by a newer memedit; upgrade memedit")
    return f


def read_audit(path: str | Path) -> SlotStats:
    """The slot statistics stored in an audit or export file (``memedit audit --out`` / ``memedit export``)."""
    path = Path(path)
    with _open(path) as f:
        if "counts" not in f:
            raise MemeditError(f"{path} holds no slot statistics (an export without --stats); "
                               "give a file written by `memedit audit --out`")
        try:
            # a (layer, head) row at a time: at 16.8M slots a whole array is 0.5 GB, and converting it whole took
            # three more of them at once
            counts = torch.empty(f["counts"].shape, dtype=torch.int64)
            units = torch.empty(f["weights"].shape, dtype=torch.int64)
            for li in range(counts.shape[0]):
                for h in range(counts.shape[1]):
                    counts[li, h] = torch.from_numpy(f["counts"][li, h].astype(np.int64, copy=False))
                    units[li, h] = torch.from_numpy(np.rint(f["weights"][li, h] * WEIGHT_SCALE).astype(np.int64))
            return SlotStats(
                layers=[int(x) for x in f["layer"][()]], tables=json.loads(f.attrs["tables"]),
                n_keys=int(f.attrs["n_keys"]), heads=int(f.attrs["heads"]), knn=int(f.attrs["knn"]),
                counts=counts,
                weight_units=units,
                subkey_counts=torch.from_numpy(f["subkey_counts"][()].astype(np.int64)),
                tokens=int(f.attrs["tokens"]), corpus=str(f.attrs.get("corpus", "")),
                fingerprint=str(f.attrs.get("fingerprint", "")), config=json.loads(f.attrs["model_config"]),
                contexts=_read_contexts(f, [int(x) for x in f["layer"][()]], json.loads(f.attrs["tables"])),
            )
        except (KeyError, ValueError, TypeError, OSError, IndexError, RuntimeError) as e:
            raise MemeditError(f"{path} is a damaged memedit audit ({type(e).__name__}: {str(e)[:160]})") from None


def check_same_model(stats: SlotStats, model: Any, fp: str | None = None) -> None:
    """Refuse statistics that were gathered on a different model (by fingerprint, else by shape)."""
    fp = fp or fingerprint(model)
    mem = model.config.memory
    if (stats.layers, stats.n_keys, stats.heads) != (list(mem.layers), mem.n_keys, mem.heads):
        raise MemeditError(f"the statistics are of a differently shaped memory (layers {stats.layers}, N "
                           f"{stats.n_keys}, heads {stats.heads}); audit this model with `memedit audit --out`")
    if stats.fingerprint and stats.fingerprint != fp:
        raise MemeditError(f"the statistics were gathered on a different model (fingerprint {stats.fingerprint}, "
                           f"this model {fp}); audit this model with `memedit audit --out`")
