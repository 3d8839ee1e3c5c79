"""Tensors mapped straight from DCP shards: no copy, no unpickling, rows read by pages.

DCP (torch.distributed.checkpoint) writes each saved chunk of a tensor as its own ``torch.save`` archive inside a
``.distcp`` file; ``.metadata`` gives, per chunk, the file, the archive's offset and its length. A ``torch.save``
archive is a zip file whose tensor bytes are one stored (uncompressed) record, ``<archive>/data/0``. So a chunk's
bytes can be found without running any pickle: the archive's central directory names the record, its local header
says where the bytes start; the record's pickle is only *scanned* (``pickletools.genops``, which executes nothing)
to confirm the storage type, offset and strides. The bytes are then mapped copy-on-write (MAP_PRIVATE): pages are
read from disk when a row is used, and a row written in memory never reaches the file.

A value table saved in several row chunks (two ranks, or many items per rank) cannot be one strided tensor over
several mappings, so it becomes a :class:`ShardedRows`: a tensor subclass of the table's shape and dtype whose row
gathers (``table[ids]``, ``F.embedding``, ``index_select``, slices) and row writes (``table[ids] = rows``) go to the
chunk that holds each row. Anything else that would read the whole table is done on a materialised copy when the
table is small, and refused in one line when it is not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import pickletools
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MemeditError
from .blocks import BLOCK, FP_MOD, _rows2d, block_digest, hash_prefix

MATERIALIZE_BYTES = 256 << 20  # a ShardedRows table at most this large may be copied whole for other operations
READ_BYTES = 1 << 20  # ranges of rows this large or larger are read from the files rather than paged in

_LOCAL = struct.Struct("<IHHHHHIIIHH")  # zip local file header (30 bytes)
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory header (46 bytes)
_EOCD = struct.Struct("<IHHHHIIH")  # end of central directory (22 bytes)
_EOCD64_LOC = struct.Struct("<IIQI")  # zip64 end of central directory locator (20 bytes)
_EOCD64 = struct.Struct("<IQHHIIQQQQ")  # zip64 end of central directory record (56 bytes)
_DATA_RECORD = re.compile(r"[^/]+/data/(\d+)")

STORAGE_NAMES = {torch.float32: "FloatStorage", torch.bfloat16: "BFloat16Storage", torch.float16: "HalfStorage",
                 torch.float64: "DoubleStorage", torch.int64: "LongStorage", torch.int32: "IntStorage",
                 torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage",
                 torch.bool: "BoolStorage"}


@dataclass(frozen=True)
class ItemBytes:
    """Where one saved chunk's tensor bytes lie: in ``file`` from ``start``, ``nbytes`` long."""

    file: Path
    start: int  # absolute offset of the first byte of the tensor data in the file
    nbytes: int
    offsets: tuple[int, ...]  # the chunk's place in the whole tensor
    sizes: tuple[int, ...]


def _read_at(f, offset: int, n: int) -> bytes:
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise ValueError("the archive runs past the end of its file")
    return data


def _central_directory(f, base: int, length: int) -> list[tuple[str, int, int, int, int]]:
    """(name, method, compressed size, size, local header offset) of each record of the zip archive stored at
    ``base`` (``length`` bytes) in ``f``; offsets are relative to the archive's start, as torch.save writes them."""
    tail = _read_at(f, base + max(0, length - 65_557), min(length, 65_557))
    at = tail.rfind(struct.pack("<I", 0x06054B50))
    if at < 0 or at + _EOCD.size > len(tail):
        raise ValueError("no zip end-of-directory record (not a torch.save archive)")
    _, _, _, _, count, cd_size, cd_off, _ = _EOCD.unpack_from(tail, at)
    if count == 0xFFFF or cd_off == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:  # zip64
        loc_at = at - _EOCD64_LOC.size
        if loc_at < 0:
            raise ValueError("zip64 archive without its locator")
        sig, _, eocd64_off, _ = _EOCD64_LOC.unpack_from(tail, loc_at)
        if sig != 0x07064B50:
            raise ValueError("zip64 archive without its locator")
        rec = _EOCD64.unpack(_read_at(f, base + eocd64_off, _EOCD64.size))
        if rec[0] != 0x06064B50:
            raise ValueError("bad zip64 end-of-directory record")
        count, cd_size, cd_off = rec[7], rec[8], rec[9]
    if cd_off + cd_size > length or count > 1_000:
        raise ValueError("its zip directory lies outside the archive")
    cd = _read_at(f, base + cd_off, cd_size)
    out, p = [], 0
    for _ in range(count):
        if p + _CENTRAL.size > len(cd):
            raise ValueError("truncated zip directory")
        (sig, _, _, flags, method, _, _, _, csize, usize, nlen, xlen, clen, _, _, _, local) = \
            _CENTRAL.unpack_from(cd, p)
        if sig != 0x02014B50:
            raise ValueError("bad zip directory entry")
        name = cd[p + 46: p + 46 + nlen].decode("utf-8", "replace")
        extra = cd[p + 46 + nlen: p + 46 + nlen + xlen]
        if 0xFFFFFFFF in (csize, usize, local):  # zip64 extra field: the sizes and offset that overflowed, in order
            q = 0
            while q + 4 <= len(extra):
                tag, size = struct.unpack_from("<HH", extra, q)
                if tag == 1:
                    vals = list(struct.unpack_from(f"<{size // 8}Q", extra, q + 4))
                    if usize == 0xFFFFFFFF:
                        usize = vals.pop(0)
                    if csize == 0xFFFFFFFF:
                        csize = vals.pop(0)
                    if local == 0xFFFFFFFF:
                        local = vals.pop(0)
                    break
                q += 4 + size
        out.append((name, method | (flags & 1) << 16, csize, usize, local))  # bit 16: encrypted
        p += 46 + nlen + xlen + clen
    return out


def _record_start(f, base: int, local: int) -> int:
    head = _read_at(f, base + local, _LOCAL.size)
    sig, _, _, _, _, _, _, _, _, nlen, xlen = _LOCAL.unpack(head)
    if sig != 0x04034B50:
        raise ValueError("bad zip local header")
    return local + _LOCAL.size + nlen + xlen


def _scan_pickle(data: bytes) -> tuple[list[str], list[int]]:
    """The globals a torch.save pickle names and the integers that follow its storage reference (storage offset,
    sizes, strides), read with ``pickletools.genops``: nothing is executed."""
    names, ints, after = [], [], False
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            names.append(str(arg).replace(" ", "."))
        elif op.name == "BINPERSID":
            after = True
        elif after and op.name in ("BININT", "BININT1", "BININT2", "LONG1", "INT", "LONG"):
            ints.append(int(arg))
    return names, ints


def locate(folder: Path, metadata, fqn: str) -> list[ItemBytes]:
    """Where each saved chunk of ``fqn`` lies in the ``.distcp`` files of ``folder`` (checked, never unpickled).

    Refused in one line: an item saved with transforms (compression, encryption) or in another serialization format
    (DCP's safetensors files), a compressed record, a record that is not the chunk's plain contiguous bytes."""
    md = metadata.state_dict_metadata[fqn]
    dtype = md.properties.dtype
    itemsize = torch.empty(0, dtype=dtype).element_size()
    storage = {(idx.fqn, tuple(int(x) for x in (idx.offset or ()))): info
               for idx, info in (getattr(metadata, "storage_data", None) or {}).items() if idx.fqn == fqn}
    out = []
    for chunk in md.chunks:
        offsets, sizes = tuple(int(x) for x in chunk.offsets), tuple(int(x) for x in chunk.sizes)
        info = storage.get((fqn, offsets))
        where = f"{folder}: {fqn} (chunk at {list(offsets)})"
        if info is None or getattr(info, "relative_path", None) is None:
            raise MemeditError(f"{where} has no storage entry in .metadata")
        if getattr(info, "transform_descriptors", None):
            raise MemeditError(f"{where} was saved with transforms ({', '.join(map(str, info.transform_descriptors))}"
                               "); memedit maps only plain torch.save items")
        rel = Path(str(info.relative_path))
        path = folder / rel
        if rel.is_absolute() or ".." in rel.parts or not path.is_file():
            raise MemeditError(f"{where}: its shard file {str(rel)!r} is not a file inside the folder")
        numel = 1
        for s in sizes:
            numel *= s
        base, length = int(info.offset), int(info.length)
        try:
            fsize = path.stat().st_size
            if base < 0 or length < 0 or base + length > fsize:
                raise ValueError(f"the item lies outside {rel} ({fsize} bytes)")
            with open(path, "rb") as f:
                if _read_at(f, base, 4) != b"PK\x03\x04":
                    raise MemeditError(f"{where} is not a torch.save archive (saved in another serialization "
                                       "format); memedit maps only torch.save items")
                records = _central_directory(f, base, length)
                data = [r for r in records if _DATA_RECORD.fullmatch(r[0])]
                pkl = [r for r in records if r[0].endswith("/data.pkl")]
                if len(data) != 1 or len(pkl) != 1:
                    raise ValueError(f"{len(data)} data records and {len(pkl)} pickles where one of each belongs")
                name, method, csize, usize, local = data[0]
                if method != 0 or csize != usize:
                    raise ValueError(f"its data record {name} is compressed or encrypted")
                if usize != numel * itemsize:
                    raise ValueError(f"its data record holds {usize} bytes, the chunk {sizes} of {dtype} needs "
                                     f"{numel * itemsize}")
                start = _record_start(f, base, local)
                if start + usize > length:
                    raise ValueError("its data record runs past the archive")
                _, pmethod, pcsize, _, plocal = pkl[0]
                if pmethod != 0 or pcsize > 1 << 20:
                    raise ValueError("its pickle record is compressed or too large")
                names, ints = _scan_pickle(_read_at(f, base + _record_start(f, base, plocal), pcsize))
        except MemeditError:
            raise
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
            raise MemeditError(f"{folder}: cannot read the DCP shards ({fqn}, chunk at {list(offsets)}: {e})") from None
        want = f"torch.{STORAGE_NAMES.get(dtype, '?')}"
        contiguous = [1] * len(sizes)
        for i in range(len(sizes) - 2, -1, -1):
            contiguous[i] = contiguous[i + 1] * sizes[i + 1]
        if want not in names or "torch._utils._rebuild_tensor_v2" not in names:
            raise MemeditError(f"{where} is not one plain {dtype} tensor (its pickle names {', '.join(names)[:120]})")
        if ints[: 1 + 2 * len(sizes)] != [0, *sizes, *contiguous]:
            raise MemeditError(f"{where} is not stored as one contiguous tensor (offset, sizes, strides "
                               f"{ints[: 1 + 2 * len(sizes)]})")
        out.append(ItemBytes(path, base + start, usize, offsets, sizes))
    return out


def _file_storage(path: Path, files: dict) -> torch.UntypedStorage:
    """The whole file mapped copy-on-write, once per ``files`` (one per load: rows a model writes in its private
    pages must not show in another model of the same process; a map costs address space, not memory)."""
    key = str(path.resolve())
    if key not in files:
        try:
            files[key] = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
        except (OSError, RuntimeError) as e:
            raise MemeditError(f"cannot map {path}: {e}") from None
        _advise_random(files[key])
    return files[key]


def _advise_random(storage: torch.UntypedStorage) -> None:
    """madvise(MADV_RANDOM) on a mapped file: a page fault reads its page, not the ~128 KiB around it. Lookups read
    rows scattered over the table (2 KiB each); with the kernel's read-around every row cost 64 times its size from
    disk. Whole ranges are read with pread instead (:meth:`ShardedRows.row_bytes_of`), which keeps readahead."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise(ctypes.c_void_p(storage.data_ptr()), ctypes.c_size_t(storage.nbytes()),
                     getattr(mmap, "MADV_RANDOM", 1))
    except (OSError, AttributeError):  # no libc (not Linux): the default advice, slower but correct
        pass


def map_bytes(item: ItemBytes, files: dict) -> torch.Tensor:
    """The chunk's bytes over the mapped file, (rows, bytes per row) uint8 (no copy)."""
    t = torch.empty(0, dtype=torch.uint8)
    if item.nbytes:
        t = t.set_(_file_storage(item.file, files), item.start, (item.nbytes,))
    return t.reshape(item.sizes[0], -1) if item.sizes and item.sizes[0] else t.reshape(0, 0)


def map_item(item: ItemBytes, dtype: torch.dtype, files: dict) -> torch.Tensor | None:
    """The chunk's tensor over the mapped file (no copy), or None when its bytes are not aligned for ``dtype``
    (torch.save aligns data within its archive, but DCP places archives at any byte of the file)."""
    if item.start % torch.empty(0, dtype=dtype).element_size():
        return None
    t = torch.empty(0, dtype=torch.uint8)
    if item.nbytes:
        t = t.set_(_file_storage(item.file, files), item.start, (item.nbytes,))
    return t.view(dtype).reshape(item.sizes)


def row_chunks(items: list[ItemBytes], shape: tuple[int, ...]) -> bool:
    """Whether the chunks are whole rows (each spans every other dimension) that tile dim 0 exactly once."""
    if not shape or not items:
        return False
    spans = sorted((i.offsets[0], i.sizes[0]) for i in items
                   if all(o == 0 for o in i.offsets[1:]) and tuple(i.sizes[1:]) == tuple(shape[1:]))
    if len(spans) != len(items):
        return False
    at = 0
    for start, n in spans:
        if start != at:
            return False
        at += n
    return at == shape[0]


def read_items(items: list[ItemBytes], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The tensor assembled from its chunks' bytes, read (a copy: for tensors that are small, or whose bytes are
    not aligned for their dtype)."""
    out = torch.empty(shape, dtype=dtype)
    for i in items:
        buf = torch.empty(i.nbytes, dtype=torch.uint8)
        with open(i.file, "rb") as f:
            f.seek(i.start)
            if i.nbytes and f.readinto(buf.numpy()) != i.nbytes:
                raise MemeditError(f"{i.file} is truncated (a tensor's bytes run past its end)")
        out[tuple(slice(o, o + s) for o, s in zip(i.offsets, i.sizes, strict=True))] = buf.view(dtype).reshape(i.sizes)
    return out


def map_tensor(folder: Path, metadata, fqn: str, rows_table: bool = False, files: dict | None = None
               ) -> torch.Tensor:
    """``fqn`` from the shards: a plain mapped tensor when one chunk holds it (and its bytes are aligned), a
    :class:`ShardedRows` when several row chunks hold it and ``rows_table`` (a value table, read by rows), else
    read and assembled from its chunks (:func:`read_items`). ``files``: the maps of this load (tensors mapped
    with the same dict share them)."""
    files = {} if files is None else files
    md = metadata.state_dict_metadata[fqn]
    shape, dtype = tuple(int(x) for x in md.size), md.properties.dtype
    items = locate(folder, metadata, fqn)
    if len(items) == 1 and items[0].offsets == (0,) * len(shape) and items[0].sizes == shape:
        t = map_item(items[0], dtype, files)
        if t is not None:
            return t
    if rows_table and len(shape) == 2 and row_chunks(items, shape):
        items = sorted(items, key=lambda i: i.offsets[0])
        return ShardedRows([i.offsets[0] for i in items], [map_bytes(i, files) for i in items], shape, dtype,
                           [(i.file, i.start) for i in items])
    return read_items(items, shape, dtype)


# ---- a table over several mapped row chunks ----------------------------------------------------------------
_aten = torch.ops.aten
_NEW = (_aten.new_empty.default, _aten.new_zeros.default, _aten.new_ones.default, _aten.new_full.default,
        _aten.new_empty_strided.default)


class ShardedRows(torch.Tensor):
    """A (rows, width) table whose rows lie in several tensors (mapped chunks of bytes, (rows, bytes per row) uint8,
    at any alignment): gathers and row writes go to the chunk holding each row; every other operation runs on a
    materialised copy when the table is at most
    MATERIALIZE_BYTES, and is refused in one line when it is larger (it would read the whole table into memory)."""

    @staticmethod
    def __new__(cls, starts: list[int], chunks: list[torch.Tensor], shape, dtype, sources=None):
        t = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device="cpu", requires_grad=False)
        t.starts = list(starts)
        t.sources = sources  # (file, byte offset) of each chunk: ranges of rows are read from there
        t.row_bytes = t.element_size() * int(shape[1])
        # each chunk viewed as the widest integers its alignment allows: a gather copies 256 int64 per 2 KiB row
        # instead of 2,048 bytes (2.5x faster)
        t._wide = [_widest(c) for c in chunks]
        t.chunks = list(chunks)
        t._bounds = torch.tensor(list(starts)[1:], dtype=torch.long)
        # the fingerprint kept per block: digests (blocks, 16) uint8 once computed or given (a linked folder stores
        # them), the blocks written since, and every block ever written in this process (those rows live in private
        # pages of the map, not in the file); shared by every alias of the table
        t.fp = {"digests": None, "dirty": set(), "written": set()}
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"ShardedRows(shape={tuple(self.shape)}, dtype={self.dtype}, chunks={len(self.chunks)})"

    def _alias(self) -> ShardedRows:
        t = ShardedRows(self.starts, self.chunks, self.shape, self.dtype, self.sources)
        t.fp = self.fp  # one table: aliases share what was written
        return t

    # rows --------------------------------------------------------------------------------------------------
    def _split(self, flat: torch.Tensor):
        """(chunk index, positions in ``flat``, local row ids) for each chunk that ``flat`` (row ids) touches."""
        n = self.shape[0]
        if flat.numel() and (int(flat.min()) < -n or int(flat.max()) >= n):
            raise IndexError(f"row index out of range for a table of {n} rows")
        flat = torch.where(flat < 0, flat + n, flat)
        which = torch.bucketize(flat, self._bounds, right=True)  # chunk of each row
        order = torch.argsort(which, stable=True)
        counts = torch.bincount(which, minlength=len(self.chunks)).tolist()
        at = 0
        for c, k in enumerate(counts):
            if k:
                pos = order[at: at + k]
                yield c, pos, flat[pos] - self.starts[c]
            at += k

    def gather(self, ids: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``ids`` (any shape of int64) as a new tensor of shape ids.shape + (width,) (or written into
        ``into``, contiguous (n, width) of the table's dtype)."""
        flat = ids.reshape(-1).long()
        out = torch.empty((flat.numel(), self.row_bytes), dtype=torch.uint8) if into is None else \
            into.view(torch.uint8).view(flat.numel(), self.row_bytes)
        parts = list(self._split(flat))
        if len(parts) == 1:  # one chunk: straight into the result
            c, _, local = parts[0]
            w = self._wide[c]
            torch.index_select(w, 0, local, out=out.view(w.dtype))
        elif parts:
            # chunk by chunk on one thread (up to 128 small selects and copies: torch's thread pool made them
            # 4-50x slower on a busy machine); memory: the result and one chunk's share of it
            wide = _widest(out)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for c, pos, local in parts:
                    sel = torch.index_select(self._wide[c], 0, local)
                    wide.index_copy_(0, pos, sel.view(torch.uint8).view(wide.dtype))
            finally:
                torch.set_num_threads(threads)
        return into if into is not None else out.view(self.dtype).reshape(*ids.shape, *self.shape[1:])

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Rows a..b-1: a view of the mapped chunk when one chunk holds them, else a copy."""
        out = self.row_bytes_of(a, b)
        if out.storage_offset() % self.element_size():
            out = out.clone()  # a view at an odd byte cannot be read as wider elements
        return out.view(self.dtype)

    def row_bytes_of(self, a: int, b: int) -> torch.Tensor:
        """The bytes of rows a..b-1, (rows, bytes per row) uint8: a view of the map when one chunk holds a few
        rows; a range of READ_BYTES or more is read from the files (sequential, with readahead) and the blocks
        written in memory are laid over it from the map."""
        a, b = max(0, a), min(self.shape[0], b)
        if b <= a:
            return torch.empty((0, self.row_bytes), dtype=torch.uint8)
        if self.sources is None or (b - a) * self.row_bytes < READ_BYTES:
            return self._mapped_bytes(a, b)
        out = torch.empty((b - a, self.row_bytes), dtype=torch.uint8)
        at, c = a, int(torch.bucketize(torch.tensor(a), self._bounds, right=True))
        while at < b:
            s, e = self.starts[c], self.starts[c] + self.chunks[c].shape[0]
            hi = min(b, e)
            path, start = self.sources[c]
            fd = os.open(path, os.O_RDONLY)
            try:
                view = memoryview(out[at - a: hi - a].numpy()).cast("B")
                got, want, pos = 0, (hi - at) * self.row_bytes, start + (at - s) * self.row_bytes
                while got < want:
                    n = os.preadv(fd, [view[got:]], pos + got)
                    if n <= 0:
                        raise MemeditError(f"{path} is truncated (rows {at:,}..{hi - 1:,} run past its end)")
                    got += n
            finally:
                os.close(fd)
            at, c = hi, c + 1
        for blk in sorted(self.fp["written"]):
            lo, hi = max(a, blk * BLOCK), min(b, (blk + 1) * BLOCK)
            if lo < hi:
                out[lo - a: hi - a] = self._mapped_bytes(lo, hi)
        return out

    def _mapped_bytes(self, a: int, b: int) -> torch.Tensor:
        parts = []
        c = int(torch.bucketize(torch.tensor(a), self._bounds, right=True))
        while a < b:
            s = self.starts[c]
            e = s + self.chunks[c].shape[0]
            parts.append(self.chunks[c][a - s: min(b, e) - s])
            a, c = min(b, e), c + 1
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def put(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Write rows ``ids`` (in memory: the chunks are copy-on-write maps) and note their blocks as changed."""
        flat = ids.reshape(-1).long()
        values = values.to(self.dtype).reshape(-1, *self.shape[1:]).expand(flat.numel(), *self.shape[1:])
        values = values.contiguous().view(torch.uint8)
        for c, pos, local in self._split(flat):
            self.chunks[c][local] = values[pos]
        n = self.shape[0]
        blocks = torch.unique(torch.where(flat < 0, flat + n, flat) // BLOCK).tolist()
        self.fp["dirty"].update(blocks)
        self.fp["written"].update(blocks)

    def fingerprint_sum(self, name: str) -> int:
        """The table's fingerprint sum (store.block_hash_sum's value) from its per-block digests: every block hashed
        the first time (threads, at disk speed), then only the blocks written since."""
        fp = self.fp
        if fp["digests"] is None:
            fp["digests"], fp["dirty"] = block_digests(name, self), set()
        elif fp["dirty"]:
            blocks = sorted(fp["dirty"])
            fp["dirty"] = set()
            prefix = hash_prefix(name, self)
            for b, d in zip(blocks, _digest_blocks(prefix, self, blocks), strict=True):
                fp["digests"][b] = np.frombuffer(d, dtype=np.uint8)
        return digest_sum(fp["digests"]) % FP_MOD

    def materialize(self, what: str = "this operation") -> torch.Tensor:
        nbytes = self.numel() * self.element_size()
        if nbytes > MATERIALIZE_BYTES:
            raise MemeditError(f"{what} would read the whole {tuple(self.shape)} value table into memory "
                               f"({nbytes / 2**30:.1f} GiB, mapped from the shards); memedit reads it by rows")
        return self.rows(0, self.shape[0]).clone()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self = args[0] if args and isinstance(args[0], ShardedRows) else None
        if self is not None:
            if func in (_aten.detach.default, _aten.alias.default):
                return self._alias()
            if func in (_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default) and \
                    _same_shape(args[1], self.shape):
                return self._alias()
            if func is _aten.index.Tensor and len(args[1]) == 1 and args[1][0] is not None and \
                    not args[1][0].dtype.is_floating_point and args[1][0].dtype != torch.bool:
                return self.gather(args[1][0])
            if func is _aten.index_select.default and args[1] == 0:
                return self.gather(args[2])
            if func is _aten.index_select.out and args[1] == 0:
                out, shape = kwargs["out"], (args[2].numel(), *self.shape[1:])
                if out.dtype == self.dtype and out.is_contiguous() and tuple(out.shape) == shape and \
                        out.storage_offset() % 8 == 0:
                    return self.gather(args[2], into=out)
                return out.resize_(shape).copy_(self.gather(args[2]))
            if func in _NEW:  # a new tensor of the table's dtype, not the table
                return func(torch.empty(0, dtype=self.dtype), *args[1:], **kwargs)
            if func is _aten.select.int and args[1] == 0:
                i = args[2] + self.shape[0] if args[2] < 0 else args[2]
                return self.rows(i, i + 1)[0].clone()
            if func is _aten.slice.Tensor and (args[1] if len(args) > 1 else kwargs.get("dim", 0)) == 0:
                start, end, step = (list(args[2:]) + [None, None, 1])[:3]
                start = 0 if start is None else (start + self.shape[0] if start < 0 else start)
                end = self.shape[0] if end is None else (end + self.shape[0] if end < 0 else end)
                return self.rows(start, end)[:: step or 1].clone()
            if func in (_aten.index_put_.default, _aten._index_put_impl_.default) and len(args[1]) == 1 and \
                    args[1][0] is not None and args[1][0].dtype != torch.bool and not (args[3:4] and args[3]):
                self.put(args[1][0], args[2])
                return self
        if func is _aten.embedding.default and isinstance(args[0], ShardedRows):
            return args[0].gather(args[1])
        # anything else: on a materialised copy (small tables), else refused; a change in place would be lost
        where = f"{func}"
        if self is not None and func.overloadpacket.__name__.endswith("_"):
            raise MemeditError(f"{where} on a value table mapped from shards is not supported (rows are written "
                               "with table[ids] = rows)")
        out = func(*[a.materialize(where) if isinstance(a, ShardedRows) else a for a in args],
                   **{k: v.materialize(where) if isinstance(v, ShardedRows) else v for k, v in kwargs.items()})
        return out


def _widest(rows: torch.Tensor) -> torch.Tensor:
    """(rows, bytes) uint8 as (rows, bytes / w) of the widest integer type w its offset and row length allow."""
    for dt, w in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if rows.storage_offset() % w == 0 and rows.shape[-1] % w == 0:
            return rows.view(dt)
    return rows


def _same_shape(shape, have) -> bool:
    shape = list(shape)
    if shape.count(-1) == 1:
        known = 1
        for s in shape:
            known *= s if s != -1 else 1
        total = 1
        for s in have:
            total *= s
        shape[shape.index(-1)] = total // max(known, 1)
    return tuple(shape) == tuple(have)


def is_sharded(t) -> bool:
    return isinstance(t, ShardedRows)


def file_identity(path: Path) -> dict:
    """What tells a file apart cheaply: size, modification time (ns), inode."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


# ---- per-block digests (the fingerprint of memedit.storage.store, computed at disk speed) ---------------------------
def _block_bytes(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows a..b-1 of ``t`` as (rows, bytes) uint8, as store.block_hash_sum reads them."""
    if isinstance(t, ShardedRows):
        return t.row_bytes_of(a, b)
    m = _rows2d(t)[a:b].contiguous()
    return m.view(torch.uint8).reshape(m.shape[0], -1)


def _digest_blocks(prefix: bytes, t: torch.Tensor, blocks: list[int]) -> list[bytes]:
    n = t.shape[0] if t.dim() >= 2 else 1
    out = []
    for b in blocks:
        data = _block_bytes(t, b * BLOCK, min(n, (b + 1) * BLOCK)).numpy()
        out.append(block_digest(prefix, b, data).to_bytes(16, "little"))
    return out


def block_digests(name: str, t: torch.Tensor, progress=None):
    """Every block's digest of ``t`` under ``name``, (blocks, 16) uint8, hashed by all cores (sha256 releases the
    GIL), a span of blocks per task, so the sum equals store.block_hash_sum(name, t). ``progress(done, total)``."""
    n = t.shape[0] if t.dim() >= 2 else 1
    nblocks = max(1, (n + BLOCK - 1) // BLOCK) if t.dim() >= 2 else 1
    prefix = hash_prefix(name, t)
    span = 64  # blocks per task: 8 MiB of 2 KiB rows
    starts = list(range(0, nblocks, span))
    out = np.empty((nblocks, 16), dtype=np.uint8)

    def task(s: int) -> tuple[int, list[bytes]]:
        e = min(nblocks, s + span)
        data = _block_bytes(t, s * BLOCK, min(n, e * BLOCK)).numpy()  # the span read once (pread for a big table)
        step = BLOCK * (data.shape[1] if data.ndim == 2 else 0)
        flat = data.reshape(-1)
        return s, [block_digest(prefix, b, flat[(b - s) * step: (b - s + 1) * step] if step else flat)
                   .to_bytes(16, "little") for b in range(s, e)]

    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as ex:
        for done, (s, ds) in enumerate(ex.map(task, starts), 1):
            out[s: s + len(ds)] = np.frombuffer(b"".join(ds), dtype=np.uint8).reshape(-1, 16)
            if progress is not None:
                progress(done, len(starts))
    return out


def digest_sum(digests) -> int:
    """The sum of (blocks, 16) little-endian 128-bit digests, as an integer (not reduced)."""
    words = np.ascontiguousarray(digests).view("<u8").reshape(-1, 2).astype(object)
    return int(words[:, 0].sum()) + (int(words[:, 1].sum()) << 64) if len(words) else 0
