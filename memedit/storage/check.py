"""Checking a native folder (`memedit check`) and salvaging a damaged row log (`memedit check --salvage`).

Above the store and the loader: a check loads the folder's base (checkpoint.py) and reads its row log and state
files (store.py, state.py) without trusting any of them, and lists every problem instead of raising it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import zlib
from pathlib import Path

import torch

from ..errors import MemeditError
from .checkpoint import check_tokenizer, is_native, load_native, read_config
from .files import atomic_path, atomic_write_bytes
from .folder import native_state
from .importers.tokenizers import load_tokenizer
from .linked import check_base as check_linked_base
from .patch import Patch, labelled
from .state import background, frozen_rows
from .store import (
    _SCANNED,
    LEGACY_LOG,
    LOG,
    LOG_MAGIC,
    MARK,
    REC_HEAD,
    STATE_DIR,
    Change,
    Damage,
    Record,
    Store,
    _layers,
    _set_cached_sum,
    apply_records,
    block_hash_sum,
    decode_payload,
    differing,
    encode_record,
    fingerprint,
    inspect_log,
    is_legacy,
    read_mark,
    stored_sums,
    upgrade_dir,
    writable_tensors,
    write_base,
)


def check_folder(folder: str | Path, repair: bool = True, upgrade: bool = False, salvage: bool = False) -> dict:
    """Verify a native folder and say what is wrong: config, base (header, finite values, fingerprint sums against
    its metadata), row log (framing, checksums, chain to the base, rows), frozen rows, background statistics,
    tokenizer. Never raises for damage: every problem is listed. With ``repair`` (needs write access) cut a torn last
    record and remove temp files; with ``salvage`` rebuild a damaged row log (:func:`salvage_log`); with ``upgrade``
    move a v1 edit log into the row log. Returns {"ok", "problems", "repaired", "lost", "fingerprint", ...}."""
    folder = Path(folder)
    if not is_native(folder):  # a folder of another layout, or a native one whose config.json is damaged
        damaged = False
        if (folder / "config.json").is_file() and ((folder / "model.safetensors").exists() or
                                                   (folder / STATE_DIR).is_dir()):
            try:
                read_config(folder)
            except MemeditError:
                damaged = True
        if not damaged:
            raise MemeditError(f"{folder} is not a native memedit folder (no config.json with format memedit)")
    st = Store(folder)
    res = {"folder": str(folder), "ok": False, "problems": [], "repaired": [], "lost": [], "records": 0, "folded": 0,
           "fingerprint": None}
    writable = os.access(folder, os.W_OK) and (not st.dir.exists() or os.access(st.dir, os.W_OK))
    if st.dir.exists() and not st.dir.is_dir():
        res["problems"].append(f"{st.dir} is not a folder (it holds the row log, frozen rows and the lock)")
        writable = False
    if upgrade and not writable:
        raise MemeditError(f"{folder} is read-only; cannot upgrade it")
    lock = st.locked(legacy_ok=True, recover=False) if writable and (repair or upgrade or salvage) else \
        contextlib.nullcontext()
    with lock:  # held throughout: no writer changes the folder while it is checked and repaired
        _check(st, res, repair and writable, upgrade, salvage and writable)
    res["ok"] = not res["problems"] and not res["lost"]
    return res


def _check(st: Store, res: dict, repair: bool, upgrade: bool, salvage: bool) -> None:
    problems, repaired = res["problems"], res["repaired"]

    def guard(fn, *args):
        """fn(*args), or None with the problem listed: a check reports damage, it never raises it."""
        try:
            return fn(*args)
        except MemeditError as e:
            problems.append(str(e).split("; run `memedit check")[0])  # readers' advice: this is the check
        except Exception as e:  # noqa: BLE001 - damage may surface as any error deep in a reader
            problems.append(f"{type(e).__name__}: {str(e)[:200]}")
        return None

    scan = guard(inspect_log, st.log)
    if scan is not None and repair and not scan.problem:
        repaired.extend(st.cut_torn(scan))
        scan = guard(inspect_log, st.log)
    if repair:
        repaired.extend(st.remove_temps())
    if upgrade and is_legacy(st.dir):
        n = guard(upgrade_dir, st.dir)
        if n is not None:
            repaired.append(f"moved {n} edit-log entries from {LEGACY_LOG} into {LOG}")
            scan = guard(inspect_log, st.log)
    if is_legacy(st.dir):
        problems.append(f"the edit log is in the old format ({LEGACY_LOG}); run `memedit check --upgrade --model "
                        f"{st.folder}` before writing")
    config = guard(read_config, st.folder)
    base = guard(load_native, st.folder, False) if config is not None else None  # config, header, shapes
    if base is not None:
        guard(_check_base, st, base, problems)
    try:
        read_mark(st.log)
        mark_bad = False
    except MemeditError:
        mark_bad = True
    if salvage and base is not None and ((scan is not None and scan.problem) or mark_bad):
        if mark_bad:
            problems[:] = [p for p in problems if MARK not in p]
        done, lost = guard(salvage_log, st, base) or ([], [])
        repaired.extend(done)
        res["lost"].extend(lost)
        scan = guard(inspect_log, st.log)
        base = guard(load_native, st.folder, False)
    if scan is not None:
        if scan.problem:
            problems.extend(f"{LOG} is damaged: {d.describe()}" for d in scan.damage)
            if scan.missing:
                problems.append(f"{LOG} is damaged: {scan.problem}")
            problems.append(f"readers refuse the folder until `memedit check --salvage --model {st.folder}` rebuilds "
                            f"the log (it keeps the damaged one aside)")
        elif scan.torn:
            problems.append(f"{LOG} ends in a torn record ({scan.torn:,} bytes); readers ignore it, the next writer "
                            "(or `memedit check`) cuts it off")
    stale = st.temps()
    if stale:
        problems.append(f"temp files left by an interrupted write: {', '.join(p.name for p in stale[:4])}")
    if base is None:
        return
    log_ok = scan is not None and not scan.problem
    if log_ok:  # the records the base does not hold, applied to it and compared
        res["records"] = len(scan.records)
        log_ok = guard(_check_records, st, base, scan.records, problems) is not None
    if guard(_check_tokenizer, st.folder, base, config) is False:
        problems.append(f"the tokenizer named by config.json ({config.get('tokenizer', 'tokenizer.json')!r}) is "
                        "missing")
    guard(frozen_rows, base)
    guard(background, base)
    res["folded"] = guard(st.folded) or 0
    if log_ok:
        res["fingerprint"] = guard(fingerprint, base)


def _check_base(st: Store, model, problems: list[str]) -> None:
    """The base alone: finite values in every tensor, and its metadata (fingerprint sums, folded count) readable and
    true (the sums are compared with the base's own tensors, whatever the log holds)."""
    if st.linked:  # a checkpoint elsewhere: compared block by block with the digests taken when it was linked
        return check_linked_base(st.folder, model, problems)
    state = native_state(model, contiguous=False)
    for name, t in state.items():
        if t.is_floating_point():
            bad = 0
            flat = t.detach().reshape(-1)
            for i in range(0, flat.numel(), 1 << 24):  # 16M values at a time: bounded memory on a large table
                bad += int((~torch.isfinite(flat[i: i + (1 << 24)].float())).sum())
            if bad:
                problems.append(f"model.safetensors: {name} holds {bad:,} NaN or inf values")
    meta = st.base_meta()
    try:
        st.folded(meta)
    except MemeditError as e:
        problems.append(str(e))
    if "memedit.fp" in meta:
        stored = stored_sums(meta)
        if stored is None:
            problems.append("model.safetensors: its memedit.fp metadata (the fingerprint sums) is unreadable")
        else:
            actual = {name: block_hash_sum(name, t) for name, t in state.items()}
            for name, t in state.items():  # kept up to date as the log's records apply: hashed once per check
                _set_cached_sum(model, name, t, actual[name])
            wrong = sorted(set(stored) ^ set(actual)) + sorted(k for k in stored.keys() & actual.keys()
                                                               if stored[k] != actual[k])
            if wrong:
                problems.append(f"model.safetensors: its tensors do not match the fingerprint sums it stores "
                                f"({', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}): the base is damaged")


def _check_records(st: Store, model, records: list[Record], problems: list[str]) -> bool:
    """Each record fits the model (tensor, rows, shapes, dtypes), the log chains to the base, and after applying the
    records the base does not hold, every row the log last wrote holds what the log says."""
    meta = st.base_meta()
    folded = st.folded(meta)
    if folded > len(records) or (folded and records[folded - 1].sha != meta.get("memedit.head")):
        problems.append(f"the row log does not match the base (the base holds {folded} records, the log has "
                        f"{len(records)}, or its record {folded} differs)")
        return True
    params = writable_tensors(model)
    for n, r in enumerate(records, 1):
        for c in r.changes:
            p = params.get(c.name)
            k = c.rows.numel()
            if p is None:
                problems.append(f"record {n} ({r.head.get('id')}) changes {c.name}, which is not patchable")
            elif tuple(c.new.shape) != (k, *p.shape[1:]) or c.new.dtype != p.dtype or c.rows.dim() != 1 or \
                    (k and int(c.rows.max()) >= p.shape[0]):
                problems.append(f"record {n} ({r.head.get('id')}): its rows of {c.label} do not fit the model's "
                                f"{tuple(p.shape)} {p.dtype}")
    if problems:
        return True
    apply_records(model, records[folded:])
    last: dict[tuple[str, int], torch.Tensor] = {}
    for r in records:
        for c in r.changes:
            for i, row in zip(c.rows.tolist(), c.new, strict=True):
                last[(c.name, i)] = row
    bad = [k for k, row in last.items() if not torch.equal(
        params[k[0]].detach()[k[1]].reshape(-1).view(torch.uint8), row.reshape(-1).view(torch.uint8))]
    if bad:
        problems.append(f"{len(bad)} rows differ from the row log (e.g. {bad[0][0]} row {bad[0][1]})")
    return True


def _check_tokenizer(folder: Path, model, config: dict) -> bool:
    """Load the tokenizer config.json names (raises what is wrong with it); False when it is missing."""
    name = config.get("tokenizer", "tokenizer.json")
    if model.config.standalone or name is None:  # a folder saved without a tokenizer
        return True
    if not isinstance(name, str) or Path(name).is_absolute() or not (folder / name).resolve().is_relative_to(
            folder.resolve()):
        raise MemeditError(f"config.json: the tokenizer path {name!r} leaves the model folder")
    path = folder / name
    if not path.exists():
        return False
    if not path.is_file():
        raise MemeditError(f"{path} is not a file")
    model.tokenizer = load_tokenizer(path)
    check_tokenizer(model, str(path))
    return True


class _Lost(Exception):
    """Why a damaged record cannot be rebuilt."""


def salvage_log(st: Store, model) -> tuple[list[str], list[str]]:
    """Rebuild a damaged row log (needs the lock; ``model``: the folder's base, loaded without the log); returns
    (what was done, what was lost).

    The damaged log is kept aside (``rows.log.damaged-TIME``, a hard link to the old file: never deleted). The new log
    holds every valid record byte for byte, in order, and each damaged record rebuilt from the patch file it names in
    ``memedit/patches/`` when that file is intact (byte for byte when its header survived: the rebuilt record's
    checksum then equals the stored one). Records cut off the end are rebuilt from patch files no record names, in
    the order they were written, when their rows fit. Every record that cannot be rebuilt is listed as lost."""
    st.require_lock()
    try:
        mark_ok, scan = True, inspect_log(st.log)
    except MemeditError:  # a damaged marker: the log itself decides
        mark_ok = False
        st.dir.joinpath(MARK).rename(_aside(st.dir / MARK))
        scan = inspect_log(st.log)
    data = st.log.read_bytes() if st.log.is_file() else b""
    meta = st.base_meta()
    try:
        folded = st.folded(meta)
    except MemeditError:
        folded = 0
    # a valid record that only disagrees with rows.end (a salvage killed before it wrote the marker) is kept
    starts = {off for off, _ in scan.spans}
    items = sorted([(off, ln, rec) for (off, ln), rec in zip(scan.spans, scan.records, strict=True)] +
                   [(d.offset, d.length, d) for d in scan.damage if d.index and d.offset not in starts],
                   key=lambda x: x[0])
    done, lost = [], []
    if not mark_ok:
        done.append(f"set the damaged {MARK} aside and rebuilt it from the log")
    if any(d.index and d.offset in starts for d in scan.damage):
        done.append(f"{MARK} named another last record than the log holds; rebuilt it from the log")
    if any(not d.index for d in scan.damage):
        done.append(f"rewrote the damaged format marker at the start of {LOG}")
    out = bytearray(LOG_MAGIC)
    new: list[Record] = []
    in_base = 0  # records of the new log the base holds
    named = {r.head.get("file") for r in scan.records} | {(d.head or {}).get("file") for d in scan.damage}
    for n, (off, ln, item) in enumerate(items, 1):
        folded_item = n <= folded
        if isinstance(item, Record):
            if not folded_item:
                apply_records(model, [item])
            out += data[off: off + ln]
            new.append(item)
        else:
            try:
                try:
                    raw, rec, exact = _rebuild(st, model, item.head or {}, item, apply=not folded_item)
                    named.add(item.head["file"])
                except _Lost as e:  # no usable header: a patch file no record names, whose old rows fit here
                    try:
                        raw, rec, exact = _unused_patch(st, model, named, apply=not folded_item)
                    except _Lost:
                        raise e from None
            except _Lost as e:
                lost.append(f"record {n} at byte {off:,} ({ln:,} bytes): {e}")
                continue
            out += raw
            new.append(rec)
            how = "restored byte for byte" if exact else "rebuilt (rows exact; time, message and fingerprints anew)"
            done.append(f"record {n} ({rec.head.get('op')} {rec.head.get('id')}) {how} from "
                        f"{STATE_DIR}/{rec.head.get('file')}")
        in_base += folded_item
    for k in range(scan.missing):  # records cut off the end: only their patch files can tell
        try:
            raw, rec, _ = _unused_patch(st, model, named, apply=True)
        except _Lost:
            lost.append(f"{scan.missing - k} record(s) cut off the end of the log: no unused patch file fits (a revert,"
                        " or a patch whose file is gone)")
            break
        out += raw
        new.append(rec)
        done.append(f"record {len(new)} (apply {rec.head.get('id')}) cut off the end, rebuilt from "
                    f"{STATE_DIR}/{rec.head.get('file')}")
    aside = _aside(st.log)
    if st.log.is_file():
        try:
            os.link(st.log, aside)
        except OSError:
            shutil.copy2(st.log, aside)
        done.insert(0, f"kept the damaged log as {STATE_DIR}/{aside.name}")
    atomic_write_bytes(st.log, bytes(out))
    _SCANNED.clear()
    if in_base != folded or (in_base and new[in_base - 1].sha != meta.get("memedit.head")):
        with atomic_path(st.base, crash="salvage") as tmp:  # the same tensors, metadata naming the new log's records
            write_base(load_native(st.folder, log=False), tmp, new[:in_base])
        done.append(f"rewrote model.safetensors' metadata: it holds the first {in_base} records of the new log")
    st.write_mark(len(new), len(out), new[-1].sha if new else "")
    done.append(f"wrote a new {LOG}: {len(new)} records ({len(scan.records)} kept byte for byte)")
    return done, lost


def _aside(path: Path) -> Path:
    """A new name beside ``path`` for keeping a damaged file: NAME.damaged-TIME (-2, -3 ... if taken)."""
    stem = f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = path.with_name(stem), 1
    while out.exists():
        n += 1
        out = path.with_name(f"{stem}-{n}")
    return out


def _unused_patch(st: Store, model, named: set, apply: bool) -> tuple[bytes, Record, bool]:
    """An apply record rebuilt from the oldest patch file in ``memedit/patches/`` that no record names and whose old
    rows are the model's rows now (added to ``named``)."""
    for path in sorted((st.dir / "patches").glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
        rel = str(path.relative_to(st.dir))
        if rel in named:
            continue
        try:
            found = _rebuild(st, model, {"op": "apply", "file": rel}, None, apply=apply, fit=True)
        except _Lost:
            continue
        named.add(rel)
        return found
    raise _Lost("its header is unreadable and no unused patch file fits the rows before it")


def _patch_changes(model, path: Path) -> tuple[list[Change], dict]:
    """(changes old -> new, metadata) of a patch file (any format memedit wrote), after its own checksums (raises
    _Lost)."""
    try:
        p = Patch.load(path)
    except MemeditError as e:
        raise _Lost(f"its patch file is damaged ({str(e)[:160]})") from None
    return labelled(model, p.changes), {"message": p.message, "time": p.time, "kind": p.kind, "id": p.id}


def _rebuild(st: Store, model, head: dict, dmg: Damage | None, apply: bool, fit: bool = False
             ) -> tuple[bytes, Record, bool]:
    """(record bytes, record, byte-for-byte?) of a damaged record rebuilt from the patch file its header names."""
    file = head.get("file")
    if not isinstance(file, str) or not file:
        raise _Lost("its header is unreadable and names no patch file")
    path = Path(file) if Path(file).is_absolute() else st.dir / file
    if not path.is_file():
        raise _Lost(f"its patch file {file} is gone")
    changes, pmeta = _patch_changes(model, path)
    params = writable_tensors(model)
    for c in changes:
        p = params.get(c.name)
        if p is None or tuple(c.new.shape[1:]) != tuple(p.shape[1:]) or c.new.dtype != p.dtype or (
                c.rows.numel() and int(c.rows.max()) >= p.shape[0]):
            raise _Lost(f"its patch file {file} does not fit the model")
    op = head.get("op")
    if op not in ("apply", "revert"):  # which way: the rows before it tell
        op = "revert" if not differing(model, [Change(c.name, c.label, c.rows, c.new, c.old) for c in changes],
                                       "old") and differing(model, changes, "old") else "apply"
    if op == "revert":
        changes = [Change(c.name, c.label, c.rows, c.new, c.old) for c in changes]
    if fit and differing(model, changes, "old"):
        raise _Lost(f"{file} does not fit the rows before it")
    if apply:  # the old rows are what was there, so a revert restores exactly that
        changes = [Change(c.name, c.label, c.rows, params[c.name].detach()[c.rows].clone(), c.new) for c in changes]
    live = [c for c in changes if c.rows.numel()]
    exact = None
    if dmg is not None and "tensors" in head and dmg.crc is not None:
        raw = encode_record({k: v for k, v in head.items() if k not in ("v", "tensors")}, live)
        if zlib.crc32(raw[REC_HEAD.size:]) == dmg.crc and len(raw) - REC_HEAD.size == dmg.declared:
            exact = raw
    if exact is None:
        h = {k: head[k] for k in ("op", "id", "file", "kind", "message", "time", "forced", "answers") if k in head}
        h.update(op=op, file=file, salvaged=True)
        for k in ("id", "kind", "message", "time"):
            if not isinstance(h.get(k), str) and k in pmeta:
                h[k] = pmeta[k]
        h.update(tables={c.label: c.rows.numel() for c in live}, rows={c.label: c.rows.tolist() for c in live},
                 layers=_layers(model, live))
        if apply:
            h["before"], h["after"] = fingerprint(model), _probe_after(model, live)
        raw = encode_record(h, live)
    rec = decode_payload(raw[REC_HEAD.size:], with_rows=True)
    if apply:
        apply_records(model, [rec])
    return raw, rec, exact is not None


def _probe_after(model, changes: list[Change]) -> str:
    """The model's fingerprint with ``changes`` applied (the model is left as it was)."""
    params = writable_tensors(model)
    saved = [(params[c.name], c.rows, params[c.name].detach()[c.rows].clone()) for c in changes]
    with torch.no_grad():
        for c in changes:
            params[c.name].detach()[c.rows] = c.new.to(params[c.name].dtype)
        fp = fingerprint(model)
        for p, rows, old in saved:
            p.detach()[rows] = old
    return fp
