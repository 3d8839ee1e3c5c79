"""Token batches: right padding (safe, attention is causal) with the one pad-id fallback."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import MemeditError


def pad_id(model) -> int:
    """The id that pads a batch: the tokenizer's pad id, else 0 (padded positions are masked out or never read)."""
    tokenizer = getattr(model, "tokenizer", None)
    pad = tokenizer.pad_id if tokenizer is not None else None
    return int(pad) if pad is not None else 0


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to (B, T); returns (tokens, lengths). Causal attention makes right padding safe."""
    if not seqs:
        raise MemeditError("nothing to score: no prompts")
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return tokens, torch.tensor([len(s) for s in seqs])
