"""Value-row patches: making them the way `memedit patch OP` does (set, add, scale, zero, copy), applying an edit's
patch, and comparing two models' value tables.

The patch itself, its file format and the one path that applies and reverts it belong to the store
(memedit/storage/patch.py); this module makes value-row patches from what a user asks for, refusing bad input in
one line before anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .. import limits
from ..errors import MemeditError
from ..lm.model import MemoryModel
from ..storage.folder import native_state
from ..storage.patch import (  # noqa: F401 (re-exported: the patch operations every caller of editing uses)
    Patch,
    applied_ids,
    find_patch,
    lineage,
    revert,
    write_rows,
)
from ..storage.patch import apply as apply_patch
from ..storage.store import Change, check_changes, fingerprint

MAX_ROWS = 1 << 24  # a larger row list is a typo, and expanding it would exhaust memory


def parse_rows(spec: Sequence[str] | str) -> list[int]:
    """Row ids from "3,7,10-12" style specs (ranges inclusive), in the given order, duplicates dropped."""
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[int] = []
    for item in items:
        for part in str(item).replace(" ", ",").split(","):
            if not part:
                continue
            try:
                if "-" in part:
                    a, b = part.split("-", 1)
                    lo, hi = limits.row_id(int(a)), limits.row_id(int(b))
                    if hi < lo:
                        raise ValueError
                    if hi - lo + 1 + len(out) > MAX_ROWS:  # bounded before it is expanded
                        raise MemeditError(f"row range {part} has {hi - lo + 1:,} rows; at most {MAX_ROWS:,} rows "
                                           "can be given at once")
                    out.extend(range(lo, hi + 1))
                else:
                    out.append(limits.row_id(int(part)))
            except ValueError:
                raise MemeditError(f"bad row spec {part!r}: use ids and inclusive ranges, e.g. 3,7,10-12") from None
    seen: set[int] = set()
    return [r for r in out if not (r in seen or seen.add(r))]


def check_rows(model: MemoryModel, table: str, rows: Sequence[int]) -> torch.Tensor:
    """The row ids as a sorted int64 tensor, after checking they exist in ``table``."""
    t = model.table(table)
    if len(rows) == 0:
        raise MemeditError("no rows given: pass --rows, e.g. --rows 3,7,10-12")
    rows = rows.tolist() if isinstance(rows, torch.Tensor) else [int(r) for r in rows]
    bad = [r for r in rows if not 0 <= r < t.n_rows]  # before a tensor: an id past int64 cannot become one
    if bad:
        raise MemeditError(f"row {bad[0]} is out of range: table {t.name} has rows 0..{t.n_rows - 1}")
    ids = torch.as_tensor(rows, dtype=torch.long)
    if torch.unique(ids).numel() != ids.numel():
        raise MemeditError("a row is listed twice; give each row once")
    return ids


def make_patch(model: MemoryModel, updates: dict[str, tuple[Sequence[int] | torch.Tensor, torch.Tensor]],
               message: str = "", kind: str = "set", info: dict | None = None, base: str | None = None) -> Patch:
    """A patch setting ``updates`` = {table: (row ids (n,), new rows (n, V))} on ``model``'s current rows.

    New rows are cast to the table's dtype; rows out of range, a wrong width, NaN/inf and frozen rows are refused.
    Rows whose new bytes equal the old are dropped (a no-op row would only make the patch larger).
    ``base``: the model's fingerprint, when the caller took it before writing rows into the table and restoring
    them (an edit's training): a table written in place is otherwise hashed whole again (2 s at a million slots).
    """
    limits.text(message, "the patch message (--message)", 10_000)
    changes = []
    for name, (rows, new) in updates.items():
        t = model.table(name)
        ids = check_rows(model, t.name, rows.tolist() if isinstance(rows, torch.Tensor) else rows)
        new = torch.as_tensor(new)
        V = t.weight.shape[1]
        if new.dim() == 1:
            new = new.expand(ids.numel(), -1)
        if new.dim() != 2 or new.shape[1] != V:
            raise MemeditError(f"new rows have width {new.shape[-1] if new.dim() else 1}, table {t.name} rows have "
                               f"width {V}")
        if new.shape[0] != ids.numel():
            raise MemeditError(f"{new.shape[0]} new rows given for {ids.numel()} row ids")
        if not torch.isfinite(new.float()).all():
            raise MemeditError("the new values contain NaN or inf; nothing was written")
        new = new.to(t.weight.dtype)
        if not torch.isfinite(new.float()).all():
            raise MemeditError(f"the new values overflow the table's dtype {t.weight.dtype}; nothing was written")
        order = ids.argsort()
        ids, new = ids[order], new[order]
        old = t.weight.detach()[ids].clone()
        changed = (old.view(torch.uint8).reshape(len(ids), -1) != new.view(torch.uint8).reshape(len(ids), -1)).any(1)
        ids, old, new = ids[changed], old[changed], new[changed].clone()
        if ids.numel():
            changes.append(Change(t.state_names[0], t.name, ids, old, new, list(t.layers)))
    if not changes:
        raise MemeditError("the patch changes nothing: every new row equals the current one")
    check_changes(model, changes)  # frozen rows, and every rule a write must pass (the store's one validation)
    return Patch(changes, base=base or fingerprint(model), message=message, kind=kind, info=dict(info or {}))


OPS = ("set", "add", "scale", "zero", "copy")


def load_values(path: str | Path) -> torch.Tensor:
    """New values from a ``.npy`` file or a ``.safetensors`` file (its only tensor, or the one named "values")."""
    path = Path(path)
    if not path.is_file():
        raise MemeditError(f"values file {path} does not exist")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)  # a pickled array is refused unread
        except (ValueError, OSError, EOFError) as e:
            raise MemeditError(f"cannot read {path} as a numeric .npy array ({e})") from None
        return _real_values(torch.from_numpy(_plain_numbers(arr, path)), path)
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise MemeditError(f"cannot read {path} ({e})") from None
        if "values" in tensors:
            return _real_values(tensors["values"], path)
        if len(tensors) != 1:
            raise MemeditError(f"{path} holds {len(tensors)} tensors; name the one to use \"values\"")
        return _real_values(next(iter(tensors.values())), path)
    raise MemeditError(f"values must come from a .npy or .safetensors file, not {path.name}")


def _plain_numbers(arr, path: Path):
    """A .npy array as one torch can hold: real numbers only (complex, unsigned 64-bit, objects are refused)."""
    if np.iscomplexobj(arr):
        raise MemeditError(f"{path} holds complex values ({arr.dtype}); value rows are real: give real numbers")
    if arr.dtype == np.uint64:
        raise MemeditError(f"{path} holds uint64 values; give float32 (or a signed integer type)")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise MemeditError(f"{path} holds {arr.dtype} values, not numbers")
    return arr.copy()  # a writable, contiguous copy that keeps a 0-d array 0-d (refused by _real_values)


def _real_values(t: torch.Tensor, path: Path) -> torch.Tensor:
    """``t`` as float32 after checking it is a vector or matrix of finite real numbers that float32 holds exactly
    enough: integers must round-trip (|x| <= 2^24), floats must stay finite."""
    if t.dim() not in (1, 2):
        raise MemeditError(f"{path} holds a {t.dim()}-d array of shape {tuple(t.shape)}; give (n, V) rows or one (V,) "
                           "row")
    if t.is_complex():
        raise MemeditError(f"{path} holds complex values ({t.dtype}); value rows are real: give real numbers")
    if t.dtype == torch.bool or str(t.dtype).startswith("torch.uint") and t.dtype != torch.uint8:
        raise MemeditError(f"{path} holds {t.dtype} values; give float32 (or a signed integer type)")
    if not t.dtype.is_floating_point:
        wide = t.to(torch.int64)
        if t.numel() and int(wide.abs().max()) > 1 << 24:
            raise MemeditError(f"{path} holds integers up to {int(wide.abs().max()):,}, which float32 does not hold "
                               "exactly (at most 16,777,216); give float values")
        return wide.float()
    wide = t.double()
    if not torch.isfinite(wide).all():
        raise MemeditError(f"{path} holds NaN or inf values; nothing was written")
    if t.numel() and float(wide.abs().max()) > torch.finfo(torch.float32).max:
        raise MemeditError(f"{path} holds values beyond the range of float32 (|x| up to {float(wide.abs().max()):.3g})"
                           "; nothing was written")
    return t.float()


def row_patch(model: MemoryModel, op: str, table: str, rows: Sequence[int], values: torch.Tensor | None = None,
              scalar: float | None = None, from_row: int | None = None, message: str = "") -> Patch:
    """A patch for one table made the way ``memedit patch OP`` does: set/add (values, a scalar or another row),
    scale (by a scalar), zero, copy (another row)."""
    t = model.table(table)
    ids = check_rows(model, t.name, rows)
    old = t.weight.detach()[ids].float()  # (n, V)
    sources = [x is not None for x in (values, scalar, from_row)]
    if op in ("set", "add") and sum(sources) != 1:
        raise MemeditError(f"patch {op} needs exactly one of --values FILE, --scalar X, --from-row R")
    if op == "scale" and scalar is None:
        raise MemeditError("patch scale needs --scalar X (the factor)")
    if op == "copy" and from_row is None:
        raise MemeditError("patch copy needs --from-row R")
    if from_row is not None:
        check_rows(model, t.name, [from_row])
        src = t.weight.detach()[from_row].float().expand_as(old)
    elif scalar is not None:
        if not math.isfinite(scalar):
            raise MemeditError("the scalar is NaN or inf; nothing was written")
        if abs(scalar) > torch.finfo(t.weight.dtype).max or abs(scalar) > torch.finfo(torch.float32).max:
            raise MemeditError(f"the scalar {scalar:g} is beyond the range of the table's dtype {t.weight.dtype} "
                               f"(|x| <= {torch.finfo(t.weight.dtype).max:.4g}); nothing was written")
        src = torch.full_like(old, scalar)
    elif values is not None:
        src = values.float()
        if src.dim() == 1:
            src = src.expand(old.shape[0], -1) if src.shape[0] == old.shape[1] else src
        if src.dim() != 2 or src.shape[-1] != old.shape[1]:
            raise MemeditError(f"the values have width {src.shape[-1]}, table {t.name} rows have width {old.shape[1]}")
        if src.shape[0] != old.shape[0]:
            raise MemeditError(f"the values hold {src.shape[0]} rows for {old.shape[0]} row ids")
    if op in ("set", "copy"):
        new = src
    elif op == "add":
        new = old + src
    elif op == "scale":
        new = old * scalar
    elif op == "zero":
        new = torch.zeros_like(old)
    else:
        raise MemeditError(f"unknown patch operation {op!r} (choose from {', '.join(OPS)})")
    return make_patch(model, {t.name: (ids, new)}, message=message or f"{op} {len(ids)} rows of {t.name}", kind=op)


def diff(a: MemoryModel, b: MemoryModel) -> dict:
    """Rows that differ between two models' value tables (ids, max |delta|) and other tensors that differ."""
    if a.config.to_dict() != b.config.to_dict():
        raise MemeditError("the two models have different configs; diff compares a model with an edited copy of it")
    tables = []
    for ta in a.tables:
        wa, wb = ta.weight.detach(), b.table(ta.name).weight.detach()
        ne = (wa.view(torch.uint8).reshape(wa.shape[0], -1) != wb.view(torch.uint8).reshape(wb.shape[0], -1)).any(1)
        rows = ne.nonzero().flatten()
        delta = (wa[rows].float() - wb[rows].float()).abs()
        tables.append({"table": ta.name, "layers": ta.layers, "n_rows": rows.numel(), "rows": rows.tolist(),
                       "max_delta": delta.max().item() if rows.numel() else 0.0,
                       "row_max_delta": delta.amax(1).tolist() if rows.numel() else []})
    value_names = {n for t in a.tables for n in t.state_names}
    sa, sb = native_state(a), native_state(b)
    others = []
    for name in sorted(sa):
        if name in value_names:
            continue
        x, y = sa[name], sb[name]
        if not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            others.append({"name": name, "max_delta": (x.float() - y.float()).abs().max().item()})
    identical = not others and all(t["n_rows"] == 0 for t in tables)
    return {"tables": tables, "other_tensors": others, "identical": identical}


def apply(model: MemoryModel, patch: Patch, force: bool = False, message: str | None = None) -> list[str]:
    """Apply ``patch`` to the model and its folder (storage.patch.apply); returns warnings (with ``force``).
    An edit's patch also records the facts' new answers, so that later edits keep them (sparse_ft.keep_for)."""
    head = {}
    reqs = patch.info.get("requests") if patch.kind == "edit" and isinstance(patch.info, dict) else None
    ok = [q for q in reqs or [] if isinstance(q, dict)
          and all(isinstance(q.get(k), str) for k in ("prompt", "subject", "target_new"))]
    if ok:
        head["answers"] = {k: q["target_new"] for q in ok
                           for k in ([q["id"]] if isinstance(q.get("id"), str) and q["id"] else [])
                           + [q["prompt"].replace("{}", q["subject"])]}
    return apply_patch(model, patch, force=force, message=message, head=head)
