"""Per-model state kept in the model folder's ``memedit/`` subfolder, every write atomic.

    memedit/frozen.safetensors      one int64 tensor of row ids per value table ("shared", "layer4", ...)
    memedit/edits.jsonl             the edit history, one JSON object per applied or reverted patch
    memedit/background.safetensors  background slot statistics per value table:
                                    "df.{table}" (rows,) batches that accessed each row, "counts.{table}" (rows,)
                                    accesses; metadata "n_batches", "corpus", "tokens"
    memedit/patches/                the patch files the log refers to

Higher-level meaning (what may be frozen, how patches apply) lives in freeze.py and patch.py; this module
only reads and writes the files so that every tool (export, keys, edits) sees the same state.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import atomic_path, atomic_write_text, state_dir
from .errors import MemeditError
from .model import MemoryModel

FROZEN = "frozen.safetensors"
EDITS = "edits.jsonl"
BACKGROUND = "background.safetensors"
PATCHES = "patches"


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise MemeditError(f"{path} is corrupt ({e}); remove it or restore it from a backup") from None


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


# ---- frozen rows ----------------------------------------------------------------------------------
def frozen_rows(model: MemoryModel) -> dict[str, torch.Tensor]:
    """{table name: sorted int64 row ids} of the rows nothing may change (empty dict if none)."""
    if model.source is None:
        return {}
    path = Path(model.source) / "memedit" / FROZEN
    if not path.is_file():
        return {}
    tensors, _ = _read_tensors(path)
    return {k: v.long() for k, v in tensors.items()}


def write_frozen_rows(model: MemoryModel, rows: dict[str, torch.Tensor]) -> None:
    d = state_dir(model, create=True)
    rows = {k: torch.unique(v.long()) for k, v in rows.items() if v.numel()}
    _write_tensors(d / FROZEN, rows)


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
    """The model's edit history, oldest first (empty if none)."""
    if model.source is None:
        return []
    path = Path(model.source) / "memedit" / EDITS
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                raise MemeditError(f"{path}:{n} is not valid JSON; the edit log is damaged") from None
    return out


def write_edit_log(model: MemoryModel, entries: list[dict]) -> None:
    d = state_dir(model, create=True)
    atomic_write_text(d / EDITS, "".join(json.dumps(e) + "\n" for e in entries))


# ---- background statistics ----------------------------------------------------------------------------
def background(model: MemoryModel) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of the stored background statistics, or None if never computed."""
    if model.source is None:
        return None
    path = Path(model.source) / "memedit" / BACKGROUND
    if not path.is_file():
        return None
    return _read_tensors(path)


def write_background(model: MemoryModel, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    d = state_dir(model, create=True)
    _write_tensors(d / BACKGROUND, tensors, {k: str(v) for k, v in metadata.items()})
