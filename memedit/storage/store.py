"""The model store: the only code that changes a native model folder.

    model.safetensors     the base weights; immutable once written (``compact`` replaces it by atomic rename).
                          Its metadata holds "memedit.folded" (how many row-log records it already contains),
                          "memedit.head" (the sha256 of the last of those records) and "memedit.fp" (per tensor
                          row-hash sums for the fingerprint).
    memedit/rows.log      the append-only row log, which is also the journal and the edit log: one checksummed
                          record per applied or reverted change (tensor names, row ids, old rows, new rows, id, op,
                          message, fingerprints before and after).
    memedit/lock          the writers' lock (``fcntl.flock``); it holds the pid and command of the holder.
    memedit/frozen.safetensors, memedit/background.safetensors   small files, replaced atomically under the lock.

Writers serialise on the lock; readers never lock: they map the base and apply the log's complete records, so they
never see half a change (SQLite's rollback-journal idea, turned into a redo log: docs/ has no copy; see the
module tests in tests/test_store.py). A torn last record (a writer killed mid-append) is ignored by readers and
cut off by the next writer. A write costs the rows it changes: the record holds only those rows.

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
import struct
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MemeditError

LOG = "rows.log"
LOCK = "lock"
LOG_MAGIC = b"MEMEDIT-ROWLOG\x00\x01"  # the last byte is the log format version
REC_MAGIC = b"MREC"
REC_HEAD = struct.Struct("<4sQI")
RECORD_VERSION = 1
MAX_RECORD = 1 << 36  # a length field beyond this is damage, not a record
CRASH_ENV = "MEMEDIT_CRASH_AT"
NO_WAIT_ENV = "MEMEDIT_NO_WAIT"
STATE_DIR = "memedit"

ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
TORCH_ST = {v: k for k, v in ST_DTYPES.items()}


def crash_point(name: str) -> None:
    """Die like kill -9 at the named write point when $MEMEDIT_CRASH_AT says so (tests of recovery)."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)


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
FP_MOD = 1 << 128


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


BLOCK = 64  # rows per hashed block: a write re-hashes the blocks of the rows it changes (64 rows of 2 KiB: 128 KiB)


def block_hash_sum(name: str, t: torch.Tensor, blocks: list[int] | None = None,
                   sub: tuple[torch.Tensor, torch.Tensor] | None = None) -> int:
    """The sum (mod 2**128) of sha256(name, block index, block bytes) over the blocks of BLOCK rows of ``t`` (all,
    or the given ones; ``sub`` = (row ids, rows) replaces those rows first, without touching ``t``).

    A multiset hash: changing rows changes the sum by hash(new blocks) - hash(old blocks), so a write updates the
    fingerprint at the cost of the blocks it touched, and reverting restores it exactly."""
    m = _rows2d(t)
    n = m.shape[0]
    prefix = f"{name}:{t.dtype}:{tuple(t.shape)}:".encode()
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
        h = hashlib.sha256(prefix)
        h.update(f"{b}:".encode())
        h.update(chunk.contiguous().view(torch.uint8).numpy())
        total += int.from_bytes(h.digest()[:16], "little")
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
    from .checkpoint import native_state

    cache: dict = model.__dict__.setdefault("_fp_cache", {})
    out = {}
    for name, t in native_state(model, contiguous=False).items():
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


_SCANNED: dict[tuple, tuple[list[Record], int, bytes]] = {}  # (path, dev, ino, with_rows) -> (records, end, tail)


def scan_log(path: Path, with_rows: bool = True, start: int = 0) -> tuple[list[Record], int, int]:
    """(complete records, byte offset where they end, file size) of a row log; a torn or damaged tail is left out.

    Records already read by this process are reused (the log is append-only; a replaced file has a new inode, and
    the last record's framing is compared to be sure), so reading the log after each write costs the new records."""
    if start:
        return _scan_log(path, with_rows, start)
    try:
        s = os.stat(path)
    except FileNotFoundError:
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
                return list(records), end, s.st_size
            more, end2, size = _scan_log(path, with_rows, end)
            records = records + more
        else:
            hit = None
    if hit is None:
        records, end2, size = _scan_log(path, with_rows, 0)
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            n = min(end2, 64)
            f.seek(end2 - n)
            _SCANNED[key] = (records, end2, f.read(n))
    return list(records), end2, size


def _scan_log(path: Path, with_rows: bool = True, start: int = 0) -> tuple[list[Record], int, int]:
    """(complete records, byte offset where they end, file size) of a row log (from byte ``start``, the end of
    records already read); a torn or damaged tail is left out."""
    try:
        with open(path, "rb") as f:
            if start:
                head = f.read(len(LOG_MAGIC))
                f.seek(start)
                data = head + f.read()
            else:
                data = f.read()
    except FileNotFoundError:
        return [], 0, 0
    except OSError as e:
        raise MemeditError(f"cannot read {path}: {e.strerror or e}") from None
    if not data.startswith(LOG_MAGIC):
        if len(data) < len(LOG_MAGIC) and LOG_MAGIC.startswith(data):
            return [], 0, len(data)  # a log whose creation was cut short
        if data[: len(LOG_MAGIC) - 1] == LOG_MAGIC[:-1]:
            raise MemeditError(f"{path} has row-log format {data[len(LOG_MAGIC) - 1]}, newer than this memedit")
        raise MemeditError(f"{path} is not a memedit row log; run `memedit check --model {path.parent.parent}`")
    pos, out = len(LOG_MAGIC), []
    shift = start - pos if start else 0  # offsets in ``data`` are file offsets minus this
    while pos + REC_HEAD.size <= len(data):
        magic, n, crc = REC_HEAD.unpack_from(data, pos)
        end = pos + REC_HEAD.size + n
        if magic != REC_MAGIC or n > MAX_RECORD or end > len(data):
            break
        payload = data[pos + REC_HEAD.size: end]
        if zlib.crc32(payload) != crc:
            break
        try:
            out.append(decode_payload(payload, with_rows))
        except (ValueError, KeyError, struct.error):
            break
        pos = end
    return out, pos + shift, len(data) + shift


# ---- the store -------------------------------------------------------------------------------------------
_HELD: dict[str, int] = {}  # folders whose lock this process holds (flock is per open file: re-locking would block)

class Store:
    """A native model folder seen as a store: its base, its row log and its lock."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.dir = self.folder / STATE_DIR
        self.base = self.folder / "model.safetensors"
        self.log = self.dir / LOG

    # ---- the lock ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, wait: bool | None = None, legacy_ok: bool = False) -> Iterator[Store]:
        """Hold the writers' lock (re-entrant within a process): recover a torn log tail, remove stale temp files.

        A second writer waits with a message, or with $MEMEDIT_NO_WAIT (``memedit --no-wait``) fails naming the
        holder. A folder whose edit log predates the row log is refused until ``memedit check --upgrade``."""
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
            os.ftruncate(fd, 0)
            argv = " ".join([Path(sys.argv[0]).name, *sys.argv[1:5]])[:200] if sys.argv else "python"
            os.pwrite(fd, f"pid {os.getpid()} ({argv})".encode(), 0)
            _HELD[key] = fd
            if not legacy_ok and is_legacy(self.dir):
                raise MemeditError(f"{self.folder} was written by an earlier memedit (edit log in {LEGACY_LOG}); run "
                                   f"`memedit check --upgrade --model {self.folder}` first")
            self.recover()
            yield self
        finally:
            _HELD.pop(key, None)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing releases the flock

    def require_lock(self) -> None:
        if str(self.folder.resolve()) not in _HELD:
            raise RuntimeError("store write without the lock")  # a programming error, not a user error

    def recover(self) -> list[str]:
        """Cut a torn last record and remove temp files left by killed writers (needs the lock); returns what it did."""
        self.require_lock()
        done = []
        records, end, size = scan_log(self.log, with_rows=False)
        if size > end:
            if end == 0:
                self.log.unlink()
                done.append(f"removed an unfinished {self.log.name}")
            else:
                with open(self.log, "rb+") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
                done.append(f"cut a torn record ({size - end} bytes) off {self.log.name}")
        for d in (self.folder, self.dir, self.dir / "patches"):
            if d.is_dir():
                for p in d.glob(".*.tmp"):
                    with contextlib.suppress(OSError):
                        if p.is_dir():
                            import shutil

                            shutil.rmtree(p)
                        else:
                            p.unlink()
                        done.append(f"removed the temp file {p.name}")
        return done

    # ---- reading --------------------------------------------------------------------------------------------
    def records(self, with_rows: bool = True) -> list[Record]:
        return scan_log(self.log, with_rows)[0]

    def base_meta(self) -> dict[str, str]:
        return read_header(self.base)[1]

    def folded(self, meta: dict[str, str] | None = None) -> int:
        meta = self.base_meta() if meta is None else meta
        try:
            return int(meta.get("memedit.folded", "0"))
        except ValueError:
            raise MemeditError(f"{self.base}: bad memedit.folded metadata; run `memedit check`") from None

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
        return decode_payload(data[REC_HEAD.size:], with_rows=True)


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "another memedit process"


def store_of(model) -> Store:
    """The store of a model loaded from a native folder (refuses the bundled model and foreign checkpoints)."""
    from .checkpoint import require_writable

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
    from ..keyspace.keys import keys_name

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
    from ..keyspace.keys import keys_name
    from .state import frozen_rows

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
                raise MemeditError(f"{kind} {shown} of {c.label} are frozen; nothing was written (`memedit unfreeze` "
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
    from ..keyspace.keys import keys_name

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
    from .checkpoint import native_state

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
    from .checkpoint import atomic_path

    st = store_of(model)
    with st.locked(), atomic_path(st.dir / name, crash=f"replace-{name}") as tmp:
        write(tmp)


# ---- load, compact, check ---------------------------------------------------------------------------------------
def open_folder(model, folder: Path, state: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Finish loading a native folder into ``model`` (its tensors already set from the mapped base): seed the
    fingerprint sums from the base's metadata, then apply the row log's complete records the base does not hold."""
    st = Store(folder)
    fp = {}
    with contextlib.suppress(ValueError, TypeError):
        fp = {k: int(v, 16) for k, v in json.loads(meta.get("memedit.fp", "{}")).items()}
    if fp:
        from .checkpoint import native_state

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
            from .checkpoint import native_state

            model.__dict__["_store_sums"] = dict(cached)
            for name, t in native_state(model, contiguous=False).items():
                if name in cached:
                    _set_cached_sum(model, name, t, cached[name])


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
    from .checkpoint import atomic_write_text

    sums = model.__dict__.get("_store_sums")
    if sums is None or "memedit.fp" in st.base_meta():
        return
    c = {"base": _base_id(st), "records": len(st.records(with_rows=False)), "head": rec.sha,
         "sums": {k: f"{v:032x}" for k, v in sums.items()}}
    atomic_write_text(st.dir / FP_CACHE, json.dumps(c))


def base_metadata(model, records: list[Record]) -> dict[str, str]:
    """Metadata for a new base holding every one of ``records``: folded count, head hash, fingerprint sums."""
    from .checkpoint import FORMAT

    meta = {"format": FORMAT, "memedit.folded": str(len(records)),
            "memedit.fp": json.dumps({k: f"{v:032x}" for k, v in tensor_sums(model).items()})}
    if records:
        meta["memedit.head"] = records[-1].sha
    return meta


def write_base(model, path: Path, records: list[Record]) -> None:
    """Write the model's native state as a base file at ``path`` (a temp path: the caller renames it)."""
    from safetensors.torch import save_file

    from .checkpoint import native_state

    save_file(native_state(model), str(path), metadata=base_metadata(model, records))


def compact(model) -> dict:
    """Fold the row log into a new base (atomic rename; a process holding the old map keeps its snapshot)."""
    from .checkpoint import atomic_path

    st = store_of(model)
    with st.locked():
        refresh(model)
        records = st.records(with_rows=False)
        before = st.base.stat().st_size
        with atomic_path(st.base, crash="compact") as tmp:
            write_base(model, tmp, records)
        crash_point("compact-renamed")
    return {"records": len(records), "folded_before": 0, "bytes_before": before, "bytes": st.base.stat().st_size}


# ---- folders written by earlier versions -----------------------------------------------------------------------
LEGACY_LOG = "edits.jsonl"


def is_legacy(d: Path) -> bool:
    """True for a ``memedit/`` folder written before the row log (its history is in edits.jsonl)."""
    return (d / LEGACY_LOG).is_file() and not (d / LOG).is_file()


def upgrade_dir(d: Path) -> int:
    """Move a v1 edits.jsonl into a new row log (history records, no rows: the base already holds them); returns
    how many entries moved. Idempotent: a crash part-way is finished by running it again."""
    from .state import legacy_log

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


def check_folder(folder: str | Path, repair: bool = True, upgrade: bool = False) -> dict:
    """Verify a native folder: config, weights header, row log (framing, chain to the base, rows vs weights),
    frozen set, fingerprint. With ``repair`` (needs write access) cut a torn record and remove temp files; with
    ``upgrade`` move a v1 edit log into the row log. Returns {"ok", "problems", "repaired", "fingerprint", ...}."""
    from .checkpoint import fingerprint, is_native, load_native

    folder = Path(folder)
    problems: list[str] = []
    repaired: list[str] = []
    if not is_native(folder):
        raise MemeditError(f"{folder} is not a native memedit folder (no config.json with format memedit)")
    st = Store(folder)
    writable = os.access(folder, os.W_OK) and (not st.dir.exists() or os.access(st.dir, os.W_OK))
    if (repair or upgrade) and writable:
        with st.locked(legacy_ok=True):  # locking recovers: a torn tail and temp files go
            repaired.extend(st.recover())
            if upgrade and is_legacy(st.dir):
                n = upgrade_dir(st.dir)
                repaired.append(f"moved {n} edit-log entries from {LEGACY_LOG} into {LOG}")
    elif upgrade:
        raise MemeditError(f"{folder} is read-only; cannot upgrade it")
    if is_legacy(st.dir):
        problems.append(f"the edit log is in the old format ({LEGACY_LOG}); run `memedit check --upgrade --model "
                        f"{folder}` before writing")
    _, end, size = scan_log(st.log, with_rows=False)
    if size > end:
        problems.append(f"{LOG} ends in a torn or damaged record ({size - end} bytes); readers ignore it, the next "
                        "writer (or `memedit check`) cuts it off")
    stale = [p.name for d in (folder, st.dir, st.dir / "patches") if d.is_dir() for p in d.glob(".*.tmp")]
    if stale:
        problems.append(f"temp files left by an interrupted write: {', '.join(stale[:4])}")
    model = load_native(folder)  # config, header, chain of the log to the base, frozen file, tokenizer
    records = st.records()
    params = writable_tensors(model)
    for n, r in enumerate(records):
        for c in r.changes:
            if c.name not in params:
                problems.append(f"record {n} ({r.head.get('id')}) changes {c.name}, which is not patchable")
    # the last record touching each row decides its value: the weights must hold it
    last: dict[tuple[str, int], torch.Tensor] = {}
    for r in records:
        for c in r.changes:
            for i, row in zip(c.rows.tolist(), c.new, strict=True):
                last[(c.name, i)] = row
    bad = [k for k, row in last.items() if k[0] in params and not torch.equal(
        params[k[0]].detach()[k[1]].reshape(-1).view(torch.uint8), row.reshape(-1).view(torch.uint8))]
    if bad:
        problems.append(f"{len(bad)} rows differ from the row log (e.g. {bad[0][0]} row {bad[0][1]})")
    frozen_ids(model)  # reads and range-checks the frozen file
    from ..keyspace.keys import frozen_key_rows

    frozen_key_rows(model)
    meta = st.base_meta()
    if "memedit.fp" in meta and st.folded(meta) == len(records):
        with contextlib.suppress(ValueError, TypeError):
            stored = {k: int(v, 16) for k, v in json.loads(meta["memedit.fp"]).items()}
            model.__dict__.pop("_fp_cache", None)
            if stored != tensor_sums(model):
                problems.append("the base's stored fingerprint sums do not match its tensors")
    return {"folder": str(folder), "ok": not problems, "problems": problems, "repaired": repaired,
            "records": len(records), "folded": st.folded(meta), "fingerprint": fingerprint(model)}
