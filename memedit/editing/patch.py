"""Value patches: exact, reversible changes to value rows, saved as small safetensors files.

A patch holds, per value table, the row ids, the old rows (the base) and the new rows, plus metadata: format
version, id, the layers that read each table, the fingerprint of the model it was made on, a checksum of each base
row, a message and a time. Applying appends one record (the changed rows, old and new) to the model folder's row
log through the store (store.py), which is also the edit log; reverting appends the inverse record, restoring the
old rows byte for byte.

File layout (safetensors):
    "{table}.rows"  (n,) int64     row ids, sorted, unique
    "{table}.old"   (n, V)         the rows before the patch, in the table's dtype
    "{table}.new"   (n, V)         the rows after the patch, in the table's dtype
    metadata (all strings): "format" = "memedit-patch", "format_version", "id", "base" (model fingerprint),
    "tables" (JSON {table: [layers]}), "checksums" (JSON {table: [hex per row]}), "message", "time", "kind",
    "info" (JSON, free-form: e.g. a fact edit's request and metrics)

Edit log entries (read from ``memedit/rows.log``, see store.Record.entry): {"op": "apply"|"revert", "id",
"file" (relative to the model's ``memedit/`` folder, or absolute), "time", "message", "kind" ("keys" for key
patches), "tables": {table: n_rows}, "rows": {table: [row ids]}, "layers", "before", "after" (model fingerprints),
"forced"}. Key patches (keys.py) name sub-key tensors ("layers.{L}.feed_forward.keys") in "tables" and "rows".
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import limits
from ..errors import MemeditError
from ..lm.model import MemoryModel
from ..storage.checkpoint import atomic_path, fingerprint, native_state, state_dir
from ..storage.state import PATCHES, edit_log, frozen_rows

PATCH_FORMAT = "memedit-patch"
PATCH_FORMAT_VERSION = 1


@dataclass
class TableChange:
    """The rows of one value table that a patch changes."""

    table: str
    layers: list[int]  # every memory layer that reads the table (all of them change)
    rows: torch.Tensor  # (n,) int64, sorted, unique
    old: torch.Tensor  # (n, V) the base rows
    new: torch.Tensor  # (n, V) the rows after the patch

    @property
    def max_delta(self) -> float:
        if not self.rows.numel():
            return 0.0
        return (self.new.float() - self.old.float()).abs().max().item()


@dataclass
class Patch:
    """A set of value-row changes with everything needed to check, apply and revert them exactly."""

    changes: list[TableChange]
    base: str  # fingerprint of the model the patch was made on
    message: str = ""
    kind: str = "set"  # set, add, scale, zero, copy, edit, ...
    time: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    info: dict = field(default_factory=dict)
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = self.content_id()

    def content_id(self) -> str:
        """12 hex digits of a sha256 over the base fingerprint and every row id, old and new row."""
        h = hashlib.sha256(self.base.encode())
        for c in self.changes:
            h.update(c.table.encode())
            for t in (c.rows, c.old, c.new):
                h.update(_bytes(t))
        return h.hexdigest()[:12]

    @property
    def n_rows(self) -> int:
        return sum(c.rows.numel() for c in self.changes)

    def checksums(self) -> dict[str, list[str]]:
        return {c.table: row_checksums(c.old) for c in self.changes}

    def inverse(self) -> Patch:
        """The patch that undoes this one (old and new swapped)."""
        changes = [TableChange(c.table, c.layers, c.rows, c.new, c.old) for c in self.changes]
        return Patch(changes, base=self.base, message=f"revert {self.id}", kind="revert", info={"reverts": self.id})

    def summary(self) -> dict:
        """A JSON-able description: id, base, message, time, and per table its layers, rows and max |delta|."""
        return {
            "id": self.id, "base": self.base, "kind": self.kind, "message": self.message, "time": self.time,
            "n_rows": self.n_rows, "info": self.info,
            "tables": [{"table": c.table, "layers": c.layers, "n_rows": c.rows.numel(), "rows": c.rows.tolist(),
                        "max_delta": c.max_delta} for c in self.changes],
        }

    # ---- files --------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the patch file atomically; returns its path."""
        from safetensors.torch import save_file

        tensors = {}
        for c in self.changes:
            tensors[f"{c.table}.rows"] = c.rows.long().contiguous()
            tensors[f"{c.table}.old"] = c.old.contiguous()
            tensors[f"{c.table}.new"] = c.new.contiguous()
        meta = {
            "format": PATCH_FORMAT, "format_version": str(PATCH_FORMAT_VERSION), "id": self.id, "base": self.base,
            "tables": json.dumps({c.table: c.layers for c in self.changes}),
            "checksums": json.dumps(self.checksums()), "message": self.message, "time": self.time,
            "kind": self.kind, "info": json.dumps(self.info),
        }
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        """Read a patch file, checking its format and that its checksums match its own base rows."""
        path = Path(path)
        meta, tensors = read_patch_file(path, PATCH_FORMAT, "patch")
        if int(meta.get("format_version", "0")) > PATCH_FORMAT_VERSION:
            raise MemeditError(f"{path} was written by a newer memedit (patch format {meta['format_version']}); "
                               "upgrade")
        try:
            tables = json.loads(meta["tables"])
            sums = json.loads(meta["checksums"])
            changes = [TableChange(name, list(layers), tensors[f"{name}.rows"].long(), tensors[f"{name}.old"],
                                   tensors[f"{name}.new"]) for name, layers in tables.items()]
            patch = cls(changes, base=meta["base"], message=meta.get("message", ""), kind=meta.get("kind", "set"),
                        time=meta.get("time", ""), info=json.loads(meta.get("info") or "{}"), id=meta["id"])
        except (KeyError, ValueError, TypeError) as e:
            raise MemeditError(f"{path} is a damaged patch file ({type(e).__name__}: {e})") from None
        for c in patch.changes:
            n = c.rows.numel()
            if c.rows.dim() != 1 or c.old.shape != c.new.shape or c.old.dim() != 2 or c.old.shape[0] != n:
                raise MemeditError(f"{path}: table {c.table} has inconsistent shapes (rows {tuple(c.rows.shape)}, "
                                   f"old {tuple(c.old.shape)}, new {tuple(c.new.shape)})")
            if sums.get(c.table) != row_checksums(c.old):
                raise MemeditError(f"{path}: the checksums of table {c.table} do not match its base rows; the file is "
                                   "damaged")
        if patch.content_id() != patch.id:
            raise MemeditError(f"{path}: its content does not match its id {patch.id}; the file is damaged")
        return patch


def read_patch_file(path: Path, fmt: str, what: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a patch file, after checking it exists, is safetensors and has format ``fmt``."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise MemeditError(f"patch file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise MemeditError(f"{path} is not a readable patch file ({e})") from None
    if meta.get("format") != fmt:
        raise MemeditError(f"{path} is not a memedit {what} (no format={fmt} in its metadata)")
    return meta, tensors


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def row_checksums(rows: torch.Tensor) -> list[str]:
    """A sha256 (16 hex digits) of each row's bytes: (n, V) -> n strings."""
    return [hashlib.sha256(_bytes(r)).hexdigest()[:16] for r in rows]


# ---- making patches --------------------------------------------------------------------------------
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
    frozen = frozen_rows(model)
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
        _refuse_frozen(t.name, ids, frozen)
        order = ids.argsort()
        ids, new = ids[order], new[order]
        old = t.weight.detach()[ids].clone()
        changed = (old.view(torch.uint8).reshape(len(ids), -1) != new.view(torch.uint8).reshape(len(ids), -1)).any(1)
        ids, old, new = ids[changed], old[changed], new[changed].clone()
        if ids.numel():
            changes.append(TableChange(t.name, list(t.layers), ids, old, new))
    if not changes:
        raise MemeditError("the patch changes nothing: every new row equals the current one")
    return Patch(changes, base=base or fingerprint(model), message=message, kind=kind, info=dict(info or {}))


def _refuse_frozen(table: str, ids: torch.Tensor, frozen: dict[str, torch.Tensor]) -> None:
    f = frozen.get(table)
    if f is None or not f.numel():
        return
    hit = ids[torch.isin(ids, f)]
    if hit.numel():
        shown = ", ".join(map(str, sorted(hit.tolist())[:8])) + (" ..." if hit.numel() > 8 else "")
        raise MemeditError(f"rows {shown} of table {table} are frozen; `memedit unfreeze --table {table} --rows ...` "
                           "first")


OPS = ("set", "add", "scale", "zero", "copy")


def load_values(path: str | Path) -> torch.Tensor:
    """New values from a ``.npy`` file or a ``.safetensors`` file (its only tensor, or the one named "values")."""
    path = Path(path)
    if not path.is_file():
        raise MemeditError(f"values file {path} does not exist")
    if path.suffix == ".npy":
        import numpy as np

        try:
            arr = np.load(path, allow_pickle=False)  # a pickled array is refused unread
        except (ValueError, OSError, EOFError) as e:
            raise MemeditError(f"cannot read {path} as a numeric .npy array ({e})") from None
        return _real_values(torch.from_numpy(_plain_numbers(arr, path)), path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

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
    import numpy as np

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


# ---- applying --------------------------------------------------------------------------------------
def applied_ids(model: MemoryModel) -> list[str]:
    """Ids of the patches currently applied to the model folder, in order of application."""
    applied: list[str] = []
    for e in edit_log(model):
        if e.get("op") == "apply" and e.get("id"):
            applied.append(e["id"])
        elif e.get("op") == "revert" and e.get("id") in applied:
            applied.remove(e["id"])
    return applied


def lineage(model: MemoryModel) -> set[str]:
    """Fingerprints this model folder has had (before and after each logged apply/revert), plus the current one."""
    seen = {fingerprint(model)}
    for e in edit_log(model):
        seen.update(x for x in (e.get("before"), e.get("after")) if x)
    return seen


def write_rows(model: MemoryModel, patch: Patch, new: bool = True) -> None:
    """Set the patch's new (or old) rows in the in-memory model; no checks, no files."""
    with torch.no_grad():
        for c in patch.changes:
            w = model.table(c.table).weight
            w[c.rows] = (c.new if new else c.old).to(w.dtype)


def check_patch(model: MemoryModel, patch: Patch, force: bool = False, revert: bool = False) -> list[str]:
    """Warnings (only when ``force``) about a patch before applying (or reverting) it; raises what ``force`` can't fix.

    Refused always: unknown tables, rows out of range, wrong width, NaN/inf, frozen rows.
    Refused unless ``force``: a patch made for another model, current rows that differ from the patch's base.
    """
    warnings = []
    frozen = frozen_rows(model)
    for c in patch.changes:
        t = model.table(c.table)
        check_rows(model, t.name, c.rows.tolist())
        V = t.weight.shape[1]
        if c.new.shape[1] != V:
            raise MemeditError(f"the patch's rows of table {t.name} have width {c.new.shape[1]}, the model's have "
                               f"width {V}")
        if c.new.dtype != t.weight.dtype:
            raise MemeditError(f"the patch stores {c.new.dtype} rows, table {t.name} holds {t.weight.dtype}")
        if not (torch.isfinite(c.new.float()).all() and torch.isfinite(c.old.float()).all()):
            raise MemeditError(f"the patch's rows of table {t.name} contain NaN or inf; it is not applied")
        _refuse_frozen(t.name, c.rows, frozen)
    if not revert:
        fp = lineage(model)
        if patch.base not in fp:
            msg = (f"patch {patch.id} was made for another model (fingerprint {patch.base}, "
                   f"this model {fingerprint(model)})")
            if not force:
                raise MemeditError(msg + "; pass --force to apply it anyway")
            warnings.append(msg)
    for c in patch.changes:
        expect = c.new if revert else c.old
        cur = model.table(c.table).weight.detach()[c.rows]
        differ = [int(r) for r, a, b in zip(c.rows, row_checksums(cur), row_checksums(expect), strict=True) if a != b]
        if differ:
            what = "rows changed since the patch was applied" if revert else "rows differ from the patch's base"
            msg = f"{len(differ)} {what} in table {c.table} (e.g. row {differ[0]})"
            if not force:
                raise MemeditError(msg + "; pass --force to override")
            warnings.append(msg)
    return warnings


def apply(model: MemoryModel, patch: Patch, force: bool = False, message: str | None = None) -> list[str]:
    """Apply ``patch`` to the model and its folder (one row-log record, under the writers' lock); returns warnings
    (with ``force``).

    Applying the same patch twice is refused. With ``force`` the patch is re-based on the current rows, so that
    reverting it restores exactly what was there.
    """
    from ..storage.store import refresh, store_of

    with store_of(model).locked():
        refresh(model)  # another writer may have changed the folder since the model was loaded
        if patch.id in applied_ids(model):
            raise MemeditError(f"patch {patch.id} is already applied to {model.source}; revert it first")
        warnings = check_patch(model, patch, force=force)
        if warnings:  # re-base: the stored patch's old rows are what was really there
            changes = [TableChange(c.table, c.layers, c.rows, model.table(c.table).weight.detach()[c.rows].clone(),
                                   c.new) for c in patch.changes]
            patch = Patch(changes, base=fingerprint(model), message=patch.message, kind=patch.kind, info=patch.info)
        _commit(model, patch, "apply", forced=bool(warnings), message=message)
    return warnings


def revert(model: MemoryModel, ref: str, force: bool = False) -> tuple[Patch, list[str]]:
    """Revert an applied patch (value or key patch), by id, id prefix or file; returns (the patch, warnings).
    Restores its rows byte for byte, from the row log's record of applying it."""
    from ..storage.store import Change, commit, differing, refresh, store_of

    with store_of(model).locked():
        refresh(model)
        rec = _applied_record(model, ref)
        changes = [Change(c.name, c.label, c.rows, c.new, c.old) for c in rec.changes]
        if not changes:  # history imported from a v1 edit log: the rows are in the patch file
            changes = _legacy_changes(model, rec)
        warnings = []
        for c, bad in differing(model, changes, "old"):
            msg = f"{bad.numel()} rows changed since the patch was applied in {c.label} (e.g. row {int(bad[0])})"
            if not force:
                raise MemeditError(msg + "; pass --force to override")
            warnings.append(msg)
        if warnings:  # revert what is there now: the log's old rows become the current ones
            params = _params(model)
            changes = [Change(c.name, c.label, c.rows, params[c.name].detach()[c.rows].clone(), c.new)
                       for c in changes]
        h = rec.head
        commit(model, changes, {"op": "revert", "id": h["id"], "file": h.get("file", ""), "kind": h.get("kind", ""),
                                "message": h.get("message", ""), "forced": bool(warnings)})
    layers = {t.state_names[0]: list(t.layers) for t in model.tables}
    patch = Patch([TableChange(c.label, layers.get(c.name, []), c.rows, c.old, c.new) for c in changes],
                  base=h.get("before", ""), message=h.get("message", ""), kind=h.get("kind", ""), id=h["id"])
    return patch, warnings


def _params(model: MemoryModel) -> dict[str, torch.Tensor]:
    from ..storage.store import writable_tensors

    return writable_tensors(model)


def _applied_record(model: MemoryModel, ref: str):
    """The row-log record that applied the patch ``ref`` (an id, a unique id prefix, or a patch file)."""
    from ..storage.store import Store

    p = Path(ref)
    if ref and (p.suffix == ".safetensors" or p.is_file()):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
        except (SafetensorError, OSError) as e:
            raise MemeditError(f"{p} is not a readable patch file ({e})") from None
        ref = meta.get("id") or _key_patch_id(p)
    records = Store(model.source).records()
    applied = applied_ids(model)
    ids = [i for i in dict.fromkeys(applied) if ref and i.startswith(ref)]
    if not ids:
        raise MemeditError(f"patch {ref!r} is not applied to {model.source} (see `memedit patch log`)")
    if len(ids) > 1:
        raise MemeditError(f"patch id {ref!r} is ambiguous; give more digits")
    return next(r for r in reversed(records) if r.head.get("op") == "apply" and r.head.get("id") == ids[0])


def _key_patch_id(path: Path) -> str:
    from ..keyspace.keys import KeyPatch

    return KeyPatch.load(path).id


def _legacy_changes(model: MemoryModel, rec) -> list:
    """The revert changes of a patch applied by memedit < 0.2 (its record has no rows): from its patch file."""
    from ..storage.store import Change

    f = rec.head.get("file", "")
    path = Path(f) if Path(f).is_absolute() else state_dir(model) / f
    if rec.head.get("kind") == "keys":
        from ..keyspace.keys import KeyPatch, key_changes

        return [Change(c.name, c.label, c.rows, c.new, c.old) for c in key_changes(model, KeyPatch.load(path))]
    patch = Patch.load(path)
    return [Change(model.table(c.table).state_names[0], c.table, c.rows, c.new, c.old) for c in patch.changes]


def find_patch(model: MemoryModel, ref: str) -> Patch:
    """A patch by file path, or by id (or unique id prefix) among the model's stored patches."""
    p = Path(ref)
    if p.suffix == ".safetensors" or p.is_file():
        return Patch.load(p)
    d = state_dir(model) / PATCHES
    hits = sorted(d.glob(f"{ref}*.safetensors")) if d.is_dir() and ref else []
    if len(hits) != 1:
        raise MemeditError(f"no patch {ref!r} in {d}" if not hits else f"patch id {ref!r} is ambiguous; give more "
                                                                       "digits")
    return Patch.load(hits[0])


def _commit(model: MemoryModel, patch: Patch, op: str, forced: bool, message: str | None = None) -> None:
    """Save the patch file (once), then write its rows as one row-log record (the store applies them in memory)."""
    from ..storage.store import Change, commit, crash_point

    d = state_dir(model, create=True)
    rel = Path(PATCHES) / f"{patch.id}.safetensors"
    if op == "apply" and not (d / rel).is_file():
        patch.save(d / rel)
        crash_point("patch-saved")
    changes = [Change(model.table(c.table).state_names[0], c.table, c.rows,
                      c.old if op == "apply" else c.new, c.new if op == "apply" else c.old) for c in patch.changes]
    head = {"op": op, "id": patch.id, "file": str(rel), "kind": patch.kind,
            "message": message if message is not None else patch.message, "forced": forced}
    if op == "apply" and patch.kind == "edit":  # the facts' new answers: later edits keep them (sparse_ft.keep_for)
        reqs = (patch.info or {}).get("requests") if isinstance(patch.info, dict) else None
        ok = [q for q in reqs or [] if isinstance(q, dict)
              and all(isinstance(q.get(k), str) for k in ("prompt", "subject", "target_new"))]
        head["answers"] = {k: q["target_new"] for q in ok
                           for k in ([q["id"]] if isinstance(q.get("id"), str) and q["id"] else [])
                           + [q["prompt"].replace("{}", q["subject"])]}
    commit(model, changes, head)


# ---- comparing -------------------------------------------------------------------------------------
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
