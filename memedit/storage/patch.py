"""Patches: the one format for an exact, reversible change to rows of a model's tensors (value rows and sub-keys).

A patch holds, per tensor, the row ids, the old rows (the base) and the new rows, plus metadata: the fingerprint of
the model it was made on, a message, a kind, a time and free-form info. ``editing`` (value-row patches, fact edits)
and ``keyspace`` (sub-key adaptation, routing) both produce it; :func:`apply` is the one path that writes it: under
the writers' lock, save the patch file, then commit its rows as one row-log record through the store (store.py),
which validates every change (:func:`store.check_changes`). Reverting appends the inverse record, restoring the
old rows byte for byte from the row log.

File layout (safetensors):
    "{tensor}.rows"  (n,) int64     row ids, sorted, unique (``tensor``: its state-dict name)
    "{tensor}.old"   (n, ...)       the rows before the patch, in the tensor's dtype
    "{tensor}.new"   (n, ...)       the rows after the patch, in the tensor's dtype
    metadata (all strings): "format" = "memedit-patch", "format_version" = "2", "id", "base" (model fingerprint),
    "tensors" (JSON {tensor: {"label", "layers"}}), "sha256" (JSON {tensor: sha256 of its row ids, old and new
    rows}), "message", "time", "kind", "info" (JSON, free-form: e.g. a fact edit's request and metrics)

:meth:`Patch.load` also reads the two formats of memedit < 0.2, so their files still apply and revert:
``"memedit-patch"`` version 1 (value patches: tensors named by value table, a checksum per base row) and
``"memedit-row-patch"`` (key patches: a sha256 per tensor and rows, ``version`` 1, no base fingerprint).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import MemeditError, RowsChanged
from ..lm.hooks import values_name
from ..lm.model import MemoryModel
from .files import atomic_path, crash_point
from .folder import check_output, state_dir
from .state import PATCHES, edit_log
from .store import Change, Store, check_changes, commit, differing, fingerprint, refresh, store_of, writable_tensors

PATCH_FORMAT = "memedit-patch"
PATCH_FORMAT_VERSION = 2
LEGACY_KEY_FORMAT = "memedit-row-patch"  # read only: the key patches of memedit < 0.2
_KEYS = re.compile(r"layers\.(\d+)\.feed_forward\.keys")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def tensor_sha(c: Change) -> str:
    """The sha256 of one tensor's change: its row ids, old rows and new rows (the one checksum of a patch file)."""
    h = hashlib.sha256()
    for t in (c.rows.long(), c.old, c.new):
        h.update(_bytes(t))
    return h.hexdigest()


@dataclass
class Patch:
    """Row changes of one or more tensors with everything needed to check, apply and revert them exactly."""

    changes: list[Change]
    base: str = ""  # fingerprint of the model the patch was made on ("" in key patches of memedit < 0.2)
    message: str = ""
    kind: str = "set"  # set, add, scale, zero, copy, edit, keys, ...
    time: str = field(default_factory=_now)
    info: dict = field(default_factory=dict)
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = self.content_id()

    def content_id(self) -> str:
        """12 hex digits of a sha256 over the base fingerprint and every tensor name, row id, old and new row."""
        h = hashlib.sha256(self.base.encode())
        for c in self.changes:
            h.update(c.name.encode())
            for t in (c.rows.long(), c.old, c.new):
                h.update(_bytes(t))
        return h.hexdigest()[:12]

    @property
    def n_rows(self) -> int:
        return sum(c.rows.numel() for c in self.changes)

    def change(self, name: str) -> Change:
        """The change of the tensor ``name`` (its state-dict name, or its label: "shared", "layer2")."""
        for c in self.changes:
            if name in (c.name, c.label):
                return c
        raise KeyError(name)

    def summary(self) -> dict:
        """A JSON-able description: id, base, message, time, and per tensor its layers, rows and max |delta|."""
        return {
            "id": self.id, "base": self.base, "kind": self.kind, "message": self.message, "time": self.time,
            "n_rows": self.n_rows, "info": self.info,
            "tables": [{"table": c.label, "tensor": c.name, "layers": c.layers, "n_rows": c.rows.numel(),
                        "rows": c.rows.tolist(), "max_delta": c.max_delta} for c in self.changes],
        }

    def save(self, path: str | Path) -> Path:
        """Write the patch file atomically; returns its path."""
        tensors = {}
        for c in self.changes:
            tensors.update({f"{c.name}.rows": c.rows.long(), f"{c.name}.old": c.old, f"{c.name}.new": c.new})
        meta = {
            "format": PATCH_FORMAT, "format_version": str(PATCH_FORMAT_VERSION), "id": self.id, "base": self.base,
            "tensors": json.dumps({c.name: {"label": c.label, "layers": c.layers} for c in self.changes}),
            "sha256": json.dumps({c.name: tensor_sha(c) for c in self.changes}), "message": self.message,
            "time": self.time, "kind": self.kind, "info": json.dumps(self.info),
        }
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        """Read a patch file (this format or either of memedit < 0.2), checking it against its own checksums."""
        path = Path(path)
        meta, tensors = _read(path)
        try:
            if meta.get("format") == LEGACY_KEY_FORMAT:
                patch = _legacy_key_patch(path, meta, tensors)
            elif meta.get("format") == PATCH_FORMAT and meta.get("format_version") == "1":
                patch = _legacy_value_patch(path, meta, tensors)
            elif meta.get("format") == PATCH_FORMAT:
                patch = _patch(path, meta, tensors)
            else:
                raise MemeditError(f"{path} is not a memedit patch (no format={PATCH_FORMAT} in its metadata)")
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise MemeditError(f"{path} is a damaged patch file ({type(e).__name__}: {e})") from None
        for c in patch.changes:
            n = c.rows.numel()
            if c.rows.dim() != 1 or c.old.shape != c.new.shape or c.old.dim() < 1 or c.old.shape[0] != n:
                raise MemeditError(f"{path}: {c.label} has inconsistent shapes (rows {tuple(c.rows.shape)}, "
                                   f"old {tuple(c.old.shape)}, new {tuple(c.new.shape)})")
        return patch


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a patch file, after checking it exists and is safetensors."""
    if not path.is_file():
        raise MemeditError(f"patch file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise MemeditError(f"{path} is not a readable patch file ({e})") from None


def _layers_of(name: str) -> list[int]:
    m = _KEYS.fullmatch(name)
    return [int(m[1])] if m else []


def _patch(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> Patch:
    if int(meta["format_version"]) > PATCH_FORMAT_VERSION:
        raise MemeditError(f"{path} was written by a newer memedit (patch format {meta['format_version']}); upgrade")
    names, sums = json.loads(meta["tensors"]), json.loads(meta["sha256"])
    changes = [Change(n, d["label"], tensors[f"{n}.rows"].long(), tensors[f"{n}.old"], tensors[f"{n}.new"],
                      list(d["layers"])) for n, d in names.items()]
    for c in changes:
        if sums.get(c.name) != tensor_sha(c):
            raise MemeditError(f"{path}: the checksum of {c.label} does not match its rows; the file is damaged")
    patch = Patch(changes, base=meta["base"], message=meta.get("message", ""), kind=meta.get("kind", "set"),
                  time=meta.get("time", ""), info=json.loads(meta.get("info") or "{}"), id=meta["id"])
    if patch.content_id() != patch.id:
        raise MemeditError(f"{path}: its content does not match its id {patch.id}; the file is damaged")
    return patch


def _legacy_value_patch(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> Patch:
    """A value patch of memedit < 0.2: tensors named by value table, a checksum (16 hex digits) per base row."""
    tables, sums = json.loads(meta["tables"]), json.loads(meta["checksums"])
    h = hashlib.sha256(meta["base"].encode())
    changes = []
    for label, layers in tables.items():
        rows, old, new = tensors[f"{label}.rows"].long(), tensors[f"{label}.old"], tensors[f"{label}.new"]
        if sums.get(label) != [hashlib.sha256(_bytes(r)).hexdigest()[:16] for r in old]:
            raise MemeditError(f"{path}: the checksums of table {label} do not match its base rows; the file is "
                               "damaged")
        h.update(label.encode())
        for t in (rows, old, new):
            h.update(_bytes(t))
        changes.append(Change(values_name(int(layers[0])), label, rows, old, new, [int(L) for L in layers]))
    if h.hexdigest()[:12] != meta["id"]:
        raise MemeditError(f"{path}: its content does not match its id {meta['id']}; the file is damaged")
    return Patch(changes, base=meta["base"], message=meta.get("message", ""), kind=meta.get("kind", "set"),
                 time=meta.get("time", ""), info=json.loads(meta.get("info") or "{}"), id=meta["id"])


def _legacy_key_patch(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> Patch:
    """A key patch of memedit < 0.2: tensors by state-dict name, a sha256 of each one's old and of its new rows."""
    changes, h = [], hashlib.sha256()
    for name in sorted(k[: -len(".rows")] for k in tensors if k.endswith(".rows")):
        try:
            c = Change(name, name, tensors[f"{name}.rows"].long(), tensors[f"{name}.old"], tensors[f"{name}.new"],
                       _layers_of(name))
        except KeyError:
            raise MemeditError(f"{path}: {name} lacks its old or new rows; the patch is damaged") from None
        if meta.get(f"sha256.{name}.old") != hashlib.sha256(_bytes(c.old)).hexdigest() or \
                meta.get(f"sha256.{name}.new") != hashlib.sha256(_bytes(c.new)).hexdigest():
            raise MemeditError(f"{path}: checksum mismatch for {name}; the patch is damaged")
        h.update(name.encode())
        for t in (c.rows, c.old, c.new):
            h.update(_bytes(t))
        changes.append(c)
    info = {k: v for k, v in meta.items() if not k.startswith("sha256.") and k not in ("format", "version")}
    what = info.get("command", "keys")
    return Patch(changes, message=f"{what} ({sum(c.rows.numel() for c in changes)} rows)", kind="keys",
                 time=info.get("created", ""), info=info, id=h.hexdigest()[:12])


# ---- making patches -------------------------------------------------------------------------------------------
def labelled(model: MemoryModel, changes: list[Change]) -> list[Change]:
    """``changes`` named the way the model names them: a value table's rows under its first reading layer's tensor
    and labelled by the table ("shared", "layer2"); sub-keys by their tensor. A tensor the model does not have is
    left as it is, for the store to refuse."""
    tables = {n: t for t in model.tables for n in t.state_names}
    tables.update({t.name: t for t in model.tables})
    out = []
    for c in changes:
        t = tables.get(c.name) or tables.get(c.label)
        if t is not None:
            out.append(Change(t.state_names[0], t.name, c.rows, c.old, c.new, list(t.layers)))
        else:
            out.append(Change(c.name, c.name, c.rows, c.old, c.new, c.layers or _layers_of(c.name)))
    return out


def from_tensors(model: MemoryModel, before: dict[str, torch.Tensor], **meta) -> Patch:
    """The patch from tensors saved ``before`` (state-dict name -> whole tensor) to the model's current ones: the
    changed rows only. ``meta``: the Patch's message, kind, info (its base is the model's fingerprint before)."""
    params = writable_tensors(model)
    changes = []
    for name, old in before.items():
        new = params[name].detach()
        rows = torch.nonzero((new != old).reshape(new.shape[0], -1).any(1)).flatten()
        if rows.numel():
            changes.append(Change(name, name, rows, old[rows].clone(), new[rows].clone()))
    return Patch(labelled(model, changes), **meta)


def write_rows(model: MemoryModel, patch: Patch, new: bool = True) -> None:
    """Set the patch's new (or old) rows in the in-memory model; no checks, no files."""
    params = writable_tensors(model)
    with torch.no_grad():
        for c in labelled(model, patch.changes):
            p = params[c.name]
            p.detach()[c.rows] = (c.new if new else c.old).to(p.dtype)


# ---- applying and reverting -----------------------------------------------------------------------------------
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


def _refusals(model: MemoryModel, patch: Patch, changes: list[Change], force: bool) -> list[str]:
    """Warnings (only when ``force``) about applying ``patch``; raises what ``force`` can't fix: a patch applied
    already. Refused unless ``force``: a patch made for another model, current rows that differ from its base."""
    if patch.id in applied_ids(model):
        raise MemeditError(f"patch {patch.id} is already applied to {model.source}; revert it first")
    warnings = []
    if patch.base and patch.base not in lineage(model):
        msg = f"patch {patch.id} was made for another model (fingerprint {patch.base}, this model {fingerprint(model)})"
        if not force:
            raise MemeditError(msg + "; pass --force to apply it anyway")
        warnings.append(msg)
    for c, bad in differing(model, changes, "old"):
        msg = f"{bad.numel()} rows differ from the patch's base in {c.label} (e.g. row {int(bad[0])})"
        if not force:
            raise RowsChanged(msg, "pass --force to override")
        warnings.append(msg)
    return warnings


def apply(model: MemoryModel, patch: Patch, force: bool = False, message: str | None = None,
          file: str | Path | None = None, head: dict | None = None) -> list[str]:
    """Apply ``patch`` to the model and its folder: under the writers' lock, save the patch file (``file``, default
    ``memedit/patches/{id}.safetensors``), then commit its rows as one row-log record; returns warnings (with
    ``force``). ``head``: more fields for the record (an edit's answers).

    Applying the same patch twice is refused. With ``force`` the patch is re-based on the current rows, so that
    reverting it restores exactly what was there."""
    changes = labelled(model, patch.changes)
    check_changes(model, changes)  # before the patch file is written
    if file is not None:
        check_output(model, Path(file))
    d = state_dir(model, create=True)
    with store_of(model).locked():
        refresh(model)  # another writer may have changed the folder since the model was loaded
        warnings = _refusals(model, patch, changes, force)
        if warnings:  # re-base: the stored patch's old rows are what was really there
            params = writable_tensors(model)
            changes = [Change(c.name, c.label, c.rows, params[c.name].detach()[c.rows].clone(), c.new, c.layers)
                       for c in changes]
            patch = Patch(changes, base=fingerprint(model), message=patch.message, kind=patch.kind, info=patch.info)
        path = Path(file) if file is not None else d / PATCHES / f"{patch.id}.safetensors"
        if file is not None or not path.is_file():  # a stored patch of this id holds exactly these rows
            Patch(changes, patch.base, patch.message, patch.kind, patch.time, patch.info, patch.id).save(path)
            crash_point("patch-saved")
        where = path.resolve()
        rel = where.relative_to(d.resolve()) if where.is_relative_to(d.resolve()) else where
        commit(model, changes, {"op": "apply", "id": patch.id, "file": str(rel), "kind": patch.kind,
                                "message": message if message is not None else patch.message, "forced": bool(warnings),
                                **(head or {})})
    return warnings


def apply_held(model: MemoryModel, patch: Patch, file: str | Path | None = None) -> Path:
    """Apply a patch whose new rows the in-memory model already holds (what `keys adapt` and `keys route` made):
    the folder's rows are put back, the patch applied through :func:`apply`; on failure the model is left as the
    caller had it. Returns the patch file's path."""
    write_rows(model, patch, new=False)
    try:
        apply(model, patch, file=file)
    except BaseException:
        with contextlib.suppress(MemeditError):
            write_rows(model, patch, new=True)
        raise
    return Path(file) if file is not None else state_dir(model) / PATCHES / f"{patch.id}.safetensors"


def revert(model: MemoryModel, ref: str | Path, force: bool = False) -> tuple[Patch, list[str]]:
    """Revert an applied patch, by id, id prefix or file; returns (the patch as reverted, warnings).
    Restores its rows byte for byte, from the row log's record of applying it."""
    with store_of(model).locked():
        refresh(model)
        rec = _applied_record(model, str(ref))
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
            params = writable_tensors(model)
            changes = [Change(c.name, c.label, c.rows, params[c.name].detach()[c.rows].clone(), c.new)
                       for c in changes]
        h = rec.head
        commit(model, changes, {"op": "revert", "id": h["id"], "file": h.get("file", ""), "kind": h.get("kind", ""),
                                "message": h.get("message", ""), "forced": bool(warnings)})
    patch = Patch(labelled(model, [Change(c.name, c.label, c.rows, c.old, c.new) for c in changes]),
                  base=h.get("before", ""), message=h.get("message", ""), kind=h.get("kind", ""), id=h["id"])
    return patch, warnings


def _applied_record(model: MemoryModel, ref: str):
    """The row-log record that applied the patch ``ref`` (an id, a unique id prefix, or a patch file)."""
    p = Path(ref)
    if ref and (p.suffix == ".safetensors" or p.is_file()):
        ref = Patch.load(p).id
    records = Store(model.source).records()
    ids = [i for i in dict.fromkeys(applied_ids(model)) if ref and i.startswith(ref)]
    if not ids:
        raise MemeditError(f"patch {ref!r} is not applied to {model.source} (see `memedit patch log`)")
    if len(ids) > 1:
        raise MemeditError(f"patch id {ref!r} is ambiguous; give more digits")
    return next(r for r in reversed(records) if r.head.get("op") == "apply" and r.head.get("id") == ids[0])


def _legacy_changes(model: MemoryModel, rec) -> list[Change]:
    """The revert changes of a patch applied by memedit < 0.2 (its record has no rows): from its patch file."""
    f = rec.head.get("file", "")
    path = Path(f) if Path(f).is_absolute() else state_dir(model) / f
    return [Change(c.name, c.label, c.rows, c.new, c.old) for c in labelled(model, Patch.load(path).changes)]


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
