"""Per-model state kept in the model folder's ``memedit/`` subfolder, every write made by the store (store.py).

    memedit/frozen.safetensors      one int64 tensor of row ids per value table ("shared", "layer4", ...)
    memedit/rows.log                the row log (store.py), from which the edit history is read
    memedit/edits.jsonl             the edit history of folders written by memedit < 0.2 (`memedit check --upgrade`
                                    moves it into rows.log)
    memedit/background.safetensors  background slot statistics per value table:
                                    "df.{table}" (rows,) batches that accessed each row, "counts.{table}" (rows,)
                                    accesses; metadata "n_batches", "corpus", "tokens"
    memedit/patches/                the patch files the log refers to

Higher-level meaning (what may be frozen, how patches apply) lives in freeze.py and patch.py; this module
only reads and writes the files so that every tool (export, keys, edits) sees the same state.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..lm.model import MemoryModel
from .folder import EDITS, FROZEN, _damaged, _read_tensors, frozen_rows, legacy_log  # noqa: F401 (re-exported)
from .store import LOG, replace_file, scan_log

BACKGROUND = "background.safetensors"
PATCHES = "patches"


def _write_tensors(model: MemoryModel, name: str, tensors: dict[str, torch.Tensor],
                   metadata: dict[str, str] | None = None) -> None:
    replace_file(model, name, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                                    metadata=metadata))


# ---- frozen rows ----------------------------------------------------------------------------------
def write_frozen_rows(model: MemoryModel, rows: dict[str, torch.Tensor]) -> None:
    """Replace the frozen set (under the writers' lock; a read-modify-write holds the lock around both)."""
    rows = {k: torch.unique(v.long()) for k, v in rows.items() if v.numel()}
    _write_tensors(model, FROZEN, rows)


def frozen_mask(model: MemoryModel, table: str) -> torch.Tensor:
    """A bool mask (rows,) of the frozen rows of ``table``."""
    t = model.table(table)
    mask = torch.zeros(t.n_rows, dtype=torch.bool)
    ids = frozen_rows(model).get(t.name)
    if ids is not None:
        mask[ids] = True
    return mask


# ---- edit log -------------------------------------------------------------------------------------
def edit_log(model: MemoryModel) -> list[dict]:
    """The model's edit history, oldest first (empty if none): read from the row log's records, so the log and the
    weights cannot disagree (or, for a folder written before the row log, from its edits.jsonl)."""
    if model.source is None:
        return []
    d = Path(model.source) / "memedit"
    if (d / LOG).is_file():
        return [r.entry() for r in scan_log(d / LOG, with_rows=False)[0]]
    return legacy_log(d / EDITS)


# ---- background statistics ----------------------------------------------------------------------------
def background(model: MemoryModel) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of the stored background statistics, or None if never computed."""
    if model.source is None:
        return None
    path = Path(model.source) / "memedit" / BACKGROUND
    if not path.exists():
        return None
    tensors, meta = _read_tensors(path)
    rows = {t.name: t.n_rows for t in model.tables}
    for k, v in tensors.items():
        kind, _, table = k.partition(".")
        if kind not in ("df", "counts") or table not in rows:
            raise _damaged(path, f"{k!r} is not a statistic of a value table")
        if v.dim() != 1 or v.numel() != rows[table] or v.is_complex() or v.dtype == torch.bool:
            raise _damaged(path, f"{k} is a {tuple(v.shape)} {v.dtype} tensor; expected ({rows[table]},) counts")
        if v.numel() and not (torch.isfinite(v.double()).all() and v.double().min() >= 0):
            raise _damaged(path, f"{k} holds NaN, inf or negative counts")
    for k in ("n_batches", "tokens"):
        try:
            if int(meta.get(k, "0")) < 0:
                raise ValueError
        except ValueError:
            raise _damaged(path, f"{k} = {meta.get(k)!r} is not a count") from None
    return tensors, meta


def write_background(model: MemoryModel, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    _write_tensors(model, BACKGROUND, tensors, {k: str(v) for k, v in metadata.items()})
