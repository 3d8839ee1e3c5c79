"""The model store: the only code that changes a native model folder.

    model.safetensors     the base weights; immutable once written (``compact`` replaces it by atomic rename).
                          Its metadata holds "memedit.folded" (how many row-log records it already contains),
                          "memedit.head" (the sha256 of the last of those records) and "memedit.fp" (per tensor
                          row-hash sums for the fingerprint).
    memedit/rows.log      the append-only row log, which is also the journal and the edit log: one checksummed
                          record per applied or reverted change (tensor names, row ids, old rows, new rows, id, op,
                          message, fingerprints before and after).
    memedit/rows.end      how far the log reaches, rewritten after each append: {"records", "bytes", "sha" of the
                          last record}. A log behind it lost records it had (damage, not a crash).
    memedit/lock          the writers' lock (``fcntl.flock``); it holds the pid and command of the holder.
    memedit/frozen.safetensors, memedit/background.safetensors   small files, replaced atomically under the lock.

Writers serialise on the lock; readers never lock: they map the base and apply the log's complete records, so they
never see half a change (SQLite's rollback-journal idea, turned into a redo log: docs/ has no copy; see the
module tests in tests/test_store.py). A torn last record (a writer killed mid-append: its length runs past the end
of the file, and rows.end does not count it) is ignored by readers and cut off by the next writer. Anything else
that is not a valid record is damage (SQLite's "database disk image is malformed"): readers and writers refuse in
one line naming the record and its offset, nothing is cut, and `memedit check --salvage` (:func:`salvage_log`)
rebuilds the log beside the damaged one (tests/test_store_damage.py). A write costs the rows it changes: the
record holds only those rows.

Record framing (little-endian): b"MREC", u64 payload length, u32 crc32 of the payload, payload; the payload is
u32 JSON length, the JSON header, then the row ids (int64), old rows and new rows of each tensor in header order.
The log file starts with LOG_MAGIC (its format version).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import MemeditError
from ..lm.hooks import keys_name
from .blocks import BLOCK, FP_MOD, _rows2d, block_digest, hash_prefix  # noqa: F401 (re-exported: the old names)
from .files import CRASH_ENV, atomic_path, atomic_write_text, crash_point  # noqa: F401 (crash_point: re-exported)
from .folder import (FORMAT, LINK, LINK_BLOCKS, STATE_DIR, frozen_rows, legacy_log, link_meta, native_state,
                     require_writable)
from .shards import is_sharded

LOG = "rows.log"
LOCK = "lock"
LOG_MAGIC = b"MEMEDIT-ROWLOG\x00\x01"  # the last byte is the log format version
REC_MAGIC = b"MREC"
REC_HEAD = struct.Struct("<4sQI")
RECORD_VERSION = 1
MAX_RECORD = 1 << 36  # a length field beyond this is damage, not a record
NO_WAIT_ENV = "MEMEDIT_NO_WAIT"
TEMP = re.compile(r"\..+\.tmp|\.tmp[A-Za-z0-9]{6}")  # atomic_path's temp names, and safetensors' save_file's

ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
TORCH_ST = {v: k for k, v in ST_DTYPES.items()}


# ---- safetensors, mapped ---------------------------------------------------------------------------------
@dataclass
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """(tensors, metadata, file size) of a safetensors file, every offset checked against the file (untrusted)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MemeditError(f"{path} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise MemeditError(f"{path} is corrupt or truncated (header of {n} bytes in a {size}-byte file)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise MemeditError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError):
        raise MemeditError(f"{path} is corrupt (its safetensors header is not JSON)") from None
    if not isinstance(header, dict):
        raise MemeditError(f"{path} is corrupt (its safetensors header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out = {}
    for name, d in header.items():
        try:
            dtype = ST_DTYPES[d["dtype"]]
            shape = tuple(int(x) for x in d["shape"])
            a, b = (int(x) for x in d["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MemeditError(f"{path}: tensor {name!r} has a bad header entry ({str(d)[:80]})") from None
        numel = 1
        for s in shape:
            if s < 0:
                raise MemeditError(f"{path}: tensor {name!r} has a negative dimension")
            numel *= s
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if not 0 <= a <= b or base + b > size or b - a != numel * itemsize:
            raise MemeditError(f"{path} is corrupt or truncated: tensor {name!r} lies outside the file or has the "
                               "wrong length")
        out[name] = TensorInfo(dtype, shape, base + a, b - a)
    return out, {str(k): str(v) for k, v in meta.items()}, size


def map_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, mapped copy-on-write (MAP_PRIVATE): nothing is read until used,
    and writing a row into a tensor costs only the pages it touches, never the file."""
    infos, meta, size = read_header(path)
    try:
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size) if size else None
    except (OSError, RuntimeError) as e:
        raise MemeditError(f"cannot map {path}: {e}") from None
    out = {}
    for name, ti in infos.items():
        t = torch.empty(0, dtype=torch.uint8)
        if ti.nbytes:
            t = t.set_(storage, ti.start, (ti.nbytes,))
        try:
            out[name] = t.view(ti.dtype).reshape(ti.shape)
        except RuntimeError:  # an unaligned offset (a file not written by safetensors): copy that tensor
            out[name] = t.clone().view(ti.dtype).reshape(ti.shape)
    return out, meta


# ---- the fingerprint: a sum of row hashes, kept incrementally ------------------------------------------------
# (BLOCK, FP_MOD, _rows2d, hash_prefix, block_digest: blocks.py, shared with shards.py and linked.py)


def block_hash_sum(name: str, t: torch.Tensor, blocks: list[int] | None = None,
                   sub: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
    """The sum (mod 2**128) of sha256(name, block index, block bytes) over the blocks of BLOCK rows of ``t`` (all,
    or the given ones; ``sub`` = (row ids, rows) replaces those rows first, without touching ``t``).

    A multiset hash: changing rows changes the sum by hash(new blocks) - hash(old blocks), so a write updates the
    fingerprint at the cost of the blocks it touched, and reverting restores it exactly."""
    m = _rows2d(t)
    n = m.shape[0]
    prefix = hash_prefix(name, t)
    if blocks is None:
        blocks = range((n + BLOCK - 1) // BLOCK)
    total = 0
    for b in blocks:
        chunk = m[b * BLOCK: (b + 1) * BLOCK]
        if sub is not None:
            ids, rows = sub
            inside = (ids >= b * BLOCK) & (ids < (b + 1) * BLOCK)
            if inside.any():
                chunk = chunk.clone()
                chunk[ids[inside] - b * BLOCK] = rows[inside].reshape(int(inside.sum()), -1).to(chunk.dtype)
        total += block_digest(prefix, b, chunk.contiguous().view(torch.uint8).numpy())
    return total % FP_MOD


def _blocks(rows: torch.Tensor, t: torch.Tensor) -> list[int]:
    return [0] if t.dim() < 2 else torch.unique(rows // BLOCK).tolist()


def fingerprint_of(config: dict, sums: dict[str, int]) -> str:
    """16 hex digits from the config and the per-tensor row-hash sums."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(sums):
        h.update(f"{name}:{sums[name]:032x}".encode())
    return h.hexdigest()[:16]


def tensor_sums(model) -> dict[str, int]:
    """{tensor name: row-hash sum} of the model's native state, reusing sums the store keeps for unchanged tensors."""
    cache: dict = model.__dict__.setdefault("_fp_cache", {})
    out = {}
    for name, t in native_state(model, contiguous=False).items():
        if hasattr(t, "fingerprint_sum"):  # a table mapped from shards keeps a digest per block (storage.shards)
            out[name] = t.fingerprint_sum(name)
            continue
        key = (t._version, t.data_ptr(), tuple(t.shape), t.dtype)
        hit = cache.get(name)
        if hit is None or hit[0] != key:
            hit = (key, block_hash_sum(name, t))
            cache[name] = hit
        out[name] = hit[1]
    return out


def _set_cached_sum(model, name: str, t: torch.Tensor, value: int) -> None:
    cache: dict = model.__dict__.setdefault("_fp_cache", {})
    cache[name] = ((t._version, t.data_ptr(), tuple(t.shape), t.dtype), value)


# ---- records ---------------------------------------------------------------------------------------------
@dataclass
class Change:
    """Rows of one tensor (a value table or a layer's sub-keys) before and after."""

    name: str  # state-dict name (a value table under its first reading layer)
    label: str  # what the edit log calls it: the table name ("shared", "layer2") or the tensor name for sub-keys
    rows: torch.Tensor  # (n,) int64
    old: torch.Tensor  # (n, d)
    new: torch.Tensor  # (n, d)
    layers: list[int] = field(default_factory=list)  # the memory layers that read these rows (all of them change)

    @property
    def table(self) -> str:
        """The value table's name (the label) of a value-row change."""
        return self.label

    @property
    def max_delta(self) -> float:
        if not self.rows.numel():
            return 0.0
        return (self.new.float() - self.old.float()).abs().max().item()


@dataclass
class Record:
    """One row-log record: an applied or reverted change (rows may be empty for history imported from a v1 log)."""

    head: dict
    changes: list[Change] = field(default_factory=list)
    sha: str = ""  # sha256 of the payload

    def entry(self) -> dict:
        """The edit-log entry (``memedit patch log``) this record stands for."""
        h = self.head
        keys = ("op", "id", "file", "time", "message", "kind", "tables", "rows", "layers", "before", "after",
                "forced", "answers")
        return {k: h.get(k) for k in keys if k in h}


def encode_record(head: dict, changes: list[Change]) -> bytes:
    blobs, specs, off = [], [], 0
    for c in changes:
        parts = [c.rows.long().contiguous(), c.old.contiguous(), c.new.contiguous()]
        raw = [p.view(torch.uint8).numpy().tobytes() for p in parts]
        specs.append({"name": c.name, "label": c.label, "n": c.rows.numel(), "shape": list(c.old.shape[1:]),
                      "dtype": TORCH_ST[c.old.dtype], "offset": off})
        blobs.extend(raw)
        off += sum(len(r) for r in raw)
    h = dict(head, v=RECORD_VERSION, tensors=specs)
    js = json.dumps(h).encode()
    payload = struct.pack("<I", len(js)) + js + b"".join(blobs)
    return REC_HEAD.pack(REC_MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes, with_rows: bool = True) -> Record:
    (n,) = struct.unpack_from("<I", payload)
    head = json.loads(payload[4: 4 + n])
    if head.get("v", 0) > RECORD_VERSION:
        raise MemeditError(f"a row-log record has format {head.get('v')}, newer than this memedit; upgrade memedit")
    changes = []
    if with_rows:
        base = 4 + n
        for s in head.get("tensors", []):
            dtype = ST_DTYPES[s["dtype"]]
            k, shape = int(s["n"]), tuple(s["shape"])
            width = 1
            for x in shape:
                width *= x
            item = torch.empty(0, dtype=dtype).element_size()
            o = base + int(s["offset"])
            rows = torch.frombuffer(bytearray(payload[o: o + 8 * k]), dtype=torch.int64) if k else \
                torch.zeros(0, dtype=torch.long)
            o += 8 * k
            nb = k * width * item
            old = torch.frombuffer(bytearray(payload[o: o + nb]), dtype=dtype).reshape(k, *shape) if nb else \
                torch.zeros((k, *shape), dtype=dtype)
            o += nb
            new = torch.frombuffer(bytearray(payload[o: o + nb]), dtype=dtype).reshape(k, *shape) if nb else \
                torch.zeros((k, *shape), dtype=dtype)
            changes.append(Change(s["name"], s.get("label", s["name"]), rows, old, new))
    return Record(head, changes, hashlib.sha256(payload).hexdigest())


MARK = "rows.end"  # {"records", "bytes", "sha"} of the log as its last writer left it: a shorter log lost records


@dataclass
class Damage:
    """A stretch of the row log that is not a valid record: corruption (never cut; `memedit check --salvage`)."""

    index: int  # the 1-based number of the record it stands in place of
    offset: int  # byte offset in the file
    length: int  # bytes up to the next valid record (or the end of the file)
    reason: str
    head: dict | None = None  # what is still readable of the record's JSON header
    crc: int | None = None  # the stored checksum and payload length, when the framing is intact
    declared: int | None = None

    def describe(self) -> str:
        if not self.index:
            return f"its first {self.length} bytes: {self.reason}"
        return f"record {self.index} at byte {self.offset:,} ({self.length:,} bytes): {self.reason}"


@dataclass
class LogScan:
    """Everything a row log holds: valid records (also those after damage), damage, a torn tail."""

    records: list[Record]
    spans: list[tuple[int, int]]  # (offset, length) of each valid record in the file
    end: int  # where the valid records before any damage or torn tail end
    size: int
    torn: int = 0  # bytes of a torn last record (a writer killed mid-append): readers ignore it, writers cut it
    damage: list[Damage] = field(default_factory=list)
    missing: int = 0  # records the marker says were written that the log no longer holds at all
    mark: dict | None = None

    @property
    def problem(self) -> str:
        """'' for a sound log (a torn tail is not a problem), else what is wrong, in one line."""
        if self.damage:
            more = f" (and {len(self.damage) - 1} more damaged stretch(es))" if len(self.damage) > 1 else ""
            return f"{self.damage[0].describe()}{more}"
        if self.missing:
            return (f"it holds {len(self.records)} records but {self.mark['records']} were written (up to byte "
                    f"{self.mark['bytes']:,}; it is {self.size:,} bytes): the log was cut short")
        return ""


def _valid_at(data: bytes, p: int) -> bool:
    if p + REC_HEAD.size > len(data):
        return False
    magic, n, crc = REC_HEAD.unpack_from(data, p)
    end = p + REC_HEAD.size + n
    framed = magic == REC_MAGIC and n <= MAX_RECORD and end <= len(data)
    return framed and zlib.crc32(data[p + REC_HEAD.size: end]) == crc


def _next_record(data: bytes, p: int) -> int | None:
    """The offset of the first valid record (framing and checksum) at or after ``p``."""
    while (p := data.find(REC_MAGIC, p)) >= 0:
        if _valid_at(data, p):
            return p
        p += 1
    return None


def _damaged_head(span: bytes) -> dict | None:
    """What can still be read of a damaged record's JSON header (the whole header, or its op, id, file and kind)."""
    body = span[REC_HEAD.size:]
    with contextlib.suppress(ValueError, struct.error, UnicodeDecodeError):
        (n,) = struct.unpack_from("<I", body)
        h = json.loads(body[4: 4 + n])
        if isinstance(h, dict):
            return h
    text = span[:1 << 20].decode("latin-1")
    out = {k: m.group(1) for k in ("op", "id", "file", "kind")
           if (m := re.search(rf'"{k}": "([^"\\]{{1,300}})"', text))}
    return out or None


def _check_rows(rec: Record) -> None:
    """Refuse a record no memedit writes: rows out of order, or rows holding NaN or inf."""
    for c in rec.changes:
        if c.rows.numel() and (int(c.rows.min()) < 0 or not (torch.isfinite(c.old.float()).all() and
                                                             torch.isfinite(c.new.float()).all())):
            raise ValueError(f"its rows of {c.label} hold NaN, inf or negative row ids, which no memedit writes")


def _parse(data: bytes, pos: int, with_rows: bool, shift: int = 0) -> LogScan:
    """Walk the records of ``data`` from ``pos`` (file offsets are data offsets plus ``shift``)."""
    scan = LogScan([], [], pos + shift, len(data) + shift)
    ok_so_far = True
    while pos < len(data):
        rest = len(data) - pos
        if rest < REC_HEAD.size:
            if data[pos:pos + 4] == REC_MAGIC[:min(4, rest)]:
                scan.torn = rest  # the start of a record header: an append cut short
            else:
                scan.damage.append(Damage(len(scan.records) + len(scan.damage) + 1, pos + shift, rest,
                                          "bytes that are not a record"))
            break
        magic, n, crc = REC_HEAD.unpack_from(data, pos)
        end = pos + REC_HEAD.size + n
        framed = magic == REC_MAGIC and n <= MAX_RECORD
        if framed and end <= len(data):
            payload = data[pos + REC_HEAD.size: end]
            if zlib.crc32(payload) == crc:
                try:
                    rec = decode_payload(payload, with_rows)
                    if with_rows:
                        _check_rows(rec)
                except (ValueError, KeyError, TypeError, IndexError, RuntimeError, struct.error) as e:
                    reason = f"its content is unreadable ({str(e)[:120]})"
                else:
                    scan.records.append(rec)
                    scan.spans.append((pos + shift, end - pos))
                    pos = end
                    if ok_so_far:
                        scan.end = pos + shift
                    continue
            else:
                reason = "checksum mismatch"
            nxt = end if end == len(data) or _valid_at(data, end) else _next_record(data, pos + 1)
        elif framed:  # runs past the end of the file: torn, unless whole records follow or the length is damaged
            nxt = _next_record(data, pos + 1)
            if nxt is None and zlib.crc32(data[pos + REC_HEAD.size:]) != crc:
                scan.torn = rest
                break
            reason = "its length runs past the end of the file, yet " + (
                "valid records follow it" if nxt is not None else "its bytes are all there (the length is damaged)")
        else:
            reason = "no record marker here" if magic != REC_MAGIC else f"an impossible length ({n:,} bytes)"
            nxt = _next_record(data, pos + 1)
        nxt = len(data) if nxt is None else nxt
        scan.damage.append(Damage(len(scan.records) + len(scan.damage) + 1, pos + shift, nxt - pos, reason,
                                  _damaged_head(data[pos:nxt]), crc if framed else None, n if framed else None))
        ok_so_far = False
        pos = nxt
    return scan


def read_mark(path: Path) -> dict | None:
    """The marker beside the row log (None when there is none); raises naming the file when it is damaged."""
    p = path.with_name(MARK)
    try:
        m = json.loads(p.read_bytes())
        if not (isinstance(m, dict) and isinstance(m.get("records"), int) and isinstance(m.get("bytes"), int)
                and isinstance(m.get("sha"), str) and m["records"] >= 0 and m["bytes"] >= 0):
            raise ValueError
        return m
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MemeditError(f"cannot read {p}: {e.strerror or e}; run `memedit check --model {path.parent.parent}`"
                           ) from None
    except (ValueError, UnicodeDecodeError):
        raise MemeditError(f"{p} is damaged; run `memedit check --model {path.parent.parent}`") from None


def inspect_log(path: Path, with_rows: bool = True) -> LogScan:
    """The whole row log (see :class:`LogScan`), raising only for a log written by a newer memedit or unreadable;
    its marker (rows.end) is read first, so a writer appending meanwhile cannot make it look cut short."""
    mark = read_mark(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = None
    except OSError as e:
        raise MemeditError(f"cannot read {path}: {e.strerror or e}") from None
    if data is None:
        scan = LogScan([], [], 0, 0)
    elif data.startswith(LOG_MAGIC):
        scan = _parse(data, len(LOG_MAGIC), with_rows)
    elif len(data) < len(LOG_MAGIC) and LOG_MAGIC.startswith(data):
        scan = LogScan([], [], 0, len(data), torn=len(data))  # a log whose creation was cut short
    elif data[: len(LOG_MAGIC) - 1] == LOG_MAGIC[:-1] and data[len(LOG_MAGIC) - 1] > LOG_MAGIC[-1]:
        raise MemeditError(f"{path} has row-log format {data[len(LOG_MAGIC) - 1]}, newer than this memedit; "
                           "upgrade memedit")
    else:
        scan = _parse(data, min(len(LOG_MAGIC), len(data)), with_rows)
        scan.damage.insert(0, Damage(0, 0, min(len(LOG_MAGIC), len(data)), "the file's format marker is damaged"))
        scan.end = 0
    scan.mark = mark
    if mark is not None:
        have = len(scan.records) + len(scan.damage) - (1 if scan.damage and scan.damage[0].index == 0 else 0)
        if mark["records"] > have and scan.torn:  # a committed record, cut short: damage, not a crash
            off = scan.size - scan.torn
            tail = data[off:] if data is not None else b""
            framing = REC_HEAD.unpack_from(tail) if len(tail) >= REC_HEAD.size else (None, None, None)
            scan.damage.append(Damage(have + 1, off, scan.torn, "cut short: the log had been written past it",
                                      _damaged_head(tail), framing[2], framing[1]))
            scan.torn, have = 0, have + 1
        scan.missing = max(0, mark["records"] - have)
        if not scan.missing and not scan.damage and mark["records"] and \
                scan.records[mark["records"] - 1].sha != mark["sha"]:
            scan.damage.append(Damage(mark["records"], scan.spans[mark["records"] - 1][0],
                                      scan.spans[mark["records"] - 1][1],
                                      "it is not the record written there (its hash differs from rows.end)"))
    return scan


def _refuse_damage(path: Path, scan: LogScan) -> None:
    if scan.problem:
        raise MemeditError(f"{path} is damaged: {scan.problem}; run `memedit check --model {path.parent.parent}` "
                           "(nothing was changed)")


_SCANNED: dict[tuple, tuple[list[Record], int, bytes]] = {}  # (path, dev, ino, with_rows) -> (records, end, tail)


def scan_log(path: Path, with_rows: bool = True, start: int = 0) -> tuple[list[Record], int, int]:
    """(complete records, byte offset where they end, file size) of a row log; a torn last record is left out, and
    any other damage raises (one line naming the record and its offset): never a silent partial history.

    Records already read by this process are reused (the log is append-only; a replaced file has a new inode, and
    the last record's framing is compared to be sure), so reading the log after each write costs the new records."""
    if start:
        return _scan_log(path, with_rows, start)
    mark = read_mark(path)
    try:
        s = os.stat(path)
    except FileNotFoundError:
        if mark is not None and mark["records"]:
            _refuse_damage(path, inspect_log(path, with_rows))
        return [], 0, 0
    except OSError as e:
        raise MemeditError(f"cannot read {path}: {e.strerror or e}") from None
    key = (str(path), s.st_dev, s.st_ino, with_rows)
    hit = _SCANNED.get(key)
    if hit is not None and hit[1] <= s.st_size:
        records, end, tail = hit
        try:
            with open(path, "rb") as f:
                f.seek(end - len(tail))
                same = f.read(len(tail)) == tail
        except OSError:
            same = False
        if same:
            if s.st_size == end:
                end2, size = end, s.st_size
            else:
                more, end2, size = _scan_log(path, with_rows, end)
                records = records + more
        else:
            hit = None
    if hit is None:
        records, end2, size = _scan_log(path, with_rows, 0)
    if mark is not None and (mark["records"] > len(records) or
                             (mark["records"] and records[mark["records"] - 1].sha != mark["sha"])):
        _refuse_damage(path, inspect_log(path, with_rows))
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            n = min(end2, 64)
            f.seek(end2 - n)
            _SCANNED[key] = (records, end2, f.read(n))
    return list(records), end2, size


def _scan_log(path: Path, with_rows: bool = True, start: int = 0) -> tuple[list[Record], int, int]:
    """(complete records, byte offset where they end, file size) of a row log (from byte ``start``, the end of
    records already read); a torn last record is left out, any other damage raises."""
    if not start:
        scan = inspect_log(path, with_rows)
        _refuse_damage(path, scan)
        return scan.records, scan.end, scan.size
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return [], 0, 0
    except OSError as e:
        raise MemeditError(f"cannot read {path}: {e.strerror or e}") from None
    scan = _parse(data, 0, with_rows, shift=start)
    if scan.damage:  # numbered from the start of the file
        _refuse_damage(path, inspect_log(path, with_rows))
    return scan.records, scan.end, scan.size


# ---- the store -------------------------------------------------------------------------------------------
_HELD: dict[str, int] = {}  # folders whose lock this process holds (flock is per open file: re-locking would block)

class Store:
    """A native model folder seen as a store: its base, its row log and its lock."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.dir = self.folder / STATE_DIR
        self.base = self.folder / "model.safetensors"
        if not self.base.exists() and (self.folder / LINK).is_file():
            self.base = self.folder / LINK  # a linked folder's base (storage.linked): never written
        self.log = self.dir / LOG

    @property
    def linked(self) -> bool:
        return self.base.name == LINK

    # ---- the lock ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, wait: bool | None = None, legacy_ok: bool = False, recover: bool = True) -> Iterator[Store]:
        """Hold the writers' lock (re-entrant within a process): recover a torn log tail, remove stale temp files
        (or, with ``recover=False``, leave that to the caller: `memedit check`).

        A second writer waits with a message, or with $MEMEDIT_NO_WAIT (``memedit --no-wait``) fails naming the
        holder. A folder whose edit log predates the row log is refused until ``memedit check --upgrade``; a
        damaged row log is refused until ``memedit check --salvage``."""
        key = str(self.folder.resolve())
        if key in _HELD:
            yield self
            return
        if wait is None:
            wait = os.environ.get(NO_WAIT_ENV, "") in ("", "0")
        try:
            self.dir.mkdir(exist_ok=True)
            fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise MemeditError(f"cannot write to {self.folder}: {e.strerror or e}") from None
        held = False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise MemeditError(f"the file system of {self.folder} has no file locks (flock): memedit will "
                                       "not write there, since concurrent writers could lose changes; copy the model "
                                       "to a local disk") from None
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise MemeditError(f"cannot lock {self.dir / LOCK}: {e.strerror}") from None
                holder = _read_holder(fd)
                if not wait:
                    raise MemeditError(f"{self.folder} is being changed by {holder}; try again when it finishes "
                                       "(or drop --no-wait to wait)") from None
                print(f"waiting for {holder} to finish writing {self.folder} ...", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            held = True
            os.ftruncate(fd, 0)
            argv = " ".join([Path(sys.argv[0]).name, *sys.argv[1:5]])[:200] if sys.argv else "python"
            os.pwrite(fd, f"pid {os.getpid()} ({argv})".encode(), 0)
            _HELD[key] = fd
            if not legacy_ok and is_legacy(self.dir):
                raise MemeditError(f"{self.folder} was written by an earlier memedit (edit log in {LEGACY_LOG}); run "
                                   f"`memedit check --upgrade --model {self.folder}` first")
            if recover:
                self.recover()
            yield self
        finally:
            if held:  # a refused writer leaves the holder's text alone
                _HELD.pop(key, None)
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            os.close(fd)  # closing releases the flock

    def require_lock(self) -> None:
        if str(self.folder.resolve()) not in _HELD:
            raise RuntimeError("store write without the lock")  # a programming error, not a user error

    def recover(self) -> list[str]:
        """Cut a torn last record and remove temp files left by killed writers (needs the lock); returns what it did.
        A damaged log (anything but a torn last record) is refused: nothing is cut."""
        self.require_lock()
        _, end, size = scan_log(self.log, with_rows=False)  # raises on damage; reuses what this process read
        done = self.cut_torn(inspect_log(self.log, with_rows=False)) if size > end else []
        return done + self.remove_temps()

    def cut_torn(self, scan: LogScan) -> list[str]:
        """Cut the torn last record of a log whose ``scan`` found no damage (needs the lock)."""
        self.require_lock()
        if not scan.torn or scan.problem:
            return []
        if scan.end == 0:
            self.log.unlink()
            return [f"removed an unfinished {self.log.name} ({scan.size} bytes)"]
        with open(self.log, "rb+") as f:
            f.truncate(scan.end)
            os.fsync(f.fileno())
        return [f"cut a torn last record ({scan.torn:,} bytes) off {self.log.name}"]

    def temps(self) -> list[Path]:
        """Temp files of interrupted writes: the store's own (``.NAME.XXXX.tmp``) and safetensors' (``.tmpXXXXXX``)."""
        out = []
        for d in (self.folder, self.dir, self.dir / "patches"):
            if d.is_dir():
                out += [p for p in d.iterdir() if TEMP.fullmatch(p.name)]
        return out

    def remove_temps(self) -> list[str]:
        """Remove the temp files of interrupted writes (needs the lock: no writer of this folder is running)."""
        self.require_lock()
        done = []
        for p in self.temps():
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                done.append(f"removed the temp file {p.relative_to(self.folder)}")
        return done

    # ---- reading --------------------------------------------------------------------------------------------
    def records(self, with_rows: bool = True) -> list[Record]:
        return scan_log(self.log, with_rows)[0]

    def base_meta(self) -> dict[str, str]:
        if self.linked:
            return link_meta(self.folder)
        return read_header(self.base)[1]

    def folded(self, meta: dict[str, str] | None = None) -> int:
        meta = self.base_meta() if meta is None else meta
        try:
            n = int(meta.get("memedit.folded", "0"))
            if n < 0:
                raise ValueError
            return n
        except ValueError:
            raise MemeditError(f"{self.base}: bad memedit.folded metadata; run `memedit check --model "
                               f"{self.folder}`") from None

    # ---- writing --------------------------------------------------------------------------------------------
    def append(self, head: dict, changes: list[Change]) -> Record:
        """Append one record, fsynced (needs the lock); a crash part-way leaves a torn tail that readers ignore."""
        self.require_lock()
        data = encode_record(head, changes)
        new = not self.log.exists() or self.log.stat().st_size == 0
        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            if new:
                os.write(fd, LOG_MAGIC)
            if os.environ.get(CRASH_ENV) == "log-torn":
                os.write(fd, data[: len(data) // 2])
                os.fsync(fd)
                crash_point("log-torn")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            self.end = os.fstat(fd).st_size
        finally:
            os.close(fd)
        crash_point("log-appended")
        rec = decode_payload(data[REC_HEAD.size:], with_rows=True)
        self.write_mark(len(self.records(with_rows=False)), self.end, rec.sha)
        return rec

    def write_mark(self, records: int, end: int, sha: str) -> None:
        """Record how far the log was written (after the append: a crash between the two leaves the marker behind
        the log, which is harmless; a log behind its marker lost committed records)."""
        atomic_write_text(self.dir / MARK, json.dumps({"records": records, "bytes": end, "sha": sha}))


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another memedit process"


def store_of(model) -> Store:
    """The store of a model loaded from a native folder (refuses the bundled model and foreign checkpoints)."""
    require_writable(model)
    return Store(model.source)


# ---- keeping a loaded model in step with its folder ---------------------------------------------------------
def apply_records(model, records: list[Record], params: dict[str, torch.Tensor] | None = None) -> None:
    """Write the new rows of ``records`` into the model (apply and revert records both carry their new rows) and
    keep the fingerprint's row-hash sums in step."""
    params = params if params is not None else writable_tensors(model)
    for r in records:
        for c in r.changes:
            p = params.get(c.name)
            if p is None or not c.rows.numel():
                continue
            sums = model.__dict__.get("_fp_cache", {})
            hit = sums.get(c.name)
            fresh = hit is not None and hit[0][0] == p._version and hit[0][1] == p.data_ptr()
            folder = model.__dict__.get("_store_sums")
            track = fresh or folder is not None
            blocks = _blocks(c.rows, p) if track else []
            d = -block_hash_sum(c.name, p, blocks) if track else 0
            with torch.no_grad():
                p.detach()[c.rows] = c.new.to(p.dtype).reshape(c.rows.numel(), *p.shape[1:])
            if track:
                d += block_hash_sum(c.name, p, blocks)
                if fresh:
                    _set_cached_sum(model, c.name, p, (hit[1] + d) % FP_MOD)
                if folder is not None and c.name in folder:
                    folder[c.name] = (folder[c.name] + d) % FP_MOD
    model.__dict__["_log_count"] = model.__dict__.get("_log_count", 0) + len(records)


def writable_tensors(model) -> dict[str, torch.Tensor]:
    """{name: tensor} a record may change: each value table (under its first reading layer) and each layer's
    sub-keys. Everything else (embeddings, norms, projections, the output) is out of a patch's reach."""
    out = {t.state_names[0]: t.weight for t in model.tables}
    for L, layer in model.memory_layers.items():
        out[keys_name(L)] = layer.keys
    return out


def refresh(model) -> int:
    """Apply records other writers appended since ``model`` was loaded; returns how many (call under the lock)."""
    st = Store(model.source)
    start = model.__dict__.get("_log_end", 0)
    new, end, _ = scan_log(st.log, True, start)
    if not start:  # a model loaded without an offset: skip what it already holds
        new = new[model.__dict__.get("_log_count", 0):]
    if new:
        apply_records(model, new)
    model.__dict__["_log_end"] = end
    return len(new)


def frozen_ids(model) -> dict[str, torch.Tensor]:
    """{state name: frozen row ids} for the tensors a record may change (value tables and sub-keys)."""
    stored = frozen_rows(model)
    out = {}
    for t in model.tables:
        if t.name in stored:
            out[t.state_names[0]] = stored[t.name]
    for L in model.memory_layers:
        if f"keys.layer{L}" in stored:
            out[keys_name(L)] = stored[f"keys.layer{L}"]
    return out


def check_changes(model, changes: list[Change], what: str = "the patch") -> None:
    """Refuse, for every kind of change and every path: tensors other than value tables and sub-keys, rows out of
    range, wrong shapes or dtypes, NaN/inf, and frozen rows or sub-keys."""
    params = writable_tensors(model)
    frozen = frozen_ids(model)
    for c in changes:
        p = params.get(c.name)
        if p is None:
            raise MemeditError(f"{what} changes {c.name}, which is not a value table or sub-key tensor of this model; "
                               "only value rows and sub-keys can be patched")
        n = c.rows.numel()
        if c.rows.dim() != 1 or tuple(c.old.shape) != (n, *p.shape[1:]) or tuple(c.new.shape) != (n, *p.shape[1:]):
            raise MemeditError(f"{what}'s rows of {c.label} do not fit the model's {tuple(p.shape)}")
        if n and (int(c.rows.min()) < 0 or int(c.rows.max()) >= p.shape[0]):
            raise MemeditError(f"{what} names rows of {c.label} outside 0..{p.shape[0] - 1}")
        if torch.unique(c.rows).numel() != n:
            raise MemeditError(f"{what} lists a row of {c.label} twice")
        if c.new.dtype != p.dtype or c.old.dtype != p.dtype:
            raise MemeditError(f"{what} stores {c.new.dtype} rows, {c.label} holds {p.dtype}")
        if not (torch.isfinite(c.new.float()).all() and torch.isfinite(c.old.float()).all()):
            raise MemeditError(f"{what}'s rows of {c.label} contain NaN or inf; nothing was written")
        f = frozen.get(c.name)
        if f is not None and f.numel():
            hit = c.rows[torch.isin(c.rows, f)]
            if hit.numel():
                shown = ", ".join(map(str, sorted(hit.tolist())[:8])) + (" ..." if hit.numel() > 8 else "")
                kind = "sub-keys" if c.name.endswith(".keys") else "rows"
                where = c.label if c.name.endswith(".keys") else f"table {c.label}"
                raise MemeditError(f"{kind} {shown} of {where} are frozen; nothing was written (`memedit unfreeze` "
                                   "first)")


def differing(model, changes: list[Change], expect: str = "old") -> list[tuple[Change, torch.Tensor]]:
    """(change, row ids) whose current rows in the model differ from the change's ``expect`` ("old"/"new") rows."""
    params = writable_tensors(model)
    out = []
    for c in changes:
        cur = params[c.name].detach()[c.rows]
        want = getattr(c, expect)
        ne = (cur.reshape(len(c.rows), -1).view(torch.uint8) != want.reshape(len(c.rows), -1).view(torch.uint8))
        bad = c.rows[ne.any(1)] if c.rows.numel() else c.rows
        if bad.numel():
            out.append((c, bad))
    return out


def commit(model, changes: list[Change], head: dict, check=None) -> Record:
    """Apply ``changes`` to the model folder and the model, as one logged record, under the writers' lock.

    Under the lock: records other writers appended are applied first, then ``check(model, changes)`` (which may
    raise, or return replacement changes, e.g. re-based on the current rows), then every rule of
    :func:`check_changes`; the record is appended (the only write), then the rows are set in memory."""
    st = store_of(model)
    with st.locked():
        refresh(model)
        check_changes(model, changes)
        if check is not None:
            changes = check(model, changes) or changes
            check_changes(model, changes)
        changes = [c for c in changes if c.rows.numel()]
        before, after = _fingerprints(model, changes)
        head = dict(head)
        head.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        head.update(tables={c.label: c.rows.numel() for c in changes}, rows={c.label: c.rows.tolist() for c in changes},
                    layers=_layers(model, changes), before=before, after=after)
        rec = st.append(head, changes)
        apply_records(model, [rec])
        model.__dict__["_log_end"] = st.end
        _write_fp_cache(model, st, rec)
    return rec


def _layers(model, changes: list[Change]) -> list[int]:
    out = set()
    for c in changes:
        for t in model.tables:
            if c.name == t.state_names[0]:
                out.update(t.layers)
        out.update(L for L in model.memory_layers if c.name == keys_name(L))
    return sorted(out)


def folder_sums(model) -> dict[str, int]:
    """The row-hash sums of the folder's state as the store last wrote or read it (computed once from the model,
    which then holds exactly the folder's rows, when the base did not store them)."""
    if "_store_sums" not in model.__dict__:
        model.__dict__["_store_sums"] = dict(tensor_sums(model))
    return model.__dict__["_store_sums"]


def _fingerprints(model, changes: list[Change]) -> tuple[str, str]:
    """The folder's fingerprint before and after ``changes``, from the kept sums and the changed rows only."""
    sums = dict(folder_sums(model))
    before = fingerprint_of(model.config.to_dict(), sums)
    state = native_state(model, contiguous=False)
    for c in changes:
        p = state[c.name]
        blocks = _blocks(c.rows, p)
        d = block_hash_sum(c.name, p, blocks, (c.rows, c.new)) - block_hash_sum(c.name, p, blocks)
        sums[c.name] = (sums[c.name] + d) % FP_MOD
    return before, fingerprint_of(model.config.to_dict(), sums)


# ---- small state files ---------------------------------------------------------------------------------------
def replace_file(model, name: str, write) -> None:
    """Replace ``memedit/{name}`` atomically under the writers' lock; ``write(tmp_path)`` writes the new content."""
    st = store_of(model)
    with st.locked(), atomic_path(st.dir / name, crash=f"replace-{name}") as tmp:
        write(tmp)


# ---- load, compact --------------------------------------------------------------------------------------------
def open_folder(model, folder: Path, state: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Finish loading a native folder into ``model`` (its tensors already set from the mapped base): seed the
    fingerprint sums from the base's metadata, then apply the row log's complete records the base does not hold."""
    st = Store(folder)
    fp = stored_sums(meta) or {}
    if fp:
        state = native_state(model, contiguous=False)
        for name, t in state.items():
            if name in fp:
                _set_cached_sum(model, name, t, fp[name])
        if set(fp) == set(state):
            model.__dict__["_store_sums"] = dict(fp)
    records, end, _ = scan_log(st.log)
    model.__dict__["_log_end"] = end
    folded = st.folded(meta)
    if folded > len(records) or (folded and records[folded - 1].sha != meta.get("memedit.head")):
        raise MemeditError(f"the row log of {folder} does not match its weights (the base holds {folded} records, "
                           f"the log has {len(records)}); run `memedit check --model {folder}`")
    model.__dict__["_log_count"] = folded
    apply_records(model, records[folded:])
    if "_store_sums" not in model.__dict__:  # a base written without sums: perhaps a writer cached them
        cached = _read_fp_cache(st, records)
        if cached is not None:
            model.__dict__["_store_sums"] = dict(cached)
            for name, t in native_state(model, contiguous=False).items():
                if name in cached:
                    _set_cached_sum(model, name, t, cached[name])


def stored_sums(meta: dict[str, str]) -> dict[str, int] | None:
    """The fingerprint sums a base stores in its metadata; None when it has none or they are unreadable."""
    try:
        fp = json.loads(meta["memedit.fp"])
        return {str(k): int(v, 16) for k, v in fp.items()}
    except (KeyError, ValueError, TypeError, AttributeError):
        return None


FP_CACHE = "fingerprint.json"


def _base_id(st: Store) -> list[int]:
    s = st.base.stat()
    return [s.st_size, s.st_mtime_ns, s.st_ino]


def _read_fp_cache(st: Store, records: list[Record]) -> dict[str, int] | None:
    """The folder's fingerprint sums a writer cached for this base and exactly these records, else None."""
    try:
        c = json.loads((st.dir / FP_CACHE).read_text())
        if c["base"] != _base_id(st) or c["records"] != len(records) or \
                c["head"] != (records[-1].sha if records else ""):
            return None
        return {k: int(v, 16) for k, v in c["sums"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_fp_cache(model, st: Store, rec: Record) -> None:
    """Cache the folder's sums (for a base that does not store them), so the next process need not hash it all."""
    sums = model.__dict__.get("_store_sums")
    if sums is None or "memedit.fp" in st.base_meta():
        return
    c = {"base": _base_id(st), "records": len(st.records(with_rows=False)), "head": rec.sha,
         "sums": {k: f"{v:032x}" for k, v in sums.items()}}
    atomic_write_text(st.dir / FP_CACHE, json.dumps(c))


def base_metadata(model, records: list[Record]) -> dict[str, str]:
    """Metadata for a new base holding every one of ``records``: folded count, head hash, fingerprint sums."""
    meta = {"format": FORMAT, "memedit.folded": str(len(records)),
            "memedit.fp": json.dumps({k: f"{v:032x}" for k, v in tensor_sums(model).items()})}
    if records:
        meta["memedit.head"] = records[-1].sha
    return meta


def write_base(model, path: Path, records: list[Record]) -> None:
    """Write the model's native state as a base file at ``path`` (a temp path: the caller renames it)."""
    state = native_state(model, contiguous=False)
    if any(is_sharded(t) for t in state.values()):  # a table mapped from shards is written a block at a time
        return write_native_base(model, path, base_metadata(model, records))
    save_file(native_state(model), str(path), metadata=base_metadata(model, records))


def write_native_base(model, path: Path, metadata: dict[str, str], progress=None) -> None:
    """A safetensors file of the model's native state written a block of rows at a time (a table mapped from
    shards is never held whole), with ``metadata``; readable by safetensors and read_header."""
    state = native_state(model, contiguous=False)
    names = sorted(state)
    header: dict = {"__metadata__": dict(metadata)}
    off = 0
    for n in names:
        t = state[n]
        nbytes = t.numel() * t.element_size()
        header[n] = {"dtype": TORCH_ST[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    js = json.dumps(header, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    done = 0
    with open(path, "wb") as f:
        f.write(len(js).to_bytes(8, "little"))
        f.write(js)
        for n in names:
            t = state[n]
            rows = t.shape[0] if t.dim() >= 2 else 1
            step = max(1, (64 << 20) // max(1, t.numel() // max(rows, 1) * t.element_size()))
            for a in range(0, rows, step):
                if is_sharded(t):
                    part = t.row_bytes_of(a, a + step)
                else:
                    part = t.detach().reshape(rows, -1)[a: a + step].contiguous().view(torch.uint8)
                f.write(part.numpy().tobytes())
                done += part.numel()
                if progress is not None:
                    progress(done, off)
        f.flush()
        os.fsync(f.fileno())


def compact(model, native: bool = False) -> dict:
    """Fold the row log into a new base (atomic rename; a process holding the old map keeps its snapshot).

    A linked folder's base is a checkpoint memedit never writes: only with ``native`` does compact write a native
    ``model.safetensors`` (then the link is dropped and the folder stands alone)."""
    st = store_of(model)
    if st.linked and not native:
        size = sum(t.numel() * t.element_size() for t in writable_tensors(model).values())
        raise MemeditError(f"{st.folder} links to its checkpoint (read-only), so there is no base to fold the log "
                           f"into; `memedit compact --native` writes a native model.safetensors (about "
                           f"{size / 1e9:.1f} GB for the tables alone) and drops the link")
    with st.locked():
        refresh(model)
        records = st.records(with_rows=False)
        before = st.base.stat().st_size
        linked, st.base = st.linked, st.folder / "model.safetensors"
        with atomic_path(st.base, crash="compact") as tmp:
            write_base(model, tmp, records)
        crash_point("compact-renamed")
        if linked:  # the native base now takes precedence; the link files are left-overs
            for name in (LINK, LINK_BLOCKS):
                (st.folder / name).unlink(missing_ok=True)
    return {"records": len(records), "folded_before": 0, "bytes_before": before, "bytes": st.base.stat().st_size}


# ---- folders written by earlier versions -----------------------------------------------------------------------
LEGACY_LOG = "edits.jsonl"


def is_legacy(d: Path) -> bool:
    """True for a ``memedit/`` folder written before the row log (its history is in edits.jsonl)."""
    return (d / LEGACY_LOG).is_file() and not (d / LOG).is_file()


def upgrade_dir(d: Path) -> int:
    """Move a v1 edits.jsonl into a new row log (history records, no rows: the base already holds them); returns
    how many entries moved. Idempotent: a crash part-way is finished by running it again."""
    old = d / LEGACY_LOG
    if not old.is_file():
        return 0
    if (d / LOG).is_file():  # a previous upgrade got as far as the new log
        old.unlink()
        return 0
    entries = legacy_log(old)
    data = LOG_MAGIC + b"".join(encode_record(dict(e, legacy=True), []) for e in entries)
    tmp = d / f".{LOG}.upgrade.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, d / LOG)
    crash_point("upgrade-log")
    old.unlink()
    return len(entries)


def fingerprint(model) -> str:
    """16 hex digits identifying the config and every tensor's bytes (a shared table once).

    A hash of the per-tensor sums of block hashes (:func:`block_hash_sum`), so the store keeps it up to date at the
    cost of the rows a write changes, and a tensor changed in memory is re-hashed (noticed by its version counter)."""
    return fingerprint_of(model.config.to_dict(), tensor_sums(model))
