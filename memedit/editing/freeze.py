"""Frozen value rows: rows that no patch, fact edit or key update may change.

Stored per table in the model folder's ``memedit/frozen.safetensors`` (see state.py). The same file also holds
frozen sub-keys ("keys.layer{L}", which keyspace honours); this module only touches value-table entries and keeps
every other entry as it found it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .. import limits
from ..auditing.hdf5 import check_same_model, read_audit
from ..errors import MemeditError
from ..lm.model import MemoryModel
from ..storage.state import frozen_rows, write_frozen_rows
from ..storage.store import store_of
from ..tracing.capture import core_set
from .background import get
from .patch import MAX_ROWS, check_rows, lineage, parse_rows


def frozen(model: MemoryModel) -> dict[str, list[int]]:
    """{value table: sorted frozen row ids} (tables with none are left out)."""
    names = {t.name for t in model.tables}
    return {k: v.tolist() for k, v in frozen_rows(model).items() if k in names and v.numel()}


def freeze(model: MemoryModel, rows: dict[str, Sequence[int]]) -> dict[str, int]:
    """Add rows {table: ids} to the frozen set; returns {table: rows newly frozen}."""
    with store_of(model).locked():  # read-modify-write of the frozen set: one writer at a time
        return _freeze(model, rows)


def _freeze(model: MemoryModel, rows: dict[str, Sequence[int]]) -> dict[str, int]:
    state = frozen_rows(model)  # every entry, including sub-key entries this module does not own
    added = {}
    for name, ids in rows.items():
        t = model.table(name)
        if not len(ids):
            added[t.name] = 0
            continue
        new = check_rows(model, t.name, list(dict.fromkeys(int(i) for i in ids)))
        old = state.get(t.name, torch.zeros(0, dtype=torch.long))
        merged = torch.unique(torch.cat([old, new]))
        added[t.name] = merged.numel() - old.numel()
        state[t.name] = merged
    write_frozen_rows(model, state)
    return added


def unfreeze(model: MemoryModel, rows: dict[str, Sequence[int]] | None = None) -> dict[str, int]:
    """Remove rows {table: ids} (None: every value-table row) from the frozen set; returns {table: rows freed}."""
    with store_of(model).locked():
        return _unfreeze(model, rows)


def _unfreeze(model: MemoryModel, rows: dict[str, Sequence[int]] | None) -> dict[str, int]:
    state = frozen_rows(model)
    freed = {}
    if rows is None:
        targets = {t.name: None for t in model.tables}
    else:
        targets = {model.table(k).name: v for k, v in rows.items()}
    for name, ids in targets.items():
        old = state.get(name, torch.zeros(0, dtype=torch.long))
        if ids is None:
            keep = torch.zeros(0, dtype=torch.long)
        else:
            keep = old[~torch.isin(old, torch.as_tensor(list(ids), dtype=torch.long))]
        freed[name] = old.numel() - keep.numel()
        state[name] = keep
    write_frozen_rows(model, state)
    return freed


def fact_rows(model: MemoryModel, prompts: Sequence[str]) -> dict[str, list[int]]:
    """The rows of a fact's core set: slots every one of its phrasings selects at the answer position."""
    return core_set(model, prompts)


def hot_rows(model: MemoryModel, n: int, stats: str | Path | None = None) -> dict[str, list[int]]:
    """The ``n`` most-read rows of each table: by an audit file's access counts (``memedit audit --out``) when
    ``stats`` is given, else by background statistics (stored, or computed in memory)."""
    if n <= 0:
        raise MemeditError("--hot needs a positive number of rows")
    rows = min(t.n_rows for t in model.tables)
    if n > rows:
        raise MemeditError(f"--hot {n:,} is more rows than a table has ({rows:,}): that freezes every row")
    if stats is not None:
        counts = audit_counts(model, stats)
    else:
        counts = get(model).counts
    return {t.name: counts[t.name].argsort(descending=True, stable=True)[:n].tolist() for t in model.tables}


def audit_counts(model: MemoryModel, path: str | Path) -> dict[str, torch.Tensor]:
    """{table: (rows,) accesses over every layer and head reading it} from an audit file of this model.

    An audit of this model folder before one of its logged edits is accepted; one of another model is refused.
    """
    stats = read_audit(path)
    ours = stats.fingerprint in lineage(model)
    check_same_model(stats, model, fp=stats.fingerprint if ours else None)
    if set(stats.tables) != {t.name for t in model.tables}:
        raise MemeditError(f"{path} audits tables {sorted(stats.tables)}, this model has "
                           f"{sorted(t.name for t in model.tables)}; audit this model with `memedit audit --out`")
    return {t.name: stats.table_counts(t.name).sum(0) for t in model.tables}  # (H, S) -> (S,)


def rows_from_file(path: str | Path) -> list[int]:
    """Row ids from a text file (ids or ranges, separated by commas, spaces or newlines) or a .npy array."""
    path = limits.input_file(path, "rows file")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)  # a pickled array is refused unread
        except (ValueError, OSError, EOFError) as e:
            raise MemeditError(f"cannot read {path} as a .npy array of row ids ({e})") from None
        if not np.issubdtype(arr.dtype, np.integer):
            raise MemeditError(f"{path} holds {arr.dtype} values; row ids must be integers")
        if arr.size > MAX_ROWS:
            raise MemeditError(f"{path} holds {arr.size:,} row ids; at most {MAX_ROWS:,} can be given at once")
        return [limits.row_id(int(x)) for x in arr.ravel()]
    return parse_rows(" ".join(limits.read_lines(path, "rows file")).split())
