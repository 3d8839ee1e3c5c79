"""The fingerprint's pieces every layer of storage shares: blocks of BLOCK rows, each hashed with sha256 (its
tensor's name, dtype and shape, its index, its bytes) into an integer below 2**128; a tensor's sum is the sum of its
blocks' hashes mod FP_MOD.

store.py keeps the sums of native tensors; shards.py keeps a digest per block of a table mapped from shards;
linked.py stores those digests beside a linked checkpoint. They all build on this module, which imports only torch.
"""

from __future__ import annotations

import hashlib

import torch

FP_MOD = 1 << 128
BLOCK = 64  # rows per hashed block: a write re-hashes the blocks of the rows it changes (64 rows of 2 KiB: 128 KiB)


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def hash_prefix(name: str, t: torch.Tensor) -> bytes:
    """What every block hash of tensor ``name`` starts with: its name, dtype and shape."""
    return f"{name}:{t.dtype}:{tuple(t.shape)}:".encode()


def block_digest(prefix: bytes, b: int, data) -> int:
    """The hash of block ``b`` (its bytes ``data``) of the tensor that ``prefix`` names, as an integer < 2**128."""
    h = hashlib.sha256(prefix)
    h.update(f"{b}:".encode())
    h.update(data)
    return int.from_bytes(h.digest()[:16], "little")
