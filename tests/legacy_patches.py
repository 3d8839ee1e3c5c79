"""Writers of the two patch formats of memedit < 0.2, byte for byte as memedit 0.1 wrote them (its
``editing/patch.py`` Patch.save and ``keyspace/keys.py`` KeyPatch.save), so tests can check that files people
already have still load, apply and revert."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def write_key_patch(path: str | Path, changes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    meta: dict[str, str] | None = None) -> Path:
    """A "memedit-row-patch" file: {state-dict name: (row ids, old rows, new rows)}, a sha256 of each old and new."""
    tensors, md = {}, {"format": "memedit-row-patch", "version": "1", **(meta or {})}
    for name, (rows, old, new) in changes.items():
        tensors.update({f"{name}.rows": rows, f"{name}.old": old, f"{name}.new": new})
        md[f"sha256.{name}.old"] = hashlib.sha256(_bytes(old)).hexdigest()
        md[f"sha256.{name}.new"] = hashlib.sha256(_bytes(new)).hexdigest()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=md)
    return Path(path)


def key_patch_id(changes: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> str:
    """The id memedit 0.1 gave a key patch (and logged): a sha256 over every name, row id, old and new row."""
    h = hashlib.sha256()
    for name in sorted(changes):
        rows, old, new = changes[name]
        h.update(name.encode())
        for t in (rows.long(), old, new):
            h.update(_bytes(t))
    return h.hexdigest()[:12]


def write_value_patch(path: str | Path, base: str, table: str, layers: list[int], rows: torch.Tensor,
                      old: torch.Tensor, new: torch.Tensor, message: str = "", kind: str = "set") -> str:
    """A "memedit-patch" version 1 file of one value table (a checksum per base row); returns its id."""
    h = hashlib.sha256(base.encode())
    h.update(table.encode())
    for t in (rows, old, new):
        h.update(_bytes(t))
    pid = h.hexdigest()[:12]
    meta = {"format": "memedit-patch", "format_version": "1", "id": pid, "base": base,
            "tables": json.dumps({table: layers}),
            "checksums": json.dumps({table: [hashlib.sha256(_bytes(r)).hexdigest()[:16] for r in old]}),
            "message": message, "time": "2026-01-01T00:00:00Z", "kind": kind, "info": "{}"}
    save_file({f"{table}.rows": rows.long().contiguous(), f"{table}.old": old.contiguous(),
               f"{table}.new": new.contiguous()}, str(path), metadata=meta)
    return pid
