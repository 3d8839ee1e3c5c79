"""Linked native folders: memedit's state beside a checkpoint that stays where it is, read-only.

``memedit convert DST --model STEP --link`` writes DST with ``config.json``, ``tokenizer.json`` and, in place of
``model.safetensors``, ``link.json`` and ``link.blocks``:

    link.json     the source folder (absolute path), the identity of each file the base is read from (size,
                  modification time, inode; sha256 of the small ones: .metadata, params.json), the base's metadata
                  as a native base stores it (folded records: 0, the fingerprint sums), and where each tensor's
                  block digests lie in link.blocks.
    link.blocks   the fingerprint kept per block: sha256 of every BLOCK rows of every tensor (16 bytes each; 4 MiB
                  for a 16.8M-row table), so a write re-hashes only its blocks and ``memedit check`` can say which
                  blocks of the source changed.

Loading maps the source's tensors (storage.shards: no copy) after checking, in one line, that the source is still
there and unchanged (a moved or changed source is refused: stat and two small hashes, milliseconds). Every change
goes to the row log as in any native folder (store.py: lock, log, revert, check); the source is never written:
its files are mapped copy-on-write. ``memedit compact --native`` writes a native ``model.safetensors`` holding the
folded log (streamed a block of rows at a time), after which the folder no longer needs its source.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import MemeditError
from .blocks import FP_MOD
from .folder import (  # noqa: F401 (is_linked, link_meta, read_link, LINK: re-exported, their old home)
    LINK, LINK_BLOCKS, LINK_FORMAT, is_linked, link_meta, native_state, read_link)
from .importers.dcp import DcpState, is_dcp
from .importers.safe import read_dcp_metadata
from .shards import block_digests, digest_sum, file_identity, is_sharded
from .store import _set_cached_sum, stored_sums, write_native_base  # noqa: F401 (write_native_base: re-exported)

BLOCKS = LINK_BLOCKS
SMALL = 16 << 20  # files up to this size are identified by their sha256 too


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def source_files(src: Path) -> list[str]:
    """The files of a DCP step folder that its model tensors are read from (relative names)."""
    md = read_dcp_metadata(src, light=True)
    shards = sorted({str(info.relative_path) for info in (getattr(md, "storage_data", None) or {}).values()
                     if getattr(info, "relative_path", None)})
    return [".metadata", "params.json", *shards]


def identify(src: Path, names: list[str]) -> dict[str, dict]:
    out = {}
    for n in names:
        f = src / n
        d = file_identity(f)
        if d["size"] <= SMALL:
            d["sha256"] = _sha256(f)
        out[n] = d
    return out


def write_link(model, tmp: Path, progress=None) -> None:
    """Write ``link.json`` and ``link.blocks`` for ``model`` (loaded from a DCP step folder) into ``tmp``."""
    src = Path(model.source or "").resolve()
    if not model.source or not is_dcp(src):
        raise MemeditError(f"--link links a DCP training step folder (.metadata, *.distcp, params.json); "
                           f"{model.source} is not one: convert it without --link (a copy)")
    names = source_files(src)
    files = identify(src, names)
    state = native_state(model, contiguous=False)
    total = sum(t.numel() * t.element_size() for t in state.values())
    done = [0]
    tensors, sums = {}, {}
    with open(tmp / BLOCKS, "wb") as f:
        for name in sorted(state):
            t = state[name]
            nbytes = t.numel() * t.element_size()

            def step(i: int, n: int, nbytes=nbytes) -> None:
                if progress is not None:
                    progress(done[0] + nbytes * i // n, total)

            d = block_digests(name, t, step)
            done[0] += nbytes
            tensors[name] = {"offset": f.tell() // 16, "blocks": int(d.shape[0])}
            f.write(d.tobytes())
            sums[name] = digest_sum(d) % FP_MOD
            if is_sharded(t):
                t.fp["digests"], t.fp["dirty"] = d, set()
    link = {
        "format": LINK_FORMAT, "version": 1, "source": str(src), "layout": "dcp", "files": files,
        "tensors": tensors, "blocks_sha256": _sha256(tmp / BLOCKS),
        "meta": {"format": "memedit", "memedit.folded": "0",
                 "memedit.fp": json.dumps({k: f"{v:032x}" for k, v in sums.items()})},
    }
    (tmp / LINK).write_text(json.dumps(link, indent=1) + "\n")


def verify_source(folder: Path, link: dict, hashes: bool = True) -> Path:
    """The linked source folder, refused in one line when it moved, is missing a file, or changed since the link."""
    src = Path(link["source"])
    if not src.is_dir():
        raise MemeditError(f"{folder} links to {src}, which is gone (moved or deleted): put it back there, or "
                           f"`memedit convert` again from where it is now")
    for name, want in link["files"].items():
        f = src / name
        if not f.is_file():
            raise MemeditError(f"{folder} links to {src}, which has lost {name} (moved or deleted): put it back, or "
                               "`memedit convert` again")
        have = file_identity(f)
        if have["size"] != want.get("size") or have["mtime_ns"] != want.get("mtime_ns") or \
                (hashes and "sha256" in want and _sha256(f) != want["sha256"]):
            raise MemeditError(f"{folder} links to {src}, whose {name} changed since it was linked (size, time or "
                               "contents); memedit will not read another checkpoint as this folder's base: "
                               "`memedit convert` again")
    return src


def open_link(folder: Path, model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state, base metadata) of a linked folder: the source's tensors mapped (no copy) under the native names,
    after the source is checked; value tables mapped from shards get their stored block digests."""
    link = read_link(folder)
    src = verify_source(folder, link)
    dcp = DcpState(src)
    names = list(native_state(model, contiguous=False))
    state = {}
    for n in names:
        if n not in dcp.specs:
            raise MemeditError(f"{src} has no tensor {n}, which {folder}/config.json expects")
        state[n] = dcp[n]
    digests = load_digests(folder, link)
    for n, t in state.items():
        if is_sharded(t) and n in digests:
            t.fp["digests"] = digests[n]
    return state, link_meta(folder)


def load_digests(folder: Path, link: dict) -> dict:
    """{tensor name: (blocks, 16) uint8} from ``link.blocks`` (checked against its sha256), or {} when damaged
    (the digests are then computed again when needed)."""
    path = Path(folder) / BLOCKS
    try:
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != link.get("blocks_sha256"):
            return {}
        arr = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 16)
        return {n: arr[d["offset"]: d["offset"] + d["blocks"]].copy() for n, d in link.get("tensors", {}).items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def check_base(folder: Path, model, problems: list[str]) -> None:
    """A linked base in full: the source there and unchanged, every block of every tensor hashed again and compared
    with link.blocks (naming the tensors and blocks that differ), finite values in every tensor."""
    try:
        link = read_link(folder)
        verify_source(folder, link)
    except MemeditError as e:
        problems.append(str(e).split("; run `memedit check")[0])
        return
    stored = load_digests(folder, link)
    if not stored:
        problems.append(f"{BLOCKS} is missing or damaged (its sha256 differs from link.json's)")
    sums = stored_sums(link["meta"]) or {}
    for name, t in native_state(model, contiguous=False).items():
        d = block_digests(name, t)
        if name in stored:
            bad = np.nonzero((stored[name] != d).any(1))[0]
            if len(bad):
                problems.append(f"the linked source's {name} differs from what was linked in {len(bad):,} blocks of "
                                f"rows (e.g. rows {int(bad[0]) * 64:,}..{int(bad[0]) * 64 + 63:,}): the base changed")
        if sums.get(name) is not None and digest_sum(d) % FP_MOD != sums[name]:
            if name not in stored:
                problems.append(f"the linked source's {name} does not match the fingerprint sums in {LINK}")
        if is_sharded(t):
            t.fp["digests"], t.fp["dirty"] = d, set()
        else:
            _set_cached_sum(model, name, t, digest_sum(d) % FP_MOD)
        if t.is_floating_point():
            bad_values = 0
            n = t.shape[0] if t.dim() >= 2 else 1
            for a in range(0, n, 1 << 14):
                rows = t.rows(a, a + (1 << 14)) if is_sharded(t) else t.detach().reshape(n, -1)[a: a + (1 << 14)]
                bad_values += int((~torch.isfinite(rows.float())).sum())
            if bad_values:
                problems.append(f"the linked source's {name} holds {bad_values:,} NaN or inf values")
